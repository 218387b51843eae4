"""`python -m unigendet.ablate` end to end on a few steps."""

import json

from unigendet import ablate


def test_ablation_table(tmp_path, capsys):
    rc = ablate.main(["--out-dir", str(tmp_path), "--no-progress", "--gduf.steps=2", "--eval_samples=4",
                      "--eval_max_new_tokens=4", "--save_every=100"])
    assert rc == 0
    data = json.loads((tmp_path / "ablation.json").read_text())
    assert set(data["ours"]) == {"full", "no-smsa", "no-gduf"}
    for r in data["ours"].values():
        assert r["n"] == 4 and 0.0 <= r["head_accuracy"] <= 100.0
    assert data["paper"]["full"]["accuracy"] == 98.0
    table = (tmp_path / "ablation.md").read_text()
    assert "| no-smsa |" in table and "paper Acc" in table
    # the untuned base is evaluated without training: no checkpoints were written for it
    assert not (tmp_path / "no-gduf" / "checkpoints").exists()
    assert (tmp_path / "full" / "final").is_dir()
    assert "Ablation" in capsys.readouterr().out
    # Again into the same folder: refused before any training, unless --overwrite (options in either form).
    assert ablate.main(["--out-dir", str(tmp_path), "--gduf.steps", "2"]) == 2
    assert "is not empty" in capsys.readouterr().err
