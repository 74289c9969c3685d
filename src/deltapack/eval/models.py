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


NUMERICS = ("served", "merged")


def load_served(base: str | os.PathLike, target: str | os.PathLike, *, device: torch.device, dtype: torch.dtype,
                verify_base: bool = True) -> LoadedModel:
    """A delta computed as `deltapack serve` computes it: the base model wrapped with the serving kernels, every
    token of every forward given the delta's tenant slot (base(x) + delta(x), the delta never merged or rounded)."""
    from deltapack.serve.model import BatchContext, ModelRunner
    from deltapack.serve.tiers import DeltaTiers

    runner = ModelRunner(base, device=device, dtype=dtype)
    tiers = DeltaTiers(runner, device_bytes=1 << 62, host_bytes=1 << 62)
    t = tiers.register("target", target, verify_base=verify_base)
    tiers.acquire(t)
    runner.state.ctx = _WholeBatch(t.slot, runner.device)
    tok = t.tokenizer if t.tokenizer is not None else runner.tokenizer
    model = runner.model.eval()
    model._deltapack_tiers = tiers  # keeps the resident delta (and any scratch copy) alive with the model
    return LoadedModel(model, tok, "delta", str(target))


class _WholeBatch:
    """A BatchContext for any batch shape whose every token is one tenant's (eval runs one model at a time)."""

    def __init__(self, slot: int, device):
        from deltapack.kernels import TokenSlots

        self.slot, self.device, self.any = slot, device, True
        self._ts = TokenSlots
        self._cache: dict[int, object] = {}

    def tokens(self, n: int):
        ts = self._cache.get(n)
        if ts is None:
            ts = self._cache[n] = self._ts.from_rows([self.slot], n, self.device)
        return ts


def load_target(base: str | os.PathLike, target: str | os.PathLike, *, device: torch.device, dtype: torch.dtype,
                verify_base: bool = True, numerics: str = "merged") -> LoadedModel:
    """TARGET as a model: a delta dir rebuilt against BASE in memory, or a plain checkpoint (e.g. a merged dir).
    `numerics` (delta dirs only): "merged" = the weights `deltapack merge` writes (base + delta rounded to the
    fine-tune's dtype), then cast to `dtype`; "served" = what `deltapack serve` computes (`load_served`)."""
    if numerics not in NUMERICS:
        raise InputError(f"unknown numerics {numerics!r}; use served or merged")
    if is_delta_dir(target) and numerics == "served":
        return load_served(base, target, device=device, dtype=dtype, verify_base=verify_base)
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
