"""The end of a run: export the model, plot the losses, evaluate both halves, compare the co-evolution detectors,
and project the paper's schedule from this run's throughput (what ``summary.json`` holds beside the stages)."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch

from .flops import PaperSchedule, project_schedule, train_flops_per_token
from .logs import plot_losses, read_jsonl

log = logging.getLogger("unigendet.train")

__all__ = ["evaluate_detection", "finish", "sample_grid", "throughput"]


def finish(trainer) -> dict:
    """Export the model, plot the losses, draw samples, evaluate held-out detection, project the budget."""
    from unigendet.models import save_checkpoint

    cfg = trainer.cfg
    out: dict = {}
    final = os.path.join(trainer.out_dir, "final")
    save_checkpoint(trainer.model, final)
    trainer.tokenizer.save(final)
    out["checkpoint"] = final
    records = read_jsonl(trainer.logger.path)
    if records.skipped or trainer.logger.failed:  # torn lines of an earlier crash, records a full disk dropped
        log.warning("%s: %d unreadable line(s) skipped, %d record(s) of this run could not be written",
                    trainer.logger.path, records.skipped, trainer.logger.failed)
        out["log_lines_skipped"], out["log_records_lost"] = records.skipped, trainer.logger.failed
    if plot_losses(records, os.path.join(trainer.out_dir, "losses.png")):
        out["loss_plot"] = os.path.join(trainer.out_dir, "losses.png")
    out["throughput"] = throughput(trainer)
    if cfg.eval_samples > 0 and trainer.test_records:
        out["detection"] = trainer.evaluate_detection(trainer.test_records[: cfg.eval_samples])
    if trainer.model.config.visual_gen and cfg.data.source == "embedded" and cfg.gen_eval_samples > 0:
        from .evaluation import evaluate_generation

        out["generation"], _ = evaluate_generation(
            trainer.model, trainer.tokenizer, trainer.packing, n=cfg.gen_eval_samples, seed=cfg.seed,
            steps=cfg.sample_steps, out_dir=trainer.out_dir, sample_images=cfg.sample_images,
            progress=trainer.progress)
        if "samples" in out["generation"]:
            out["samples"] = out["generation"]["samples"]
        if cfg.rounds >= 2 and cfg.stage == "all":
            from .coevolution import compare_detectors

            out["coevolution"] = compare_detectors(trainer)
    elif cfg.sample_images > 0 and trainer.gen_records:
        out["samples"] = sample_grid(trainer, cfg.sample_images)
    return out


def throughput(trainer) -> dict:
    """Tokens/s and achieved FLOP/s of the run's stages, and the paper's schedule projected from them."""
    from unigendet.models import get_config

    st = [v for v in trainer.history.values() if v["tokens"]]
    if not st:
        return {}
    tok_s = sum(v["tokens"] for v in st) / sum(v["seconds"] for v in st)
    llm = trainer.model.config.llm
    ctx = trainer.packing.expected_num_tokens / 4  # a token sees about a quarter of a pack (prefix masks)
    fpt = train_flops_per_token(llm, ctx, trainer.cfg.grad_checkpointing)
    achieved = tok_s * fpt
    big = get_config("bagel-7b-mot").llm
    big_fpt = train_flops_per_token(big, 16384 / 4, recompute=True)
    big_tok_s = achieved / big_fpt
    proj = project_schedule(big_tok_s * trainer.dist.world_size, PaperSchedule())
    device = trainer.device
    return {
        "tokens_per_s": tok_s,
        "model_flops_per_token": fpt,
        "achieved_tflops": achieved / 1e12,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu x{os.cpu_count()}",
        "world_size": trainer.dist.world_size,
        "paper_schedule_projection": proj | {
            "bagel_7b_flops_per_token": big_fpt,
            "method": "the achieved FLOP/s of this run applied to BAGEL-7B-MoT's training FLOPs per token "
                      "(weights x 8 with recompute + attention at a mean context of 4096), on this run's "
                      "hardware and process count",
        },
    }


def evaluate_detection(trainer, records) -> dict:
    """Detect ``records`` with the trained model: Acc/F1/ROUGE-L/CSS (``detection_eval.json``) and the head's
    accuracy."""
    from unigendet.eval import evaluate_detection as score
    from unigendet.inference import Detector

    model = trainer.model
    model.eval()
    det = Detector(model, trainer.tokenizer, trainer.packing, smsa=trainer.cfg.smsa,
                   max_new_tokens=trainer.cfg.eval_max_new_tokens)
    with torch.no_grad():
        results = det.detect([r.image for r in records], batch_size=16, progress=trainer.progress)
    preds = [{"text": r.text, "logits": [r.prob_fake, 1.0 - r.prob_fake]} for r in results]
    report = score(records, preds)
    with open(os.path.join(trainer.out_dir, "detection_eval.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    head_acc = float(np.mean([r.label == rec.label for r, rec in zip(results, records)]))
    model.train()
    return {"n": len(records), "head_accuracy": head_acc, "report": report}


def sample_grid(trainer, n: int) -> str:
    """``samples.png``: images from the first ``n`` training captions, each under its prompt (data sets without
    held-out scenes; the embedded one draws its grid in :func:`~unigendet.train.evaluation.evaluate_generation`)."""
    from .evaluation import generate
    from .logs import plot_samples

    prompts = [r.prompt for r in trainer.gen_records[:n]]
    images = generate(trainer.model, trainer.tokenizer, trainer.packing, prompts, seed=trainer.cfg.seed,
                      steps=trainer.cfg.sample_steps, progress=trainer.progress)
    path = os.path.join(trainer.out_dir, "samples.png")
    plot_samples(images, prompts, path)
    return path
