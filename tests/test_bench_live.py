"""bench/serving/live.py drives the real serving engine through a stand-in runner (BenchRunner) over run.py's
in-memory model: when ModelRunner grows an attribute the engine reads, the stand-in must grow it too. It once did not
(`cache_kw`): every prefill failed, and the first the project heard of it would have been a wasted GPU call."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

SERVING = Path(__file__).resolve().parents[1] / "bench" / "serving"


@pytest.fixture(scope="module")
def live():
    sys.path.insert(0, str(SERVING))
    try:
        import live as live_mod
        import run as run_mod
        import trace_sim

        yield live_mod, run_mod, trace_sim
    finally:
        sys.path.remove(str(SERVING))


def test_live_trace_serves_every_request_through_the_engine(live):
    live_mod, R, ts = live
    from deltapack.kernels import get_kernels

    world = R.World(True)
    world.kernels = get_kernels("reference")  # the engine path is what is tested, not Triton's interpreter
    world.build_model()
    shapes = world.model_shapes()
    world.install([world.tenant("delta-come", world.cfg["trace"]["ratio"], shapes, i) for i in range(2)])
    trace = [ts.Request(i, i % 2, 0.0, 2) for i in range(3)]
    out, counters = live_mod.serve_trace(world, trace, "dynamic", prompt=4, max_batch=4,
                                         vocab=world.cfg["model"]["vocab"], timeout_s=120, warm_requests=3)
    assert counters["finished"] and counters["incomplete_requests"] == 0, counters
    assert all(len(r.tokens) == 2 for r in out)
    # the untimed warm pass ran first (16 tokens each) and the counters restarted after it: 3 requests of 2 tokens
    # take 1-3 decode steps, the warm pass alone 15
    assert counters["warm_pass"]["requests"] == 3 and 1 <= counters["steps"] <= 3, counters
    # where the decode steps' time went: launching, waiting for the tokens, accepting them (rounded to 0.01 s each)
    split = counters["decode_launch_s"] + counters["decode_wait_s"] + counters["decode_accept_s"]
    assert counters["steps"] > 0 and abs(split - counters["decode_s"]) <= 0.02, counters


def test_live_trace_with_merged_weights_merges_a_hot_tenant(live):
    """The `+merged` modes run the server's MergedWeights on the stand-in tiers: a tenant alone in the batch turns
    hot, is merged and its forwards run on the copy, and every request still completes."""
    live_mod, R, ts = live
    from deltapack.kernels import get_kernels

    world = R.World(True)
    world.kernels = get_kernels("reference")
    world.build_model()
    shapes = world.model_shapes()
    world.install([world.tenant("delta-come", world.cfg["trace"]["ratio"], shapes, 0)])
    trace = [ts.Request(0, 0, 0.0, 24)]
    out, counters = live_mod.serve_trace(world, trace, "dynamic+merged", prompt=4, max_batch=4,
                                         vocab=world.cfg["model"]["vocab"], timeout_s=120)
    assert counters["finished"] and counters["incomplete_requests"] == 0, counters
    assert counters["merged"]["merges"] == 1 and counters["merged"]["merged_forwards"] > 0, counters
    assert len(out[0].tokens) == 24
