"""A reentrant lock granted in arrival order.

The engine thread holds the tier lock for a whole step and takes it again right after, in a loop. Python's RLock is
not fair: the thread that just released it usually wins it back before a waiter wakes, so an admin call (load or
remove a delta, change a budget) could wait for as long as traffic lasted. Tickets make the waiter next in line.
"""

from __future__ import annotations

import threading


class FairRLock:
    """Reentrant, first come first served. Blocking acquire only (the serving code uses `with`)."""

    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._next_ticket = 0  # handed to the next thread that has to wait its turn
        self._now_serving = 0  # the ticket that may take the lock once it is free
        self._abandoned: set[int] = set()  # tickets whose waiter left (an exception in wait): skipped

    def acquire(self) -> bool:
        me = threading.get_ident()
        with self._cv:
            if self._owner == me:
                self._depth += 1
                return True
            ticket = self._next_ticket
            self._next_ticket += 1
            try:
                while self._owner is not None or self._now_serving != ticket:
                    self._cv.wait()
            except BaseException:  # e.g. Ctrl-C while waiting: a dead ticket must not block the line behind it
                self._abandoned.add(ticket)
                if self._owner is None:
                    self._skip_abandoned()
                raise
            self._owner, self._depth = me, 1
            return True

    def release(self) -> None:
        with self._cv:
            if self._owner != threading.get_ident():
                raise RuntimeError("cannot release a lock this thread does not hold")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._now_serving += 1
                self._skip_abandoned()

    def _skip_abandoned(self) -> None:
        while self._now_serving in self._abandoned:
            self._abandoned.remove(self._now_serving)
            self._now_serving += 1
        self._cv.notify_all()

    def held_by_me(self) -> bool:
        return self._owner == threading.get_ident()

    def __enter__(self) -> FairRLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
