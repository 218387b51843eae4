"""End-to-end runs of ``python -m unigendet.detect / generate / evaluate`` on a tiny trained checkpoint."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from unigendet import detect as detect_cmd
from unigendet import evaluate as evaluate_cmd
from unigendet import generate as generate_cmd
from unigendet.data import embedded_dataset


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The ``final/`` folder of a short GDUF + DIGA run of ``python -m unigendet.train``'s trainer."""
    from unigendet.train import load_config, train

    out = tmp_path_factory.mktemp("run")
    cfg = load_config("tiny", ["--gduf.steps=3", "--diga.steps=1", f"--out-dir={out}", "--eval_samples=0",
                               "--sample_images=0", "--gen_eval_samples=0", "--save_every=100", "--lr=1e-3",
                               "--warmup_steps=0",
                               "--data.expected_tokens=512", "--data.max_tokens=640",
                               "--data.max_tokens_per_sample=512"])
    train(cfg, progress=False)
    return str(out / "final")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return embedded_dataset(str(tmp_path_factory.mktemp("data") / "embedded"), n_train=2, n_test=4, n_gen=3)


def _test_images(data):
    return sorted(glob.glob(os.path.join(data.fakeclue_root, "test", "*", "*", "*.png")))


def test_detect_lines_and_json(ckpt, data, capsys):
    images = _test_images(data)[:2]
    assert detect_cmd.main([*images, "--checkpoint", ckpt, "--max-new-tokens", "3", "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for path, line in zip(images, lines):
        fields = line.split("\t")
        assert fields[0] == path and fields[1] in ("FAKE", "REAL") and fields[2].startswith("p_fake=")
    assert detect_cmd.main([*images, "--checkpoint", ckpt, "--json", "--sample", "--seed", "1",
                            "--max-new-tokens", "3", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["path"] for o in out] == images
    assert all(o["label"] in (0, 1) and 0 <= o["prob_fake"] <= 1 and o["num_tokens"] <= 3 for o in out)


def test_detect_skips_bad_images_and_exits_1(ckpt, data, tmp_path, capsys):
    good = _test_images(data)[:2]
    trunc = tmp_path / "trunc.jpg"
    Image.open(good[0]).convert("RGB").save(trunc, format="JPEG")
    trunc.write_bytes(trunc.read_bytes()[:300])
    missing = str(tmp_path / "missing.png")
    argv = [good[0], str(trunc), missing, good[1], "--checkpoint", ckpt, "--max-new-tokens", "2", "--no-progress"]
    assert detect_cmd.main(argv) == 1
    cap = capsys.readouterr()
    assert [line.split("\t")[0] for line in cap.out.strip().splitlines()] == good
    assert f"unigendet.detect: error: image {missing}: no such file; skipped" in cap.err
    assert f"unigendet.detect: error: image {trunc}: not a readable image" in cap.err
    assert "2 of 4 images could not be read" in cap.err and "Traceback" not in cap.err
    assert detect_cmd.main([*argv, "--json", "--prompt-style", "official"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert [o["path"] for o in out] == [good[0], str(trunc), missing, good[1]]
    assert out[0]["error"] is None and out[1]["error"].startswith("not a readable image")
    assert out[2] == {"path": missing, "error": "no such file"}


def test_generate_one_and_many(ckpt, tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert generate_cmd.main(["--prompt", "a photo of a cat", "-o", str(out), "--checkpoint", ckpt, "--steps", "3",
                              "--size", "32x48", "--no-progress"]) == 0
    assert Image.open(out).size == (48, 32)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cup of coffee\n\na brick wall\n")
    d = tmp_path / "many"
    assert generate_cmd.main(["--prompts-file", str(prompts), "--out-dir", str(d), "--checkpoint", ckpt,
                              "--steps", "2", "--size", "32", "--batch-size", "2", "--no-progress"]) == 0
    meta = json.loads((d / "prompts.json").read_text())
    assert [m["prompt"] for m in meta] == ["a cup of coffee", "a brick wall"]
    assert all(Image.open(d / m["image"]).size == (32, 32) for m in meta)
    assert generate_cmd.main(["--prompts-file", str(prompts), "-o", str(out), "--checkpoint", ckpt]) == 2
    assert "exactly one prompt" in capsys.readouterr().err


def test_evaluate_det(ckpt, data, tmp_path, capsys):
    out = tmp_path / "det"
    assert evaluate_cmd.main(["det", "--checkpoint", ckpt, "--data", data.root, "--limit", "3",
                              "--max-new-tokens", "3", "--out-dir", str(out), "--no-progress"]) == 0
    res = json.loads((out / "detection_test.json").read_text())
    assert res["num_samples"] == 3 and res["num_errors"] == 0
    assert res["num_valid"] + res["num_unparseable"] == 3
    assert res["head"]["num_valid"] == 3 and res["head"]["accuracy"] is not None  # head verdict always parses
    assert res["rouge_l"] is not None and res["css"] is not None and res["per_category"]
    assert len(res["samples"]) == 3
    assert "| overall |" in (out / "detection_test.md").read_text()
    assert "Detection (test, 3 images)" in capsys.readouterr().out
    assert res["settings"]["prompt_style"] == "fakeclue" and res["settings"]["max_new_tokens"] == 3
    # Without --out the reports go to eval/ in the checkpoint's run folder, never the current folder.
    run = os.path.dirname(ckpt)
    assert evaluate_cmd.main(["det", "--checkpoint", ckpt, "--data", data.root, "--limit", "2", "--prompt-style",
                              "official", "--max-new-tokens", "2", "--no-progress"]) == 0
    res = json.loads(open(os.path.join(run, "eval", "detection_test.json")).read())
    assert res["num_samples"] == 2 and res["settings"]["prompt_style"] == "official"
    assert "eval/detection_test.json" in capsys.readouterr().out


def test_evaluate_gen(ckpt, data, tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    for p in sorted(glob.glob(os.path.join(data.laion_root, "images", "*.png")))[:3]:
        shutil.copy(p, ref)
    out = tmp_path / "gen"
    assert evaluate_cmd.main(["gen", "--checkpoint", ckpt, "--prompts", os.path.join(data.laion_root,
                              "final_metadata.json"), "--reference-dir", str(ref), "--steps", "2", "--size", "32",
                              "--max-new-tokens", "2", "--out-dir", str(out), "--no-progress"]) == 0
    res = json.loads((out / "generation.json").read_text())
    assert res["num_generated"] == 3 and res["fid"] >= 0
    assert 0 <= res["detector_fake_rate_head"] <= 1 and res["detector_num_unparseable"] <= 3
    assert len(os.listdir(out / "generated")) == 3
    # scene prompts also get the exact prompt-following score
    assert 0.0 <= res["prompt_score"] <= 1.0 and res["chance"] == 0.3125 and set(res["per_attribute"]) == {
        "colour", "shape", "position", "background"}
    # --data embedded: the held-out scene prompts (and, without --reference-dir, the held-out scenes as reference)
    out2 = tmp_path / "gen2"
    assert evaluate_cmd.main(["gen", "--checkpoint", ckpt, "--data", "embedded", "--limit", "2", "--reference-dir",
                              str(ref), "--steps", "2", "--no-detect", "--out-dir", str(out2), "--no-progress"]) == 0
    res2 = json.loads((out2 / "generation.json").read_text())
    assert res2["num_generated"] == 2 and 0.0 <= res2["prompt_score"] <= 1.0


def test_evaluate_gen_needs_a_reference(ckpt, capsys):
    assert evaluate_cmd.main(["gen", "--checkpoint", ckpt, "--prompt", "a", "--prompt", "b"]) == 2
    assert "--reference-dir is required" in capsys.readouterr().err


def test_module_entry_point(ckpt, data):
    # The real command line, once: `python -m unigendet.detect`.
    image = _test_images(data)[0]
    r = subprocess.run([sys.executable, "-m", "unigendet.detect", image, "--checkpoint", ckpt, "--max-new-tokens",
                        "2", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["path"] == image
    assert "detect" in r.stderr  # the tqdm bar goes to stderr
