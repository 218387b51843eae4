"""`python -m unigendet.ablate` end to end on a few steps."""

import json

from unigendet import ablate


def test_ablation_table(tmp_path, capsys):
    rc = ablate.main(["--out-dir", str(tmp_path), "--no-progress", "--gduf.steps=2", "--eval_samples=4",
                      "--eval_max_new_tokens=4", "--save_every=100", "--seeds=0,1"])
    assert rc == 0
    data = json.loads((tmp_path / "ablation.json").read_text())
    assert data["seeds"] == [0, 1]
    assert set(data["ours"]) == {"full", "no-smsa", "no-gduf"}
    for name, r in data["ours"].items():
        assert len(r["head_accuracy"]["values"]) == 2 and 0.0 <= r["head_accuracy"]["mean"] <= 100.0
        for seed in ("0", "1"):
            assert data["per_seed"][seed][name]["n"] == 4
    assert data["paper"]["full"]["accuracy"] == 98.0
    table = (tmp_path / "ablation.md").read_text()
    assert "| no-smsa |" in table and "paper Acc" in table and " ± " in table
    # the untuned base is evaluated without training: no checkpoints were written for it
    assert not (tmp_path / "seed0" / "no-gduf" / "checkpoints").exists()
    assert (tmp_path / "seed1" / "full" / "final").is_dir()
    assert "Ablation" in capsys.readouterr().out
    # Again into the same folder: refused before any training, unless --overwrite (options in either form).
    assert ablate.main(["--out-dir", str(tmp_path), "--gduf.steps", "2", "--seeds=0,1"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert ablate.main(["--out-dir", str(tmp_path / "x"), "--seeds=a"]) == 2


def test_generation_study_compares_diga_with_a_plain_flow_control(tmp_path):
    rc = ablate.main(["--study", "generation", "--out-dir", str(tmp_path), "--no-progress", "--gduf.steps=2",
                      "--diga.steps=2", "--gen_eval_samples=4", "--sample_images=0", "--save_every=100"])
    assert rc == 0
    data = json.loads((tmp_path / "generation.json").read_text())
    assert set(data["results"]) == {"gduf", "diga", "control"}
    for name in ("gduf", "diga", "control"):
        g = data["per_seed"]["0"][name]
        assert g["n"] == 4 and 0.0 <= g["prompt_score"] <= 1.0 and g["chance"] == data["chance"]
    # the control trained with the alignment weight at zero, from the same GDUF model
    cfg = json.loads((tmp_path / "seed0" / "control" / "train.jsonl").read_text().splitlines()[0])["config"]
    assert cfg["diga"]["w_diga"] == 0.0 and cfg["model"].endswith("gduf/final")
    assert "GDUF + DIGA" in (tmp_path / "generation.md").read_text()
