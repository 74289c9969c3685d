"""Cold start of the Triton backend: kernel variants compiled in the background, in parallel, cached on disk.

Triton compiles a kernel once per specialisation (its constexprs and the classes of its arguments), seconds each,
on first launch. A server with a few codecs needs dozens of variants; compiled on first use they held the first
requests for minutes (issue 26). Here instead:

  * `KernelCompiler.ready(variant)` is asked before every launch. A compiled variant launches; an unknown one is
    queued for compilation on a pool of worker threads (several compile at once: Triton's passes and ptxas run
    outside the GIL for most of the time) and the caller computes that launch's result on the pure-torch path
    (`deltapack.kernels.triton.layouts.layout_linear`) meanwhile. Each launch switches to Triton as soon as its own
    variant is ready: no global barrier.
  * `blocking()`: inside it (CUDA-graph capture, whose launches must be Triton's) a missing variant is compiled in
    the caller and waited for, as before.
  * A variant whose compilation fails stays on the torch path (logged once), so a compiler problem costs speed, not
    answers.
  * Progress goes to a callback (the CLI prints it): how many variants are queued, compiling and ready, and the
    time since the first was queued.
  * `setup_cache_dir()`: Triton's on-disk cache goes to ~/.cache/deltapack/triton/<GPU>-triton<v>-torch<v>-
    deltapack<v> unless TRITON_CACHE_DIR is set, so that a restart finds its kernels (and a new GPU, Triton, torch or
    deltapack version does not pick up stale ones).

This module imports no triton at module level: the compile function is injected (tests mock it).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One specialisation of one kernel: `key` identifies it (hashable), `what` describes it for progress lines,
    `launch` (not part of the identity) compiles it when called with warmup semantics."""

    key: tuple
    what: str
    launch: Callable[[], object] | None = field(default=None, compare=False, hash=False, repr=False)


def arg_class(a) -> tuple:
    """What Triton specialises an argument on: a tensor's dtype and 16-byte alignment, an int's value being 1 or a
    multiple of 16 (or past int32), a float's type; anything else (constexprs) by value."""
    if hasattr(a, "data_ptr") and hasattr(a, "dtype"):
        return ("t", str(a.dtype), a.data_ptr() % 16 == 0)
    if isinstance(a, bool):
        return ("b", a)
    if isinstance(a, int):
        return ("i", a == 1, a % 16 == 0, abs(a) >= 2**31)
    if isinstance(a, float):
        return ("f",)
    return ("c", str(a))


