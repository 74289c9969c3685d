"""Live trace through the serving engine: the code `deltapack serve` runs (deltapack.serve.engine.Engine, continuous
batching), not a simulation. The 7B-shaped model of run.py (random bf16 weights), 64 resident delta-come 16x tenants
(run.py's synthetic packed deltas), a Zipf/Poisson trace of run.py's shape (128-token prompts, 128 generated tokens,
greedy, EOS ignored) fed in real time; every token is timed when the engine emits it.

    PYTHONPATH=src python bench/serving/live.py [--modes graph,dynamic,graph+merged] [--requests 300] [--load 0.8]
        [--tenants 64] [--out bench/results/serving_live.json]   (report.py shows every serving_live*.json)

Each mode serves the same trace: graph (rows in a static KV cache, one CUDA-graph replay per step) and dynamic (the
eager step, the cache rebuilt each step: what the server ran before graph decoding). The offered rate is `--load`
times the capacity the simulation (trace_sim) predicts from the per-step costs in bench/results/serving.json, so the
live run can be set beside the simulated one at the same load: `simulated` is the simulation of this very trace
with the measured step costs, `at the bound (simulated)` the same with every decode step at issue 26's 1/(1+k/R)
bound (what the issue's trace target compares the live throughput with).
Results: bench/results/serving_live.json (records as in serving.json's `trace`, plus per-mode engine counters).

    PYTHONPATH=src python bench/serving/live.py --resimulate bench/results/serving_live.json
recomputes a result file's simulated records from its trace and the committed costs (the simulation is
deterministic; the live records are left as they are).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import threading
import time
import types
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as R  # noqa: E402
import trace_sim as ts  # noqa: E402


class BenchRunner:
    """What the engine needs of deltapack.serve.model.ModelRunner, over run.py's in-memory model and tenants."""

    def __init__(self, world: R.World, max_model_len: int):
        from deltapack.serve.model import ModelRunner, cache_kwarg

        self._forward = ModelRunner.forward
        self.model, self.state = world.model, world.state
        self.cache_kw = cache_kwarg(self.model)
        p = next(self.model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.config = self.model.config
        self.pad_id = 0
        self.max_model_len = max_model_len
        emb = self.model.get_input_embeddings()
        self.vocab_size = emb.weight.shape[0]
        self.embed_key = next(n for n, m in self.model.named_modules() if m is emb) + ".weight"

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def forward(self, *args, **kw):
        return self._forward(self, *args, **kw)


class ResidentTiers:
    """Every tenant stays on the device (the resident part of serving.json shows 53+ fit); no loads to wait on.
    What deltapack.serve.merged reads of the tiers (the device budget, the resident tenants) is here too, so a mode
    with merged weights runs the server's MergedWeights unchanged."""

    def __init__(self):
        self.lock = threading.RLock()
        self.budget = {"device": 0}
        self.device_lru: dict[str, object] = {}
        self.merged = None

    def tier_bytes(self, tier: str) -> int:
        return 0

    def acquire(self, tenant) -> bool:
        return True

    def release(self, tenant) -> None:
        pass


class Countdown:
    """Set once `n` requests have ended (their finish or error events may come from any thread)."""

    def __init__(self, n: int):
        self.left, self.done, self._lock = n, threading.Event(), threading.Lock()
        if n <= 0:
            self.done.set()

    def one(self) -> None:
        with self._lock:
            self.left -= 1
            if self.left == 0:
                self.done.set()

    def wait(self, timeout_s: float) -> bool:
        return self.done.wait(timeout_s)


def serve_trace(world: R.World, trace: list[ts.Request], mode: str, prompt: int, max_batch: int, vocab: int,
                timeout_s: float, warm_requests: int = 0) -> tuple[list[ts.Request], dict]:
    """Feed the trace to a fresh engine in real time; returns the requests with their token times (seconds from
    the trace's start) and the engine's counters. `warm_requests`: first, that many untimed requests of the trace's
    shapes (its tenants in its order, all at once, 16 tokens each), so that the timed trace meets a server in its
    steady state (kernels compiled for the prefill and decode shapes it will see: the cold start is coldstart.py's
    to measure); the engine's counters then restart from zero."""
    import random

    from deltapack.serve.engine import Engine, ErrorEvent, FinishEvent, GenRequest, TokenEvent
    from deltapack.serve.sampling import SamplingParams

    decode, _, extra = mode.partition("+")
    if extra not in ("", "merged"):
        raise SystemExit(f"unknown mode {mode!r}: graph, dynamic, or either with +merged")
    runner = BenchRunner(world, prompt + max(r.out_len for r in trace) + 8)
    tiers = ResidentTiers()
    tenants = {}
    for t in sorted({r.tenant for r in trace}):
        tenants[t] = types.SimpleNamespace(name=f"t{t}", slot=t, tier="device", removed=False)
        tiers.device_lru[f"t{t}"] = tenants[t]
    if extra == "merged":  # the server's --merged-bytes auto: free device memory decides (deltapack.serve.merged)
        from deltapack.serve.merged import MergedWeights

        tiers.merged = MergedWeights(runner, tiers, budget=None if world.cuda else 1 << 30)
    t_build = time.perf_counter()
    engine = Engine(runner, tiers, max_batch=max_batch, max_prefill_tokens=8 * prompt, decode=decode)
    build_s = time.perf_counter() - t_build
    t_warm = time.perf_counter()
    graphs = engine.warm_up(sorted({r.tenant for r in trace}))
    warm_s = time.perf_counter() - t_warm
    rnd = random.Random(1)
    finishes = Countdown(len(trace))
    out = ts.fresh_copies(trace)
    t0 = [0.0]

    def emit(req: ts.Request, ev) -> None:
        if isinstance(ev, TokenEvent):
            req.tokens.append(time.perf_counter() - t0[0])
        elif isinstance(ev, (FinishEvent, ErrorEvent)):
            finishes.one()

    engine.start()
    try:
        warm = _warm_pass(engine, trace, tenants, warm_requests, prompt, vocab, rnd, timeout_s)
        t0[0] = time.perf_counter()
        for req in out:
            wait = req.arrival - (time.perf_counter() - t0[0])
            if wait > 0:
                time.sleep(wait)
            ten = tenants[req.tenant]
            ids = [rnd.randrange(3, vocab) for _ in range(prompt)]
            params = SamplingParams(max_tokens=req.out_len, temperature=0.0, ignore_eos=True)
            engine.submit(GenRequest(f"r{req.rid}", f"t{req.tenant}", ten, ids, params,
                                     lambda ev, req=req: emit(req, ev), vocab=vocab))
        finished = finishes.wait(timeout_s)
    finally:
        engine.stop()
        engine.batch.clear()
    errors = sum(1 for r in out if len(r.tokens) < r.out_len)
    counters = {"decode_mode": engine.decode_mode, "incomplete_requests": errors, "steps": engine.steps,
                "engine_build_s": round(build_s, 2), "warmup_s": round(warm_s, 2), "warmup_graphs": graphs,
                "warm_pass": {k: v for k, v in warm.items() if k != "batch"},
                "finished": finished, "max_tenants_in_step": engine.max_tenants_in_step,
                **{k: round(v, 2) for k, v in engine.busy.items()}}
    batch = engine.batch
    for k in ("captures", "eager_steps", "compactions"):
        if hasattr(batch, k):
            counters[k] = getattr(batch, k) - warm["batch"].get(k, 0)  # the timed trace's own
    if tiers.merged is not None:
        mw = tiers.merged
        counters["merged"] = {"merges": mw.merges, "merged_forwards": mw.merged_forwards, "forwards": mw.forwards,
                              "evictions": dict(mw.evictions), "bytes": mw.nbytes}
    del engine, batch  # the next mode needs the memory (static cache, graph pools)
    import gc

    gc.collect()
    if world.cuda:
        world.torch.cuda.empty_cache()
    return out, counters


def _warm_pass(engine, trace, tenants, n: int, prompt: int, vocab: int, rnd, timeout_s: float) -> dict:
    """serve_trace's untimed requests; then the engine's counters restart from zero. Returns what the pass did and
    the batch's counters at its end (so the timed trace's own can be told apart)."""
    from deltapack.serve.engine import ErrorEvent, FinishEvent, GenRequest
    from deltapack.serve.sampling import SamplingParams

    batch = engine.batch
    if n <= 0:
        return {"requests": 0, "seconds": 0.0, "batch": {}}
    from deltapack.serve.engine import TokenEvent

    finishes = Countdown(n)
    started: dict[int, threading.Event] = {}

    def emit(i: int, ev) -> None:
        if isinstance(ev, TokenEvent):
            started[i].set()
        elif isinstance(ev, (FinishEvent, ErrorEvent)):
            started[i].set()
            finishes.one()

    # in groups of 1, 2, 3, ... 8 prompts (the engine's chunk limit here: 8 x prompt tokens), each let into a prefill
    # before the next arrives: the trace's arrivals make chunks of every size, so the pass does too, whatever shapes
    # the kernels specialise on
    t = time.perf_counter()
    i, size = 0, 1
    while i < n:
        group = range(i, min(n, i + size))
        for j in group:
            started[j] = threading.Event()
            ten = tenants[trace[j % len(trace)].tenant]
            ids = [rnd.randrange(3, vocab) for _ in range(prompt)]
            params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
            engine.submit(GenRequest(f"warm{j}", ten.name, ten, ids, params, partial(emit, j), vocab=vocab))
        for j in group:
            started[j].wait(timeout_s)
        i, size = group.stop, size % 8 + 1
    finished = finishes.wait(timeout_s)
    seconds = time.perf_counter() - t
    if not finished:
        raise RuntimeError(f"the warm pass of {n} requests did not finish in {timeout_s:.0f} s")
    engine.steps = 0
    engine.max_tenants_in_step = 0
    for k in engine.busy:
        engine.busy[k] = type(engine.busy[k])(0)
    return {"requests": n, "seconds": round(seconds, 2),
            "batch": {k: getattr(batch, k) for k in ("captures", "eager_steps", "compactions") if hasattr(batch, k)}}


SIMULATED = ("deltapack (simulated)", "swap (simulated)", "deltapack at the bound (simulated)")


def simulated_records(trace: list, costs_file: dict, batch: int, ratio: float) -> list[dict]:
    """The simulation's view of this trace (SIMULATED, in order) from a serving.json's measured step costs."""
    costs = ts.Costs.from_json(costs_file["notes"]["trace"]["costs"])
    at_bound = costs.at_bound(R.effective_ratio(costs_file.get("notes", {}), ratio), batch)
    return [_rounded(ts.metrics(SIMULATED[0], ts.simulate_deltapack(trace, costs, batch))),
            _rounded(ts.metrics(SIMULATED[1], ts.simulate_swap(trace, costs, batch))),
            _rounded(ts.metrics(SIMULATED[2], ts.simulate_deltapack(trace, at_bound, batch)))]


def resimulate(path: Path, costs_path: Path, smoke: bool = False) -> None:
    """Recompute `path`'s simulated records for its own trace (rate, requests, tenants, out: seed 0 as in main)."""
    doc = json.loads(path.read_text())
    tc = doc["trace"]
    costs_file = json.loads(costs_path.read_text())
    ratio = tc.get("ratio", R.settings(smoke)["trace"]["ratio"])  # files from before the ratio was stored
    # the exact rate where stored; older files keep it rounded to 1e-3 req/s, which moves arrivals a little, so a
    # record already there is kept and only the missing ones are added
    trace = ts.make_trace(tc["requests"], tc["tenants"], tc.get("rate_rps_exact", tc["rate_rps"]), tc["out"], seed=0)
    have = {r["system"] for r in doc["records"]}
    sim = [r for r in doc["records"] if r["system"] in SIMULATED]
    sim += [r for r in simulated_records(trace, costs_file, tc["batch"], ratio) if r["system"] not in have]
    sim.sort(key=lambda r: SIMULATED.index(r["system"]))
    doc["records"] = sim + [r for r in doc["records"] if r["system"] not in SIMULATED]
    doc["resimulated"] = {"command": R.command_line(), "costs_from": str(costs_path),
                          "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    R.write_json(path, doc)


def _rounded(rec: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="graph,dynamic")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--load", type=float, default=0.8, help="offered rate as a share of the simulated capacity")
    ap.add_argument("--tenants", type=int, default=None,
                    help="tenants of the trace (default: run.py's, 64; issue 26's target is about that trace). One "
                         "tenant owns every forward: where merged weights (`+merged` modes) must pay off")
    ap.add_argument("--timeout-s", type=float, default=240.0, help="per mode")
    ap.add_argument("--warm-requests", type=int, default=None,
                    help="untimed requests of the trace's shapes before it (steady state; default 2 x the batch, "
                         "0 = none: the first mode then pays kernel compilation inside the trace, as on 2026-12-08)")
    ap.add_argument("--costs", default=None, help="serving.json with notes.trace.costs (default: the committed GPU "
                    "results, or the smoke results with --smoke)")
    ap.add_argument("--out", default=None, help="default bench/results/serving_live[_smoke].json")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the script)")
    ap.add_argument("--resimulate", type=Path, default=None, metavar="FILE",
                    help="recompute FILE's simulated records from --costs (no model, no live run)")
    args = ap.parse_args()
    if args.resimulate is not None:
        costs = args.costs or R.RESULTS / ("serving_smoke.json" if args.smoke else "serving.json")
        resimulate(args.resimulate, Path(costs), args.smoke)
        return
    if args.smoke:
        import os

        os.environ["TRITON_INTERPRET"] = "1"
    world = R.World(args.smoke)
    cfg = world.cfg
    tc = dict(cfg["trace"])
    if args.tenants is not None:
        if args.tenants < 1:
            raise SystemExit("--tenants must be >= 1")
        tc["tenants"] = args.tenants
    world.build_model()
    shapes = world.model_shapes()
    tenants = [world.tenant("delta-come", tc["ratio"], shapes, i) for i in range(tc["tenants"])]
    world.install(tenants)
    # the simulation's view of this trace, from the committed GPU costs (or, smoke, the smoke file's)
    costs_path = args.costs or R.RESULTS / ("serving_smoke.json" if args.smoke else "serving.json")
    costs_file = json.loads(Path(costs_path).read_text())
    costs = ts.Costs.from_json(costs_file["notes"]["trace"]["costs"])
    B = tc["batch"]
    if args.warm_requests is None:
        args.warm_requests = 2 * B
    capacity = ts.capacity_rps(costs, B, round(ts.expected_distinct(tc["tenants"], B)), tc["out"])
    rate = args.load * capacity
    trace = ts.make_trace(args.requests, tc["tenants"], rate, tc["out"], seed=0)
    out_path = Path(args.out or R.RESULTS / ("serving_live_smoke.json" if args.smoke else "serving_live.json"))
    result = {
        "command": R.command_line(),
        "device": world.name(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "kernels_sha": R.kernels_sha(),
        "trace": {"requests": args.requests, "tenants": tc["tenants"], "prompt": tc["prompt"], "out": tc["out"],
                  "batch": B, "ratio": tc["ratio"], "load": args.load, "rate_rps": round(rate, 3),
                  "rate_rps_exact": rate, "warm_requests": args.warm_requests,
                  "costs_from": costs_file.get("command")},
        "records": simulated_records(trace, costs_file, B, tc["ratio"]),
        "engine": {},
    }
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        R.log(f"live trace, decode={mode}: {args.requests} requests at {rate:.2f} req/s")
        reqs, counters = serve_trace(world, trace, mode, tc["prompt"], B, cfg["model"]["vocab"], args.timeout_s,
                                     warm_requests=args.warm_requests)
        served = [r for r in reqs if len(r.tokens) == r.out_len]
        rec = ts.metrics(f"deltapack live ({mode})", served)
        rec["completed"] = len(served)
        if len(served) == len(reqs):
            result["records"].append(_rounded(rec))
        else:  # metrics over the requests that happened to finish would flatter a failed run
            counters["partial_record"] = _rounded(rec)
        result["engine"][mode] = counters
        R.log(f"  {rec['throughput']:.0f} tok/s, TTFT p50 {rec['ttft_p50']:.2f}s p99 {rec['ttft_p99']:.2f}s, "
              f"ITL p50 {rec['itl_p50'] * 1e3:.1f} ms p99 {rec['itl_p99'] * 1e3:.1f} ms; {counters}")
        R.write_json(out_path, result)
    for r in result["records"][:len(SIMULATED)]:
        R.log(f"{r['system']}: {r['throughput']:.0f} tok/s, TTFT p50 {r['ttft_p50']:.2f}s p99 {r['ttft_p99']:.2f}s")
    R.write_json(out_path, result)


if __name__ == "__main__":
    main()
