"""Saving and loading a shared model, and the dense export.

Directory layout (written atomically):
  share.json          the plan (which block uses which anchor, ranks, criterion table, exact parameter counts) and
                      training/report information
  shared.safetensors  every unique tensor once: intact weights under their usual names, each dependent's deltas as
                      `<module>.delta_a` (out×r) / `<module>.delta_b` (r×in); no anchor copies, tied lm_head once
  config.json, generation_config.json, tokenizer files   copied from the original checkpoint

The weights file is deliberately not called model.safetensors: transformers alone cannot build the shared
structure, so it must not half-load it. `load_shared(path)` does; `export_dense` writes a plain HF checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from deltapack.errors import FormatError, InputError
from deltapack.io.safetensors_file import SafetensorsFile
from deltapack.io.sources import CONFIG_FILES, TOKENIZER_FILES
from deltapack.io.writer import AtomicDir, write_bytes_atomic, write_json_atomic, write_weights
from deltapack.share.model import apply_plan, dense_state_dict, finalize, shared_linears
from deltapack.share.plan import SharePlan, unique_param_count

log = logging.getLogger(__name__)

WEIGHTS = "shared.safetensors"
MANIFEST = "share.json"


def _unique_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    if any(m.original is not None for m in shared_linears(model).values()):
        raise RuntimeError("finalize() the model before saving (original weights still attached)")
    # named_parameters() yields each Parameter once (tied embeddings once); anchors are not in the tree twice
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()}


def copy_aux_files(src: Path | None, dest: Path) -> None:
    if src is None:
        return
    for name in CONFIG_FILES + TOKENIZER_FILES:
        p = Path(src) / name
        if p.is_file():
            shutil.copyfile(p, dest / name)


def save_shared(
    model: torch.nn.Module,
    plan: SharePlan,
    out: str | os.PathLike,
    *,
    source_dir: str | os.PathLike | None = None,
    tokenizer=None,
    info: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the shared model. `source_dir`: the original checkpoint (config/tokenizer files copied from it)."""
    tensors = _unique_tensors(model)
    on_disk_params = sum(t.numel() for t in tensors.values())
    in_memory = unique_param_count(model)
    if on_disk_params != in_memory or in_memory != plan.params.final:
        raise FormatError(f"parameter accounting mismatch: plan {plan.params.final}, memory {in_memory}, file {on_disk_params}")
    with AtomicDir(out, overwrite=overwrite) as tmp:
        data = st_save(tensors, metadata={"format": "pt", "deltapack": "share"})
        write_bytes_atomic(tmp / WEIGHTS, data)
        copy_aux_files(Path(source_dir) if source_dir else None, tmp)
        if not (tmp / "config.json").exists():
            model.config.to_json_file(str(tmp / "config.json"))
        if tokenizer is not None and not (tmp / "tokenizer_config.json").exists():
            tokenizer.save_pretrained(str(tmp))
        manifest = {
            "plan": plan.model_dump(),
            "params": {"on_disk": on_disk_params, "in_memory": in_memory, "weights_bytes": len(data)},
            **(info or {}),
        }
        write_json_atomic(tmp / MANIFEST, manifest)
    log.info("wrote %s: %d parameters, %.2f MB", out, on_disk_params, len(data) / 1e6)
    return Path(out)


def read_manifest(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not (p / MANIFEST).is_file() or not (p / WEIGHTS).is_file():
        raise InputError(f"{p} is not a deltapack share directory (needs {MANIFEST} and {WEIGHTS})")
    try:
        return json.loads((p / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{p / MANIFEST} is not valid JSON: {e}") from e


def load_shared(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) of a shared model directory; the model runs `generate`. Tokenizer is None if absent."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from deltapack.api import _no_init

    p = Path(path)
    man = read_manifest(p)
    plan = SharePlan.model_validate(man["plan"])
    config = AutoConfig.from_pretrained(str(p))
    try:
        weights = SafetensorsFile(p / WEIGHTS)
        sd = {k: weights.get(k) for k in weights.keys()}
    except InputError as e:
        raise FormatError(f"{p / WEIGHTS} is missing, truncated or corrupt: {e}") from e
    if not sd:
        raise FormatError(f"{p / WEIGHTS} holds no tensors")
    file_dtype = next(iter(sd.values())).dtype
    with _no_init(), torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=file_dtype)
    apply_plan(model, plan, init="zeros", keep_original=False)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    model.tie_weights()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [n for n in missing if not (tied and "lm_head" in n)]
    if missing or unexpected:
        raise FormatError(f"{p / WEIGHTS} does not fit its plan: missing {missing[:3]}, unexpected {unexpected[:3]}")
    finalize(model)
    if dtype is not None:
        model.to(dtype)
    model.eval()
    if (p / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(p))
    tok = AutoTokenizer.from_pretrained(str(p)) if (p / "tokenizer_config.json").is_file() or (p / "tokenizer.json").is_file() else None
    return model, tok


def export_dense(
    model_or_path, out: str | os.PathLike, *, source_dir: str | os.PathLike | None = None, overwrite: bool = False,
    max_shard_bytes: int = 2 << 30,
) -> Path:
    """A plain HF checkpoint (W_l = W_a + A_l·B_l materialised) that transformers loads on its own.
    `model_or_path`: a share directory, or an in-memory shared model (then config/tokenizer come from
    `source_dir` when given)."""
    src_dir = Path(source_dir) if source_dir else None
    if isinstance(model_or_path, (str, os.PathLike)):
        src_dir = Path(model_or_path)
        model, _ = load_shared(src_dir)
    else:
        model = model_or_path
    return _write_plain_checkpoint(model, out, src_dir, overwrite=overwrite, max_shard_bytes=max_shard_bytes)


def _write_plain_checkpoint(model: torch.nn.Module, out: str | os.PathLike, src_dir: Path | None, *, overwrite: bool,
                            max_shard_bytes: int, own_config: bool = False, extra_json: dict[str, dict] | None = None) -> Path:
    """Weights (dense_state_dict: shared linears materialised, tied weights once), the source's config/tokenizer
    files, and `extra_json` files, written atomically. `own_config`: the model's config replaces the source's (a
    model whose structure changed); otherwise it is written only where the source gave none."""
    sd = dense_state_dict(model)
    with AtomicDir(out, overwrite=overwrite) as tmp:
        write_weights(tmp, [(n, sd[n].dtype, tuple(sd[n].shape)) for n in sorted(sd)], sd.__getitem__,
                      max_shard_bytes=max_shard_bytes)
        copy_aux_files(src_dir, tmp)
        if own_config or not (tmp / "config.json").exists():
            model.config.to_json_file(str(tmp / "config.json"))
        for name, obj in (extra_json or {}).items():
            write_json_atomic(tmp / name, obj)
    return Path(out)


LAYERDROP_INFO = "deltapack_layerdrop.json"


def save_dropped(model: torch.nn.Module, out: str | os.PathLike, *, source_dir: str | os.PathLike | None, info: dict,
                 overwrite: bool = False, max_shard_bytes: int = 2 << 30) -> Path:
    """A layer-dropped (and healed) model as a plain HF checkpoint that transformers loads on its own; `info` (the
    dropped blocks, Block Influence, parameter counts, training) beside it as deltapack_layerdrop.json. The config is
    the model's, not the source's: it has fewer layers."""
    return _write_plain_checkpoint(model, out, Path(source_dir) if source_dir else None, overwrite=overwrite,
                                   max_shard_bytes=max_shard_bytes, own_config=True, extra_json={LAYERDROP_INFO: info})
