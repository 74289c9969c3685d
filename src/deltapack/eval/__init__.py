"""Evaluating rebuilt fine-tunes in memory: exact-match accuracy on prompt/answer tasks, KL to the real fine-tune,
perplexity, plots, and lm-evaluation-harness on the in-memory model.

    from deltapack.eval import evaluate, load_task, exact_match, kl_to_reference, perplexity
    report = evaluate(base, "delta/", tasks=["math.jsonl"], reference="finetuned/", ppl_text="wiki.txt")

Names are imported lazily so that `deltapack --help` (which imports deltapack.eval.cli) does not load torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ExactMatch": "metrics", "KLResult": "metrics", "Perplexity": "metrics", "exact_match": "metrics",
    "greedy_generate": "metrics", "kl_to_reference": "metrics", "perplexity": "metrics",
    "LoadedModel": "models", "is_delta_dir": "models", "load_checkpoint": "models", "load_target": "models",
    "release_memory": "models", "resolve_dtype": "models",
    "evaluate": "runner",
    "Example": "tasks", "Task": "tasks", "answer_matches": "tasks", "encode_example": "tasks", "load_task": "tasks",
    "encode_examples": "tasks", "load_tasks": "tasks", "write_jsonl": "tasks",
    "run_lm_eval": "harness", "hflm": "harness",
    "plot_report": "plots",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"deltapack.eval.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'deltapack.eval' has no attribute {name!r}")
