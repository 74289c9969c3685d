"""lm-evaluation-harness on an in-memory model (e.g. a fine-tune rebuilt from a delta, never written to disk).

    from deltapack.api import load_merged
    from deltapack.eval.harness import run_lm_eval
    model, tok = load_merged(base, delta, device="cuda")
    res = run_lm_eval(model, tok, ["hellaswag"], limit=200)          # res["results"]["hellaswag"]["acc,none"]
    res = run_lm_eval(model, tok, ["my_task"], include_path="tasks/")  # local YAML task definitions

lm-eval is an optional dependency (`pip install 'deltapack[eval]'`); it is imported only when called.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Sequence

from deltapack.errors import DeltapackError, InputError

log = logging.getLogger(__name__)


def _jsonable(obj: Any) -> Any:
    """lm-eval result dicts hold numpy scalars, NaN and the odd object: keep what JSON can say."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, (int, float)):
        return None if isinstance(obj, float) and not math.isfinite(obj) else obj
    item = getattr(obj, "item", None)
    if callable(item):
        try:
            return _jsonable(item())
        except (TypeError, ValueError):
            pass
    return str(obj)


def hflm(model, tok, *, batch_size: int | str = 8, max_length: int | None = None):
    """Wrap an in-memory transformers model + tokenizer as lm-eval's HFLM."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise DeltapackError("lm-eval is not installed: pip install 'deltapack[eval]' (or pip install lm-eval)") from e
    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=max_length)


def run_lm_eval(
    model,
    tok,
    tasks: Sequence[str],
    *,
    include_path: str | os.PathLike | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 8,
    apply_chat_template: bool = False,
    max_length: int | None = None,
    seed: int = 0,
    include_defaults: bool = True,
) -> dict:
    """Run lm-eval `tasks` (registry names, or names defined by YAML files under `include_path`) on the model.

    `include_defaults=False` skips indexing lm-eval's thousands of built-in task files (only `include_path`'s tasks
    are then known; much faster to start). Returns {"results": {task: {metric: value}}, "n_samples": ..., "configs": {task: {...}}} (JSON-safe).
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise DeltapackError("lm-eval is not installed: pip install 'deltapack[eval]' (or pip install lm-eval)") from e
    if not tasks:
        raise InputError("no lm-eval tasks given")
    if include_path is not None and not os.path.isdir(include_path):
        raise InputError(f"lm-eval include path is not a directory: {include_path}")
    manager = TaskManager(
        include_path=str(include_path) if include_path is not None else None, include_defaults=include_defaults
    )
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise InputError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    lm = hflm(model, tok, batch_size=batch_size, max_length=max_length)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        apply_chat_template=apply_chat_template,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if out is None:  # non-zero ranks under torch.distributed
        return {}
    configs = {
        name: {k: cfg.get(k) for k in ("task", "output_type", "num_fewshot", "metric_list") if k in cfg}
        for name, cfg in (out.get("configs") or {}).items()
    }
    return {"results": _jsonable(out.get("results", {})), "n_samples": _jsonable(out.get("n-samples", {})), "configs": _jsonable(configs)}
