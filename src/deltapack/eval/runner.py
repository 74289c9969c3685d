"""`deltapack eval` as a function: one report dict from BASE + (DELTA | MERGED_DIR), task files, an optional reference
fine-tune, perplexity text and lm-eval tasks. At most two models are in memory at once (target and reference)."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from deltapack.errors import InputError
from deltapack.eval.metrics import exact_match, kl_to_reference, perplexity
from deltapack.eval.models import is_delta_dir, load_checkpoint, load_target, release_memory, resolve_dtype
from deltapack.eval.tasks import Task, load_tasks, use_chat

log = logging.getLogger(__name__)


def _task_scores(model, tok, tasks: Sequence[Task], *, max_new_tokens, batch_size, first_line, chat, keep_predictions, progress) -> dict:
    out = {}
    for t in tasks:
        em = exact_match(model, tok, t.examples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         first_line=first_line, chat=chat, progress=progress)
        out[t.name] = em.summary(keep_predictions)
        log.info("%s: accuracy %.4f (%d/%d)", t.name, em.accuracy, em.correct, em.total)
    return out


def evaluate(
    base: str | os.PathLike,
    target: str | os.PathLike,
    *,
    tasks: Sequence[str | os.PathLike] = (),
    reference: str | os.PathLike | None = None,
    ppl_text: str | os.PathLike | None = None,
    device: str = "auto",
    dtype: str | torch.dtype | None = "auto",
    max_new_tokens: int | None = None,
    batch_size: int = 32,
    first_line: bool = False,
    chat: bool | None = None,
    limit: int | None = None,
    kl_limit: int | None = None,
    base_accuracy: bool = False,
    ppl_seq_len: int = 512,
    ppl_max_tokens: int | None = None,
    lm_eval_tasks: Sequence[str] = (),
    lm_eval_include: str | os.PathLike | None = None,
    lm_eval_limit: int | float | None = None,
    lm_eval_defaults: bool = True,
    keep_predictions: int = 5,
    verify_base: bool = True,
    progress: bool = True,
    numerics: str = "served",
) -> dict:
    """Evaluate TARGET (a delta dir rebuilt against BASE in memory, or a checkpoint dir) and return a report dict."""
    from deltapack.compress import resolve_device

    if not tasks and ppl_text is None and not lm_eval_tasks:
        raise InputError("nothing to evaluate: give --tasks, --ppl-text or --lm-eval")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    task_list = [t.head(limit) for t in load_tasks(tasks)]
    text = None
    if ppl_text is not None:
        if not Path(ppl_text).is_file():
            raise InputError(f"perplexity text not found: {ppl_text}")
        text = Path(ppl_text).read_text(encoding="utf-8")
    t0 = time.perf_counter()
    score = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, first_line=first_line, chat=chat,
                 keep_predictions=keep_predictions, progress=progress)
    report: dict = {
        "base": str(base),
        "target": str(target),
        "target_kind": "delta" if is_delta_dir(target) else "checkpoint",
        "reference": str(reference) if reference is not None else None,
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "dtype": str(dt).replace("torch.", ""),
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "settings": {"max_new_tokens": max_new_tokens or "auto", "first_line": first_line, "chat": chat,
                     "batch_size": batch_size, "limit": limit, "kl_limit": kl_limit},
        "tasks": {t.name: {"n": len(t.examples), "file": str(t.path)} for t in task_list},
    }
    if report["target_kind"] == "delta":
        from deltapack.api import inspect as inspect_delta

        info = inspect_delta(target)
        report["delta"] = {k: info[k] for k in ("method", "method_params", "target_ratio", "true_ratio", "nominal_ratio", "total_bytes")}

    if base_accuracy and task_list:
        b = load_checkpoint(base, device=dev, dtype=dt)
        for name, s in _task_scores(b.model, b.tokenizer, task_list, **score).items():
            report["tasks"][name]["base"] = s
        del b
        release_memory()

    ref = None
    if reference is not None:
        ref = load_checkpoint(reference, device=dev, dtype=dt, tokenizer_fallback=base)
        for name, s in _task_scores(ref.model, ref.tokenizer, task_list, **score).items():
            report["tasks"][name]["reference"] = s
        if text is not None:
            report.setdefault("perplexity", {"file": str(ppl_text)})["reference"] = perplexity(
                ref.model, ref.tokenizer, text, seq_len=ppl_seq_len, max_tokens=ppl_max_tokens, progress=progress
            ).summary()

    tgt = load_target(base, target, device=dev, dtype=dt, verify_base=verify_base, numerics=numerics)
    report["numerics"] = numerics if tgt.kind == "delta" else None
    for name, s in _task_scores(tgt.model, tgt.tokenizer, task_list, **score).items():
        entry = report["tasks"][name]
        entry["model"] = s
        if "reference" in entry:
            ra = entry["reference"]["accuracy"]
            entry["kept"] = s["accuracy"] / ra if ra > 0 else None
    if ref is not None:
        chat_used = use_chat(tgt.tokenizer, chat)
        for t in task_list:
            kl = kl_to_reference(tgt.model, ref.model, tgt.tokenizer, t.head(kl_limit).examples, chat=chat_used,
                                 progress=progress)
            report["tasks"][t.name]["kl"] = kl.summary()
            log.info("%s: KL(ref||model) %.5f nats/token over %d tokens", t.name, kl.kl, kl.tokens)
        del ref
        release_memory()
    if text is not None:
        report.setdefault("perplexity", {"file": str(ppl_text)})["model"] = perplexity(
            tgt.model, tgt.tokenizer, text, seq_len=ppl_seq_len, max_tokens=ppl_max_tokens, progress=progress
        ).summary()
    if lm_eval_tasks:
        from deltapack.eval.harness import run_lm_eval

        report["lm_eval"] = run_lm_eval(tgt.model, tgt.tokenizer, lm_eval_tasks, include_path=lm_eval_include,
                                        limit=lm_eval_limit, include_defaults=lm_eval_defaults)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report
