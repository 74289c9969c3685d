"""Where `deltapack serve`'s start-up time goes: one record per phase, logged as it ends and shown in /health.

    clock = StartupClock()          # the CLI makes it first thing; build_server / serve_forever add phases
    with clock.phase("base load"):
        ...
    clock.ready()                   # the HTTP socket listens: logs "ready in X s: imports a, base load b, ..."

Times are wall seconds. "imports" runs from the process start (read from /proc on Linux: the interpreter's own
start-up and `import deltapack.cli`, torch included, happen before any of our code runs) to the first phase; where
the process start is unknown it covers only the imports the serve command does itself. Phases that overlap (work
started in a thread and joined later) are recorded as the time the main path spent on them, so the phases add up
to the total.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")

log = logging.getLogger("deltapack.serve.startup")


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), or None where that cannot be read."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # the name field may hold spaces: split after it
        start_ticks = int(fields[19])  # field 22 of stat(5), counted from the one after the name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return age if 0.0 <= age < 86400.0 else None


class StartupClock:
    """Phase durations of one server start. Thread-safe: /health reads it while the start goes on."""

    def __init__(self, since_process_start: bool = True) -> None:
        now = time.perf_counter()
        age = process_age_s() if since_process_start else None
        self.t0 = now - age if age is not None else now  # perf_counter value of the process start (or of now)
        self.from_process_start = age is not None
        self._last = self.t0  # end of the previous phase: "imports" fills the gap up to the first phase
        self._lock = threading.Lock()
        self.phases: dict[str, float] = {}
        self.ready_s: float | None = None
        self.notes: dict[str, object] = {}

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.phases[name] = round(self.phases.get(name, 0.0) + seconds, 4)
        log.info("startup: %s %.2f s", name, seconds)

    def mark(self, name: str) -> float:
        """Close a phase that ran from the previous mark (or phase end) to now; returns its seconds."""
        now = time.perf_counter()
        seconds = now - self._last
        self._last = now
        self.add(name, seconds)
        return seconds

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        gap = time.perf_counter() - self._last
        if not self.phases:
            if gap > 0.005:
                self.mark("imports")  # whatever ran before the first phase: interpreter, torch, our modules
        elif gap > 0.005:
            self.mark("other")  # between phases (option checks, starting the warm-up thread): keeps the sum whole
        t = time.perf_counter()
        try:
            yield
        finally:
            now = time.perf_counter()
            self._last = now
            self.add(name, now - t)

    def ready(self) -> float:
        """The server now answers requests: record the total and log the summary line."""
        now = time.perf_counter()
        gap = now - self._last
        if gap > 0.005:
            self.add("other", gap)  # between phases: option parsing, logging set-up, the warm-up thread's start
        self._last = now
        self.ready_s = round(now - self.t0, 4)
        log.info("ready in %.1f s: %s", self.ready_s,
                 ", ".join(f"{k} {v:.2f}" for k, v in self.as_dict()["phases"].items()))
        return self.ready_s

    def as_dict(self) -> dict:
        with self._lock:
            return {"ready_s": self.ready_s, "from_process_start": self.from_process_start,
                    "phases": dict(self.phases), **({"notes": dict(self.notes)} if self.notes else {})}


def in_background(fn: Callable[[], T], name: str) -> Future:
    """fn() in a daemon thread (a pool's threads would hold up interpreter exit until fn ends); its result or
    exception in the returned Future."""
    fut: Future = Future()

    def run() -> None:
        try:
            fut.set_result(fn())
        except BaseException as e:  # handed to whoever waits on the future
            fut.set_exception(e)

    threading.Thread(target=run, name=name, daemon=True).start()
    return fut
