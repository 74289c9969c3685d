"""`deltapack share` end to end: load → plan (criterion) → SVD init → distil the deltas (PMR) → save (→ dense).

`drop_and_heal` (`deltapack share --method layerdrop`) is the alternative the benchmark found better on SmolLM2-135M
(bench/results/share.json): drop the blocks of lowest Block Influence, then heal the rest by the same distillation.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch

from deltapack.errors import InputError
from deltapack.io.writer import guard_output
from deltapack.share.data import load_docs, self_chat_texts, self_text_texts, split_docs, windows
from deltapack.share.evaluate import batched_kl, evaluate, teacher_logprobs
from deltapack.share.baselines import heal_layer_drop, layer_drop_model
from deltapack.share.model import apply_plan, finalize
from deltapack.share.plan import SharePlan, check_plan, make_plan, unique_param_count
from deltapack.share.store import export_dense as write_dense
from deltapack.share.store import save_dropped, save_shared
from deltapack.share.train import TrainConfig, _checkpoints, train_deltas

log = logging.getLogger(__name__)
EVAL_BATCH = 8


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise InputError(f"unknown device {device!r}") from e


def load_original(model_ref: str | os.PathLike, device: torch.device):
    """(model, tokenizer, checkpoint dir) of MODEL: a local HF directory, a .gguf file or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltapack.io.sources import open_model

    src = open_model(model_ref)
    try:
        tok = AutoTokenizer.from_pretrained(str(src.path))
    except Exception as e:
        raise InputError(f"{model_ref}: no usable tokenizer next to the weights ({e.__class__.__name__})") from e
    model = AutoModelForCausalLM.from_pretrained(str(src.path), dtype="auto").to(device).eval()
    return model, tok, src.path


DEFAULT_SELF_TEXT = 8192  # as in bench/share/run.py, where it raised the paper-style score at -12% (docs/share.md)


def training_text(model, tok, data, self_chat: int, self_text: int | None, cfg: TrainConfig, ckpt: Path,
                  dev: torch.device, eval_windows: int, progress: bool) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """(training windows, held-out windows, chat samples, free texts): the documentation (or `data`) plus what the
    original writes itself, the samples cached beside the checkpoints so that a resumed run trains on the same."""
    train_texts, held_texts = split_docs(load_docs(data))
    chat = self_chat_texts(model, tok, self_chat, seed=cfg.seed, docs=train_texts, progress=progress,
                           cache=ckpt / "self_chat.json")
    if self_text is None:
        # ~100 s for SmolLM2-135M on an H100, ~2 h on 2 CPU cores (bench/results/share_self_text_cost_cpu.json)
        self_text = DEFAULT_SELF_TEXT if dev.type == "cuda" else 0
        log.info("self-text samples: %d (default on %s)", self_text, dev.type)
    free = self_text_texts(model, tok, self_text, seed=cfg.seed, progress=progress, cache=ckpt / "self_text.json")
    train_texts = train_texts + chat + free  # windows() shuffles documents, so the samples spread over training
    need = cfg.steps * cfg.batch_size
    train_w = windows(tok, train_texts, cfg.seq_len, need, seed=cfg.seed)
    held_w = windows(tok, held_texts, cfg.seq_len, eval_windows, seed=cfg.seed)
    log.info("training text: %d windows x %d tokens (%d wanted); held-out %d windows", len(train_w), cfg.seq_len, need, len(held_w))
    return train_w, held_w, chat, free


def _outputs_free(out: Path, overwrite: bool, *more: Path | None, inputs: tuple = ()) -> None:
    for p in (out, *more):
        if p is not None:
            guard_output(p, *inputs)  # even with --overwrite: replacing an input would delete it
        if p is not None and p.exists() and not overwrite:
            raise InputError(f"output {p} already exists (pass --overwrite to replace it)")


