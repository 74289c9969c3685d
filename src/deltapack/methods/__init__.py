"""Compression methods, one file each, registered by name (see `deltapack methods`)."""

import importlib
import logging

from deltapack.methods.base import METHODS, DeltaMethod, Encoded, TensorJob, TensorStat, get_method, method_table, register_method

# core methods
from deltapack.methods import bitdelta, dare, lossless, lowrank, raw  # noqa: F401,E402

# paper methods live in their own files; a missing optional file must not break the core
for _mod in ("delta_come", "deltadq", "auto"):
    try:
        importlib.import_module(f"deltapack.methods.{_mod}")
    except ModuleNotFoundError as e:  # pragma: no cover
        if e.name != f"deltapack.methods.{_mod}":
            raise
        logging.getLogger(__name__).debug("method module %s not present", _mod)

# One encoding per stored codec and variant (quantized and float): what the integrity tests and the robustness bench
# (bench/robustness/files.py) put through every reader, so a new codec is covered everywhere by one line here.
# name -> (method, params, lossy); lossy ones are compressed at the caller's ratio.
CODEC_VARIANTS: dict[str, tuple[str, dict, bool]] = {
    "dense_exact": ("dense-exact", {}, False),
    "lowrank": ("lowrank", {}, True),
    "bitdelta": ("bitdelta", {"scale": "row"}, True),
    "dare_bf16": ("dare", {"bits": 16}, True),
    "dare_4bit": ("dare", {"bits": 4}, True),
    "deltadq": ("deltadq", {"calibrate": False}, True),
    "deltadq_split": ("deltadq", {"calibrate": False, "split_bits": 1}, True),
    "delta_come": ("delta-come", {"quantizer": "rtn"}, True),
    "lossless": ("lossless", {}, False),
}

__all__ = ["CODEC_VARIANTS", "METHODS", "DeltaMethod", "Encoded", "TensorJob", "TensorStat", "get_method", "method_table", "register_method"]