class KernelCompiler:
    """Background compilation of kernel variants (see the module docstring). Thread-safe."""

    def __init__(self, workers: int = 4, *, progress: Callable[[str], None] | None = None,
                 progress_every_s: float = 5.0, compile_fn: Callable[[Variant], object] | None = None):
        self.workers = max(1, int(workers))
        self.compile_fn = compile_fn  # default: call the variant's own `launch` (tests inject a mock)
        self.progress = progress
        self.progress_every_s = progress_every_s
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="deltapack-compile")
        self._lock = threading.Condition()
        self._ready: set[tuple] = set()
        self._failed: dict[tuple, str] = {}
        self._pending: dict[tuple, Future] = {}
        self._what: dict[tuple, str] = {}
        self._started: float | None = None
        self._last_report = 0.0
        self._finished_at: float | None = None
        self._local = threading.local()
        self.compile_s = 0.0  # summed over variants (parallel compiles overlap: more than the wall time)

    # -- queries --
    def ready(self, v: Variant) -> bool:
        """True when `v` may be launched now. Otherwise it is queued (once) and the caller takes the torch path; in
        blocking mode it is compiled (or its queued compilation waited for) first."""
        with self._lock:
            if v.key in self._ready:
                return True
            if v.key in self._failed:
                return False
            fut = self._pending.get(v.key)
            if fut is None:
                fut = self._submit(v)
        if getattr(self._local, "blocking", 0):
            fut.exception()  # wait; a failure is recorded by the job itself
            with self._lock:
                return v.key in self._ready
        return False

    def _submit(self, v: Variant) -> Future:
        if self._started is None or not self._pending:
            if self._started is None or self._finished_at is not None:
                self._started = time.monotonic()
            self._finished_at = None
        self._what[v.key] = v.what
        fut = self._pool.submit(self._job, v)
        self._pending[v.key] = fut
        return fut

    def _job(self, v: Variant) -> None:
        t0 = time.monotonic()
        err = None
        try:
            if self.compile_fn is not None:
                self.compile_fn(v)
            elif v.launch is not None:
                v.launch()
        except Exception as e:  # noqa: BLE001  (any compiler error: that variant stays on the torch path)
            err = f"{e.__class__.__name__}: {e}"
            log.error("kernel %s failed to compile, served on the pure-torch path: %s", v.what, err)
        with self._lock:
            self.compile_s += time.monotonic() - t0
            self._pending.pop(v.key, None)
            if err is None:
                self._ready.add(v.key)
            else:
                self._failed[v.key] = err
            if not self._pending:
                self._finished_at = time.monotonic()
            self._lock.notify_all()
        self._report(final=not self.pending)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def settled(self) -> bool:
        """Nothing queued or compiling: every variant asked for so far is ready (or failed)."""
        return self.pending == 0

    def status(self) -> dict:
        with self._lock:
            now = self._finished_at if (self._finished_at and not self._pending) else time.monotonic()
            return {
                "ready": len(self._ready), "compiling": len(self._pending), "failed": len(self._failed),
                "elapsed_s": round(now - self._started, 2) if self._started is not None else 0.0,
                "workers": self.workers,
            }

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing is pending (True) or `timeout` seconds pass (False)."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._pending:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(left if left is not None else 1.0)
        return True

    @contextmanager
    def blocking(self):
        """Missing variants are compiled before `ready` answers (CUDA-graph capture: no torch path inside)."""
        self._local.blocking = getattr(self._local, "blocking", 0) + 1
        try:
            yield
        finally:
            self._local.blocking -= 1

    def _report(self, final: bool = False) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if not final and now - self._last_report < self.progress_every_s:
            return
        self._last_report = now
        s = self.status()
        with self._lock:
            busy = [self._what[k] for k in list(self._pending)[:3]]
        if final:
            msg = (f"kernels: {s['ready']} variants ready ({s['failed']} failed) after {s['elapsed_s']:.1f} s, "
                   f"{self.workers} compile threads")
        else:
            msg = (f"kernels: compiling {s['compiling']} variants ({s['ready']} ready, {s['failed']} failed), "
                   f"{s['elapsed_s']:.1f} s; serving on the pure-torch path meanwhile; now: {'; '.join(busy)}")
        try:
            self.progress(msg)
        except Exception:  # noqa: BLE001  (a broken console must not stop compilation)
            log.debug("progress callback failed", exc_info=True)

    def start_reporter(self) -> threading.Thread:
        """A daemon thread calling the progress callback every progress_every_s while variants are pending."""

        def loop():
            while True:
                time.sleep(self.progress_every_s)
                if self.pending:
                    self._report()

        t = threading.Thread(target=loop, name="deltapack-compile-progress", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# ---- on-disk cache ------------------------------------------------------------------------------------------------
def cache_key(gpu: str, triton_version: str, torch_version: str, deltapack_version: str) -> str:
    """Directory name of one compiled-kernel cache: every input that invalidates a compiled kernel."""
    raw = f"{gpu}-triton{triton_version}-torch{torch_version}-deltapack{deltapack_version}"
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", raw).strip("_")


def default_cache_dir(gpu: str, triton_version: str, torch_version: str, deltapack_version: str,
                      home: str | Path | None = None) -> Path:
    base = Path(home) if home is not None else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "deltapack" / "triton" / cache_key(gpu, triton_version, torch_version, deltapack_version)


def setup_cache_dir(device=None) -> str | None:
    """Point Triton's cache at deltapack's per-GPU, per-version directory unless TRITON_CACHE_DIR is set (the
    user's choice wins). Must run before the first compilation. Returns the directory in use (None: unknown)."""
    if os.environ.get("TRITON_CACHE_DIR"):
        return os.environ["TRITON_CACHE_DIR"]
    import torch
    import triton

    from deltapack import __version__

    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    gpu = torch.cuda.get_device_name(torch.device(device))
    path = default_cache_dir(gpu, triton.__version__, torch.__version__, __version__)
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = str(path)
    log.info("Triton kernel cache: %s", path)
    return str(path)


__all__ = ["Variant", "KernelCompiler", "arg_class", "cache_key", "default_cache_dir", "setup_cache_dir"]
