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

__all__ = ["METHODS", "DeltaMethod", "Encoded", "TensorJob", "TensorStat", "get_method", "method_table", "register_method"]
