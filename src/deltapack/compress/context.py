"""Run-wide facilities of a compress run: the device, the torch thread count (results depend on it), the manifest's
time stamp, phase timing for benchmarks, and `CompressContext`, the state a method sees while encoding."""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from deltapack.errors import DeltapackError
from deltapack.io.sources import ModelSource
from deltapack.methods.base import DeltaMethod, TensorStat

log = logging.getLogger("deltapack.compress")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeltapackError("--device cuda asked for, but no CUDA device is available")
    return torch.device(device)


def encode_threads() -> int:
    """Torch threads of the numerics (plan, encode, assemble): results depend on it, so it is fixed, 1 unless
    DELTAPACK_THREADS says otherwise (one thread is also the fast choice on a shared machine: no oversubscription).
    Parallelism comes from encoding several units at once (`compress --threads`, `compress-many --workers`)."""
    v = os.environ.get("DELTAPACK_THREADS", "").strip()
    if v:
        try:
            n = int(v)
        except ValueError:
            raise DeltapackError(f"DELTAPACK_THREADS must be a positive integer, got {v!r}") from None
        if n < 1:
            raise DeltapackError(f"DELTAPACK_THREADS must be a positive integer, got {v!r}")
        return n
    return 1


@contextlib.contextmanager
def pinned_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def created_stamp() -> str:
    """The manifest's `created`: now (UTC), or SOURCE_DATE_EPOCH when set (reproducible builds)."""
    sde = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if sde.isdigit():
        t = _dt.datetime.fromtimestamp(int(sde), _dt.timezone.utc)
    else:
        t = _dt.datetime.now(_dt.timezone.utc)
    return t.replace(microsecond=0).isoformat()


# ---- phase timing (benchmarks) -------------------------------------------------------------------------------------
class PhaseTimes(dict):
    """{phase: seconds}, plus `spans`: (phase, start, end) perf_counter times of the top-level phases."""

    def __init__(self):
        super().__init__()
        self.spans: list[tuple[str, float, float]] = []


_PHASES: contextvars.ContextVar[PhaseTimes | None] = contextvars.ContextVar("deltapack_phases", default=None)


@contextlib.contextmanager
def record_phases() -> Iterator[PhaseTimes]:
    """Seconds per phase of the compress runs inside the block, as {phase: seconds} ("plan", "prepare", "encode",
    "assemble"; sub-phases as "encode.quantize_a" etc., including methods' own). For benchmarks: while recording,
    phase edges synchronise the CUDA device so its queued work is charged to the phase that queued it."""
    d = PhaseTimes()
    token = _PHASES.set(d)
    try:
        yield d
    finally:
        _PHASES.reset(token)


def add_phase(name: str, seconds: float) -> None:
    d = _PHASES.get()
    if d is not None:
        d[name] = d.get(name, 0.0) + seconds


@contextlib.contextmanager
def phase(name: str, device: torch.device | None = None):
    """Charge the block's wall time to `name` when phases are being recorded (no cost otherwise)."""
    d = _PHASES.get()
    if d is None:
        yield
        return
    _sync(device)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _sync(device)
        t1 = time.perf_counter()
        d[name] = d.get(name, 0.0) + t1 - t0
        if "." not in name:
            d.spans.append((name, t0, t1))


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class CompressContext:
    """Shared state a method may use while encoding (device, sources, calibration)."""

    device: torch.device
    base: ModelSource
    finetuned: ModelSource
    method: DeltaMethod
    calib_path: str | None = None
    progress: bool = True
    stats: dict[str, TensorStat] = field(default_factory=dict)
    # method-owned scratch (e.g. calibration statistics). After `prepare`, a top-level entry that is a dict keyed by
    # tensor names is split per unit (each unit sees its own tensors' items); anything else is copied to every unit.
    # Keep per-tensor state in that shape, so a worker loads only its unit's share.
    cache: dict[str, Any] = field(default_factory=dict)
    # True when the state `prepare` leaves in `cache` is consumed by this same process (`compress`), never pickled to
    # another: device tensors may then stay on the device
    in_process: bool = False

    def calibration_texts(self) -> list[str]:
        if "calib_texts" not in self.cache:
            from deltapack.calib.data import load_calibration_texts

            self.cache["calib_texts"] = load_calibration_texts(self.calib_path)
        return self.cache["calib_texts"]

    def calibration_batches(self, seq_len: int, n_seqs: int) -> torch.Tensor:
        """(n, seq_len) token ids from the calibration text, tokenized with the fine-tune's tokenizer. A checkpoint
        without a tokenizer (test models) gets seeded random ids, unless the user passed --calib."""
        key = f"calib_ids:{seq_len}:{n_seqs}"
        if key not in self.cache:
            from deltapack.calib.data import token_batches

            try:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(self.finetuned.path))
            except Exception as e:
                if self.calib_path:
                    raise DeltapackError(f"--calib given but the fine-tune has no usable tokenizer: {e}") from e
                tok = None
            if tok is None:
                vocab = int(self.finetuned.config().get("vocab_size", 256))
                log.warning("no tokenizer next to the fine-tune: calibrating on seeded random token ids")
                ids = torch.randint(0, vocab, (n_seqs, seq_len), generator=torch.Generator().manual_seed(0))
                src = "random-token-ids"
            else:
                ids = token_batches(tok, self.calibration_texts(), seq_len, n_seqs)
                src = self.calib_path or "default:stdlib-docstrings"
            self.cache[key] = ids
            self.cache["calibration_record"] = {"source": str(src), "n_seqs": int(ids.shape[0]), "seq_len": seq_len, "tokens": int(ids.numel())}
        return self.cache[key]


