"""The command lines' first contact: one-line errors with exit status 2 before any model loads, checkpoint-path
hints, ``--key value`` options, ``train --help``, the run-folder rule, the report folder, quiet logs and plain
progress lines. No model is ever built here (a model load is made to fail the test)."""

import json
import logging
import os
import subprocess
import sys

import pytest
from PIL import Image

from unigendet import detect as detect_cmd
from unigendet import evaluate as evaluate_cmd
from unigendet import generate as generate_cmd
from unigendet.train import __main__ as train_cmd


def _fake_checkpoint(folder, *, tokenizer=True, preset="tiny"):
    """A checkpoint folder as the trainer exports it (configs, a weights file, tokenizer files), no real weights."""
    from unigendet.models import get_config, save_config

    os.makedirs(folder, exist_ok=True)
    save_config(get_config(preset), str(folder))
    open(os.path.join(folder, "model.safetensors"), "wb").close()
    if tokenizer:
        with open(os.path.join(folder, "tokenizer.json"), "w") as f:
            f.write("{}")
    return str(folder)


@pytest.fixture
def run_dir(tmp_path):
    """``<tmp>/runs/tiny`` with ``final/``, ``checkpoints/step_0000002/`` and ``train.jsonl``, like a finished run."""
    run = tmp_path / "runs" / "tiny"
    _fake_checkpoint(run / "final")
    step = run / "checkpoints" / "step_0000002"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    (run / "train.jsonl").write_text("")
    return run


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    """Every command here must stop before loading a model."""
    import unigendet.inference.loading as loading

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_for_inference", refuse)


@pytest.fixture
def images(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 24), (120, 30, 200)).save(good)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image at all")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    return {"good": str(good), "junk": str(junk), "folder": str(folder), "missing": str(tmp_path / "nope.png")}


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


def _one_error(capsys, name: str) -> str:
    err = _err(capsys).strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"unigendet.{name}: error: "), err
    return err


# ------------------------------------------------------------------------------------------------ detect


@pytest.mark.parametrize("which, text", [
    ("missing", "no such file"),
    ("folder", "a folder, not an image file"),
    ("junk", "not a readable image"),
])
def test_detect_unusable_image_is_one_line_exit_2(images, run_dir, capsys, which, text):
    rc = detect_cmd.main([images[which], "--checkpoint", str(run_dir / "final")])
    assert rc == 2
    err = _one_error(capsys, "detect")
    assert f"image {images[which]}: {text}" in err


def test_detect_checkpoint_hints(images, run_dir, tmp_path, capsys):
    img = images["good"]
    assert detect_cmd.main([img, "--checkpoint", str(run_dir)]) == 2
    assert f"did you mean {run_dir / 'final'}?" in _one_error(capsys, "detect")

    assert detect_cmd.main([img, "--checkpoint", str(run_dir / "checkpoints" / "step_0000002")]) == 2
    err = _one_error(capsys, "detect")
    assert "training checkpoint" in err and f"did you mean {run_dir / 'final'}?" in err

    assert detect_cmd.main([img, "--checkpoint", str(run_dir.parent / "tiyn")]) == 2
    err = _one_error(capsys, "detect")
    assert "not found" in err and f"did you mean {run_dir}?" in err

    bare = _fake_checkpoint(tmp_path / "bare", tokenizer=False)
    assert detect_cmd.main([img, "--checkpoint", bare]) == 2
    err = _one_error(capsys, "detect")
    assert "holds no tokenizer files" in err and "--tokenizer tiny" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert detect_cmd.main([img, "--checkpoint", str(empty)]) == 2
    assert "is not a checkpoint folder" in _one_error(capsys, "detect")


