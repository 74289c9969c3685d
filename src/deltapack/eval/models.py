"""Loading the models an evaluation compares, in memory.

A target is either a delta directory (it holds the deltapack manifest): rebuilt in process from BASE + DELTA with
`deltapack.api.load_merged`, no dense copy written; or anything `open_model` resolves (an HF checkpoint directory such
as a merged one, a .gguf file, a hub id): loaded by transformers from its local files.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from deltapack.errors import InputError

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    kind: str  # "delta" | "checkpoint"
    ref: str


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA (what the models are stored in), fp32 on CPU (faster there, and exact enough to compare)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32")
    return DTYPES[dtype]


def is_delta_dir(path: str | os.PathLike) -> bool:
    from deltapack.format.manifest import MANIFEST_NAME

    return (Path(path) / MANIFEST_NAME).is_file()


def _load_tokenizer(*dirs: Path):
    from transformers import AutoTokenizer

    for d in dirs:
        if d is not None and any((d / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return AutoTokenizer.from_pretrained(str(d))
    raise InputError(f"no tokenizer found in {', '.join(str(d) for d in dirs if d is not None)}")


def load_checkpoint(ref: str | os.PathLike, *, device: torch.device, dtype: torch.dtype, tokenizer_fallback: str | os.PathLike | None = None) -> LoadedModel:
    """An HF checkpoint (directory, .gguf or hub id) as (model, tokenizer) on `device`."""
    from transformers import AutoModelForCausalLM

    from deltapack.io.sources import open_model

    src = open_model(ref)
    fallback = open_model(tokenizer_fallback).path if tokenizer_fallback is not None else None
    tok = _load_tokenizer(src.path, fallback)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(src.path), dtype=dtype)
    except (OSError, ValueError) as e:
        raise InputError(f"transformers cannot load {ref}: {e}") from e
    return LoadedModel(model.to(device).eval(), tok, "checkpoint", str(ref))


def load_target(base: str | os.PathLike, target: str | os.PathLike, *, device: torch.device, dtype: torch.dtype,
                verify_base: bool = True) -> LoadedModel:
    """TARGET as a model: a delta dir rebuilt against BASE in memory, or a plain checkpoint (e.g. a merged dir)."""
    if is_delta_dir(target):
        from deltapack.api import load_merged

        model, tok = load_merged(base, target, device=device, dtype=dtype, verify_base=verify_base)
        return LoadedModel(model.eval(), tok, "delta", str(target))
    return load_checkpoint(target, device=device, dtype=dtype, tokenizer_fallback=base)


def release_memory() -> None:
    """Collect dropped models and return cached CUDA memory (several models pass through one process)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
