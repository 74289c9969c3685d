"""The tier lock: reentrant, and granted in arrival order so a thread that waits while the engine loops on it gets
its turn after the engine's current step, not whenever the scheduler lets it win a race."""

import threading

import pytest

from deltapack.serve.locks import FairRLock


def test_reentrant_and_only_the_owner_releases():
    lock = FairRLock()
    with lock:
        with lock:
            assert lock.held_by_me()
        assert lock.held_by_me()
        seen = []
        t = threading.Thread(target=lambda: seen.append(lock.held_by_me()))
        t.start()
        t.join()
        assert seen == [False]
    assert not lock.held_by_me()
    with pytest.raises(RuntimeError):
        lock.release()


def test_a_waiter_gets_the_lock_before_a_looping_holder_takes_it_again():
    lock = FairRLock()
    steps = 0
    stop = threading.Event()
    looping = threading.Event()

    def engine():  # takes the lock again as soon as it let go, as the engine's loop does
        nonlocal steps
        while not stop.is_set():
            with lock:
                steps += 1
                looping.set()
                for _ in range(2000):  # a step's worth of work under the lock
                    pass

    t = threading.Thread(target=engine, daemon=True)
    t.start()
    looping.wait(5)
    before = steps
    with lock:  # arrives while the engine holds the lock: next in line
        waited = steps - before
    stop.set()
    t.join(5)
    assert waited <= 2, f"the engine took {waited} more steps while a caller waited"


def test_a_waiter_interrupted_in_its_wait_does_not_block_the_line():
    lock = FairRLock()
    lock.acquire()
    real_wait = lock._cv.wait
    calls = []

    def interrupted_wait(*a, **k):
        if not calls:
            calls.append(1)
            raise KeyboardInterrupt
        return real_wait(*a, **k)

    lock._cv.wait = interrupted_wait
    errors, got = [], []

    def waiter(out):
        try:
            with lock:
                out.append(True)
        except KeyboardInterrupt as e:
            out.append(e)

    first = threading.Thread(target=waiter, args=(errors,), daemon=True)
    first.start()
    first.join(5)
    assert len(errors) == 1 and isinstance(errors[0], KeyboardInterrupt)  # its ticket is dead
    second = threading.Thread(target=waiter, args=(got,), daemon=True)
    second.start()
    lock.release()
    second.join(5)
    assert got == [True]  # the next in line got the lock past the dead ticket