def share(
    model_ref: str | os.PathLike,
    out: str | os.PathLike,
    *,
    reduction: float = 0.12,
    pattern: str = "sequential",
    modules: str = "mlp",
    rank: int | None = None,
    group: int | None = None,
    criterion: str = "kl",
    data: str | os.PathLike | None = None,
    self_chat: int = 1024,
    self_text: int | None = None,
    train: TrainConfig | None = None,
    device: str = "auto",
    calib_windows: int = 16,
    eval_windows: int = 32,
    resume: bool = False,
    ckpt_dir: str | os.PathLike | None = None,
    keep_checkpoints: bool = False,
    export_dense: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Compress MODEL into a shared-weight model at `out`. Returns the summary also written to out/share.json."""
    cfg = train or TrainConfig()
    out = Path(out)
    _outputs_free(out, overwrite, Path(export_dense) if export_dense else None, inputs=(model_ref, data))
    ckpt = Path(ckpt_dir) if ckpt_dir else out.with_name(out.name + ".ckpt")
    dev = pick_device(device)
    t_start = time.perf_counter()
    model, tok, src_dir = load_original(model_ref, dev)
    if not resume:  # a bad --reduction/--rank fails now, not after minutes of generating training text
        check_plan(model, reduction=reduction, pattern=pattern, module_set=modules, rank=rank, group=group, criterion=criterion)
    train_w, held_w, chat, free = training_text(model, tok, data, self_chat, self_text, cfg, ckpt, dev, eval_windows,
                                                progress)

    plan: SharePlan | None = None
    if resume and ckpt.is_dir() and _checkpoints(ckpt):
        plan = SharePlan.model_validate(torch.load(_checkpoints(ckpt)[-1], map_location="cpu", weights_only=False)["plan"])
        log.info("resuming: plan taken from the checkpoint")
    if plan is None:
        plan = make_plan(
            model, reduction=reduction, pattern=pattern, module_set=modules, rank=rank, group=group, criterion=criterion,
            calib=train_w[:calib_windows], progress=progress,
        )
    teacher = teacher_logprobs(model, held_w, EVAL_BATCH)  # the original's, before the plan touches the model
    apply_plan(model, plan, keep_original=True, delta_dtype=torch.float32)
    before = evaluate(model, held_w)
    kl_before = batched_kl(model, held_w, teacher, EVAL_BATCH)
    summary = train_deltas(model, plan, train_w, cfg, ckpt_dir=ckpt, resume=resume, progress=progress)
    finalize(model)
    kl_after = batched_kl(model, held_w, teacher, EVAL_BATCH)
    after = evaluate(model, held_w)
    params = unique_param_count(model)
    info = {
        "source": str(model_ref),
        "data": str(data) if data else "python-stdlib-docs",
        "self_chat_samples": len(chat),
        "self_text_samples": len(free),
        "train_config": cfg.model_dump(),
        "training": summary,
        "eval_heldout": {
            "windows": len(held_w), "seq_len": cfg.seq_len,
            "kl_svd_init": kl_before, "kl_trained": kl_after, "ppl_svd_init": before["ppl"], "ppl_trained": after["ppl"],
        },
        "seconds": time.perf_counter() - t_start,
    }
    save_shared(model, plan, out, source_dir=src_dir, tokenizer=tok, info=info, overwrite=overwrite)
    if export_dense:
        write_dense(model, export_dense, source_dir=src_dir, overwrite=overwrite)
    if not keep_checkpoints and ckpt.is_dir():
        shutil.rmtree(ckpt, ignore_errors=True)
    return {"path": str(out), "params": plan.params.model_dump(), "in_memory_params": params, **info}



DEFAULT_HEAL_LR = 3e-4  # the block learning rate that did best for DeltaLLM (docs/share.md); the bench heals at it


def drop_and_heal(
    model_ref: str | os.PathLike,
    out: str | os.PathLike,
    *,
    reduction: float = 0.12,
    heal_lr: float = DEFAULT_HEAL_LR,
    data: str | os.PathLike | None = None,
    self_chat: int = 1024,
    self_text: int | None = None,
    train: TrainConfig | None = None,
    device: str = "auto",
    calib_windows: int = 16,
    eval_windows: int = 32,
    resume: bool = False,
    ckpt_dir: str | os.PathLike | None = None,
    keep_checkpoints: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Drop MODEL's blocks of lowest Block Influence until at least `reduction` of its parameters are gone (whole
    blocks: the exact count is reported), heal every remaining block weight by distillation from the original
    (`train`'s budget and schedule, block weights at `heal_lr`), and write a plain HF checkpoint at `out` with
    deltapack_layerdrop.json beside it. Returns that summary."""
    cfg = train or TrainConfig()
    out = Path(out)
    _outputs_free(out, overwrite, inputs=(model_ref, data))
    if not 0 < reduction < 1:
        raise InputError(f"--reduction must be in (0, 1), got {reduction}")
    if heal_lr <= 0:
        raise InputError(f"--heal-lr must be > 0, got {heal_lr}")
    ckpt = Path(ckpt_dir) if ckpt_dir else out.with_name(out.name + ".ckpt")
    dev = pick_device(device)
    t_start = time.perf_counter()
    original, tok, src_dir = load_original(model_ref, dev)
    orig_params = unique_param_count(original)
    max_params = orig_params - math.ceil(reduction * orig_params)
    train_w, held_w, chat, free = training_text(original, tok, data, self_chat, self_text, cfg, ckpt, dev, eval_windows,
                                                progress)
    dropped, drop = layer_drop_model(original, train_w[:calib_windows], max_params)
    # the original stays intact beside the dropped copy: it is the teacher here, as in the benchmark (no stored
    # log-probabilities, which share() needs because it rebuilds the original in place)
    before = evaluate(dropped, held_w, teacher=original, batch=EVAL_BATCH)
    summary = heal_layer_drop(dropped, original, train_w, cfg, lr=heal_lr, progress=progress, ckpt_dir=ckpt,
                              resume=resume, ckpt_meta={"dropped": drop["dropped"]})
    after = evaluate(dropped, held_w, teacher=original, batch=EVAL_BATCH)
    params = unique_param_count(dropped)
    info = {
        "format": "deltapack-layerdrop", "version": 1, "method": "layerdrop-healed",
        "source": str(model_ref),
        "dropped_blocks": drop["dropped"], "block_influence": drop["block_influence"],
        "num_layers": {"original": len(drop["block_influence"]), "kept": len(drop["block_influence"]) - len(drop["dropped"])},
        "params": {"original": orig_params, "final": params, "removed": orig_params - params,
                   "reduction_target": reduction, "reduction": (orig_params - params) / orig_params},
        "data": str(data) if data else "python-stdlib-docs",
        "self_chat_samples": len(chat), "self_text_samples": len(free),
        "train_config": cfg.model_dump(), "heal_lr": heal_lr,
        "training": {k: v for k, v in summary.items() if k != "local_fit"},
        "eval_heldout": {"windows": len(held_w), "seq_len": cfg.seq_len, "kl_dropped": before["kl"], "kl_healed": after["kl"],
                         "ppl_dropped": before["ppl"], "ppl_healed": after["ppl"]},
        "seconds": time.perf_counter() - t_start,
    }
    save_dropped(dropped, out, source_dir=src_dir, info=info, overwrite=overwrite)
    if not keep_checkpoints and ckpt.is_dir():
        shutil.rmtree(ckpt, ignore_errors=True)
    return {"path": str(out), **info}
