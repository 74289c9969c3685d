"""Launch-configuration sweep of the Triton delta kernels at the 7B decode shapes: where a `kernels.linear` call
spends its time (V side, U side, the rest) and how block sizes, warps, pipelining depth and reduction splits move it.

    PYTHONPATH=src python bench/serving/tune.py --out bench/results/serving_tune.json [--budget-s 420]

Each config is one `LaunchConfig` (defaults changed one field at a time, then a few combinations); each case is a
(codec, shape, k) of the kernels part of run.py (batch 64, k tenants round-robin, tenant sets beyond the L2 cache,
CUDA-graph replays). Results are written after every measurement, so a run cut by its time budget keeps what it
measured. The choice of defaults in LaunchConfig cites this file's output.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as R  # noqa: E402  (bench/serving/run.py: World, time_call, copy_gbps)

CASES = [  # (codec, (in, out), k[, batch]): batch defaults to the decode batch (64)
    ("delta-come", (4096, 4096), 64), ("delta-come", (4096, 4096), 8), ("delta-come", (4096, 4096), 32),
    ("delta-come", (4096, 4096), 1), ("delta-come", (11008, 4096), 64), ("delta-come", (11008, 4096), 8),
    ("bitdelta", (4096, 4096), 64), ("bitdelta", (4096, 4096), 8), ("lowrank", (4096, 4096), 8),
    # prefill: one 128-token prompt, and eight of them from eight tenants
    ("delta-come", (4096, 4096), 1, 128), ("delta-come", (4096, 4096), 8, 1024), ("delta-come", (11008, 4096), 1, 128),
    ("bitdelta", (4096, 4096), 1, 128), ("lowrank", (4096, 4096), 1, 128),
]
VARIANTS = [  # one field changed from the defaults
    {}, {"words_per_step": 16}, {"words_per_step": 4}, {"block_r": 128}, {"block_r": 32}, {"num_warps": 2},
    {"num_warps": 8}, {"programs_per_sm": 2}, {"programs_per_sm": 8}, {"num_warps_dot": 4}, {"post_scale": False},
]
SWEEP_CASES = (0, 1, 3, 6)  # the cases every non-default variant runs (defaults run all)
SMOKE_CASES = [("delta-come", (64, 96), 4), ("delta-come", (64, 96), 1), ("bitdelta", (64, 64), 4)]


def measure(world: R.World, codec: str, shape_in_out: tuple[int, int], k: int, cfg_kw: dict,
            batch: int | None = None) -> dict:
    torch = world.torch
    from deltapack.kernels.triton import LaunchConfig, TritonKernels

    kern = TritonKernels(LaunchConfig(**cfg_kw))
    n_in, n_out = shape_in_out
    shape = (n_out, n_in)
    B = batch or world.cfg["batch"]
    tb = world.template(codec, shape, world.cfg["kernel_ratio"]).nbytes()
    sets = R.kernel_sets(world, tb, k)
    layers, rows, tokens, x = R.kernel_case(world, codec, shape, k, sets, B)
    # correctness of this config against the layout's definition
    err = R.layout_rel_err(world, kern.linear(x, tokens, layers[0]), x, rows, layers[0], [0])
    if not err < 2e-2:
        raise AssertionError(f"config {cfg_kw}: rel err {err:.3g}")
    reps = 20 if world.cuda else 1
    total = R.time_call(world, lambda: [kern.linear(x, tokens, lay) for lay in layers], reps) / sets
    rec = {"codec": codec, "shape": f"{n_in}x{n_out}", "k": k, "batch": B, "config": cfg_kw, "us": round(total * 1e6, 2),
           "delta_bytes": k * tb, "rel_err": err}
    plan = kern._plan(layers[0], x)
    if plan.v is not None:  # the two sides of factors, each alone
        plans = [kern._plan(lay, x) for lay in layers]
        rec["v_us"] = round(R.time_call(world, lambda: [kern._run_seg(p.v, x, tokens, p.S, x.dtype, torch.float32)
                                                         for p in plans], reps) / sets * 1e6, 2)
        z = torch.randn(B, plan.v.width, device=world.device)
        rec["u_us"] = round(R.time_call(world, lambda: [kern._run_seg(p.u, z, tokens, p.S, x.dtype, x.dtype)
                                                         for p in plans], reps) / sets * 1e6, 2)
    moved = k * tb + B * n_in * 2 + B * n_out * 2
    rec["gbps"] = round(moved / total / 1e9, 1)
    del layers
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(R.RESULTS / "serving_tune.json"))
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new measurements after this long")
    ap.add_argument("--cases", default=None, help="comma list of case indices (default all)")
    ap.add_argument("--variants", default=None, help="JSON list of LaunchConfig overrides (default the built-in sweep)")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes (checks the script, times nothing real)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (as run.py --smoke does)
    world = R.World(smoke=args.smoke)
    if not world.cuda and not args.smoke:
        sys.exit("tune.py needs a CUDA GPU (or --smoke)")
    all_cases = SMOKE_CASES if args.smoke else CASES
    cases = all_cases if args.cases is None else [all_cases[int(i)] for i in args.cases.split(",")]
    sweep = cases if args.smoke or args.cases else [cases[i] for i in SWEEP_CASES]
    from deltapack.kernels.triton import LaunchConfig

    variants = VARIANTS if args.variants is None else json.loads(args.variants)
    fields = {f.name for f in dataclasses.fields(LaunchConfig)}
    for v in variants:
        if set(v) - fields:
            sys.exit(f"unknown LaunchConfig fields {sorted(set(v) - fields)}")
    cg = R.copy_gbps(world)
    out = {"command": R.command_line(),
           "device": world.name(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "kernels_sha": R.kernels_sha(), "defaults": dataclasses.asdict(LaunchConfig()), "copy_gbps": round(cg, 1), "batch": world.cfg["batch"], "ratio": world.cfg["kernel_ratio"],
           "records": [], "errors": [], "complete": False}
    path = Path(args.out)

    def save() -> None:
        R.write_json(path, out)

    for v in variants:  # variant-major: every case sees the defaults first
        for codec, shp, k, *batch in (cases if not v else sweep):
            if time.perf_counter() - t_start > args.budget_s:
                save()
                R.log("time budget reached")
                return
            try:
                t0 = time.perf_counter()
                rec = measure(world, codec, shp, k, v, *batch)
                rec["efficiency"] = round(rec["gbps"] / cg, 3)
                out["records"].append(rec)
                R.log(f"{codec} {shp} k={k} batch={rec['batch']} {v}: {rec['us']} us ({rec.get('v_us')} V, {rec.get('u_us')} U) "
                      f"{rec['efficiency']:.0%} of copy ({time.perf_counter() - t0:.0f}s)")
            except Exception as e:  # noqa: BLE001 - a config that fails is a result too
                out["errors"].append({"codec": codec, "shape": shp, "k": k, "config": v, "error": f"{type(e).__name__}: {e}"})
                traceback.print_exc()
            save()
            if world.cuda:
                world.torch.cuda.empty_cache()
    out["complete"] = True
    save()


if __name__ == "__main__":
    main()