def test_detect_bad_options(images, run_dir, capsys):
    ckpt = str(run_dir / "final")
    assert detect_cmd.main([images["good"], "--checkpoint", ckpt, "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be >= 1" in _one_error(capsys, "detect")
    assert detect_cmd.main([images["good"], "--checkpoint", ckpt, "--prompt-style", "weird"]) == 2
    assert "invalid choice" in _one_error(capsys, "detect")
    assert detect_cmd.main([images["good"], "--checkpoint", ckpt, "--max-new", "3"]) == 2  # no abbreviations
    assert "unrecognized arguments" in _one_error(capsys, "detect")
    assert detect_cmd.main([images["good"]]) == 2
    assert "--checkpoint" in _one_error(capsys, "detect")


def test_debug_adds_the_traceback(images, run_dir, capsys):
    assert detect_cmd.main([images["good"], "--checkpoint", str(run_dir), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("unigendet.detect: error: ")


def test_detect_reports_bad_images_and_goes_on(images, run_dir, capsys, monkeypatch):
    """Bad images among good ones are reported (one line each) and skipped, not fatal: the model then loads."""
    import unigendet.detect as mod

    loaded = []
    monkeypatch.setattr(mod, "load_from_args", lambda args: loaded.append(1) or (_ for _ in ()).throw(
        RuntimeError("stop here")))
    rc = detect_cmd.main([images["good"], images["missing"], images["folder"], "--checkpoint",
                          str(run_dir / "final")])
    err = capsys.readouterr().err
    assert loaded == [1] and rc == 1  # the stand-in loader's RuntimeError: an unexpected failure, exit 1
    assert f"image {images['missing']}: no such file; skipped" in err
    assert f"image {images['folder']}: a folder, not an image file; skipped" in err


def test_module_entry_point_error_is_one_line(images, tmp_path):
    r = subprocess.run([sys.executable, "-m", "unigendet.detect", images["missing"], "--checkpoint",
                        str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip() == f"unigendet.detect: error: image {images['missing']}: no such file"


# ------------------------------------------------------------------------------------------------ generate


def test_generate_checks_before_loading(run_dir, tmp_path, capsys):
    ckpt = str(run_dir / "final")
    out = str(tmp_path / "x.png")
    assert generate_cmd.main(["--prompt", "a cat", "-o", out, "--checkpoint", ckpt, "--size", "1000"]) == 2
    err = _one_error(capsys, "generate")
    assert "--size 1000x1000" in err and "multiples of 16 between 16 and 64" in err
    assert generate_cmd.main(["--prompt", "a cat", "-o", out, "--checkpoint", ckpt, "--size", "big"]) == 2
    assert "size must be N or HxW" in _one_error(capsys, "generate")
    assert generate_cmd.main(["--prompts-file", str(tmp_path / "none.txt"), "--out-dir", str(tmp_path),
                              "--checkpoint", ckpt]) == 2
    assert "--prompts-file" in _one_error(capsys, "generate")
    assert generate_cmd.main(["--prompt", "a", "--prompt", "b", "-o", out, "--checkpoint", ckpt]) == 2
    assert "exactly one prompt" in _one_error(capsys, "generate")
    assert generate_cmd.main(["--prompt", "a cat", "-o", out, "--checkpoint", ckpt, "--steps", "1"]) == 2
    assert "--steps must be >= 2" in _one_error(capsys, "generate")


# ------------------------------------------------------------------------------------------------ evaluate


def test_evaluate_det_checks_data_before_loading(run_dir, tmp_path, capsys):
    ckpt = str(run_dir / "final")
    assert evaluate_cmd.main(["det", "--checkpoint", ckpt, "--data", str(tmp_path)]) == 2
    assert "no FakeClue data_json/ folder" in _one_error(capsys, "evaluate")
    (tmp_path / "data_json").mkdir()
    (tmp_path / "data_json" / "train.json").write_text("[]")
    assert evaluate_cmd.main(["det", "--checkpoint", ckpt, "--data", str(tmp_path)]) == 2
    err = _one_error(capsys, "evaluate")
    assert "--split test" in err and "splits here: train" in err
    (tmp_path / "data_json" / "test.json").write_text("[]")
    assert evaluate_cmd.main(["det", "--checkpoint", ckpt, "--data", str(tmp_path)]) == 2
    assert "no usable records" in _one_error(capsys, "evaluate")


def test_evaluate_gen_checks_prompts_and_reference_before_generating(run_dir, tmp_path, capsys):
    ckpt = str(run_dir / "final")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    assert evaluate_cmd.main(["gen", "--checkpoint", ckpt, "--prompts", "a photo of a cat", "--reference-dir",
                              str(tmp_path)]) == 2
    assert "--prompts a photo of a cat: no such file" in _one_error(capsys, "evaluate")
    assert evaluate_cmd.main(["gen", "--checkpoint", ckpt, "--prompts", str(prompts), "--reference-dir",
                              str(tmp_path / "real")]) == 2
    assert "--reference-dir" in _one_error(capsys, "evaluate")
    real = tmp_path / "real"
    real.mkdir()
    Image.new("RGB", (8, 8)).save(real / "a.png")
    assert evaluate_cmd.main(["gen", "--checkpoint", ckpt, "--prompts", str(prompts), "--reference-dir",
                              str(real)]) == 2
    assert "at least 2 reference images, found 1" in _one_error(capsys, "evaluate")


def test_evaluate_det_data_embedded():
    from unigendet.data import embedded_dataset

    assert evaluate_cmd._fakeclue_root("embedded") == embedded_dataset().fakeclue_root


def test_evaluate_reports_go_to_the_run_folder(run_dir, tmp_path):
    assert evaluate_cmd.default_out_dir(str(run_dir / "final")) == str(run_dir / "eval")
    alone = _fake_checkpoint(tmp_path / "download")
    assert evaluate_cmd.default_out_dir(alone) == os.path.join(alone, "eval")


# ------------------------------------------------------------------------------------------------ train


def test_train_key_value_forms(tmp_path):
    cfg, progress = train_cmd.parse(["--lr", "3e-4", "--gduf.steps", "7", "--out-dir", str(tmp_path / "a"),
                                     "--diga.steps=3", "--resume", "--no-progress", "--betas", "0.8,0.9"])
    assert cfg.optim.lr == 3e-4 and cfg.gduf.steps == 7 and cfg.diga.steps == 3 and cfg.resume
    assert cfg.out_dir == str(tmp_path / "a") and cfg.optim.betas == (0.8, 0.9) and not progress
    cfg, _ = train_cmd.parse(["bagel-7b-mot", "--resume", "false", "--data.num_workers", "2"])
    assert cfg.name == "bagel-7b-mot" and not cfg.resume and cfg.data.num_workers == 2
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"gduf": {"steps": 11}}))
    cfg, _ = train_cmd.parse(["--resume", str(path)])  # a bare flag before CONFIG
    assert cfg.resume and cfg.gduf.steps == 11


@pytest.mark.parametrize("argv, text", [
    (["--steps", "5"], "--steps is ambiguous; say which section, e.g. --gduf.steps"),
    (["--gduf.step", "5"], "unknown option --gduf.step (did you mean --gduf.steps?)"),
    (["--lr", "fast"], "--optim.lr expects float, got 'fast'"),
    (["--stage", "three"], "stage must be gduf, diga or all"),
    (["--resume=maybe"], "expects a boolean"),
    (["--resume", "--overwrite"], "resume and overwrite exclude each other"),
    (["nonsense"], "is neither a preset"),
    (["--model_path", "/no/such/folder"], "--model_path /no/such/folder: no such folder"),
    (["--data.source", "files"], "needs --data.fakeclue_root"),
])
def test_train_bad_options_are_one_line(argv, text, tmp_path, capsys):
    assert train_cmd.main([*argv, f"--out-dir={tmp_path / 'out'}"]) == 2
    assert text in _one_error(capsys, "train")
    assert not (tmp_path / "out").exists()


def test_train_help_lists_every_field_with_type_and_default():
    from unigendet.train.config import field_docs

    text = " ".join(train_cmd.build_parser().format_help().split())
    for d in field_docs():
        assert d.help, f"{d.key} has no #: help comment"
        assert f"--{d.key}" in text and d.type in text, d.key
    assert "--optim.lr, --lr FLOAT peak learning rate (AdamW) (default: 0.0005; bagel-7b-mot: 0.0001)" in text
    assert "--gduf.steps INT optimizer steps of the stage (default: 1000)" in text
    assert "--resume [BOOL]" in text and "--overwrite [BOOL]" in text


def test_train_refuses_a_non_empty_out_dir(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.jsonl").write_text('{"event": "start"}\n')
    assert train_cmd.main([f"--out-dir={out}"]) == 2
    err = _one_error(capsys, "train")
    assert f"out_dir {out} is not empty (train.jsonl)" in err and "--resume" in err and "--overwrite" in err


def test_trainer_out_dir_rule_and_overwrite(tmp_path):
    from unigendet.train.checks import clear_run_outputs, out_dir_problem
    from unigendet.train.config import load_config
    from unigendet.train.loop import Trainer

    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "round2" / "fakes").mkdir(parents=True)
    (out / "train.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty"):
        Trainer(load_config("tiny", [f"--out_dir={out}"]), progress=False)
    assert out_dir_problem(load_config("tiny", [f"--out_dir={out}", "--resume=true"])) is None
    assert out_dir_problem(load_config("tiny", [f"--out_dir={out}", "--overwrite=true"])) is None
    assert out_dir_problem(load_config("tiny", [f"--out_dir={tmp_path / 'new'}"])) is None
    assert clear_run_outputs(str(out)) == ["final", "round2", "train.jsonl"]
    assert sorted(os.listdir(out)) == ["notes.txt"]  # only the run's own outputs are deleted


# ------------------------------------------------------------------------------------------------ outputs


def test_quiet_third_party_logs(capsys):
    from unigendet._cli import configure_logging

    configure_logging()
    logging.getLogger("matplotlib.font_manager").info("generated new fontManager")
    logging.getLogger("absl").info("Using default tokenizer.")
    logging.getLogger("unigendet.train").info("our own line")
    err = capsys.readouterr().err
    assert "fontManager" not in err and "default tokenizer" not in err


def test_progress_is_plain_lines_when_not_a_terminal(monkeypatch):
    import io

    from unigendet._progress import LineProgress, progress_bar

    monkeypatch.setenv("UNIGENDET_PROGRESS_INTERVAL", "0")
    buf = io.StringIO()
    bar = progress_bar(total=4, desc="round 1 GDUF", unit="step", stream=buf)
    assert isinstance(bar, LineProgress)
    for _ in range(4):
        bar.set_postfix({"loss": "0.5"}, refresh=False)
        bar.update(1)
    bar.close()
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("round 1 GDUF: 1/4 steps (25%)") and lines[-1].startswith("round 1 GDUF: 4/4 steps")
    assert "loss=0.5" in lines[-1] and "elapsed" in lines[-1]
    assert "\r" not in buf.getvalue() and "\x1b" not in buf.getvalue()
    inner = progress_bar(total=3, desc="flow sampling", leave=False, stream=buf)
    inner.update(3)
    inner.close()
    assert len(buf.getvalue().splitlines()) == len(lines)  # nested bars are silent in line mode


def test_loss_plot_is_written(tmp_path):
    from unigendet.train.logs import plot_losses, smooth

    pytest.importorskip("matplotlib")
    recs = [{"event": "step", "stage": "gduf", "round": 1, "global_step": i + 1, "loss": 3.0 - 0.01 * i,
             "loss_ce": 2.0, "loss_mse": 1.0, "loss_label": 0.7} for i in range(100)]
    recs += [{"event": "step", "stage": "diga", "round": 1, "global_step": 101 + i, "loss": 1.5, "loss_mse": 1.0,
              "loss_diga": 0.5 - 0.001 * i} for i in range(50)]
    assert plot_losses(recs, str(tmp_path / "losses.png"))
    with Image.open(tmp_path / "losses.png") as im:
        assert im.width > 1000
    assert smooth([1.0, 2.0, 3.0, float("nan"), 5.0], 3) == [1.5, 2.0, 2.5, 4.0, 5.0]
