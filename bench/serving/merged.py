"""k = 1 forwards on merged weights (deltapack.serve.merged) against the delta kernels and the base alone.

Every row of the batch is one tenant's (k = 1): the kernels add its delta to the base's GEMMs (bounded by
1/(1+1/R) of the base's speed), a merged copy (base + dense delta, model dtype) runs the base's GEMMs alone. Measured
on run.py's 7B-shaped model (random bf16 weights, deltas on every linear and lm_head), per codec and ratio:

  decode   one decode step of `batch` rows (StaticDecoder: static KV cache, one CUDA graph per step on the GPU;
           eager on the CPU) on the base alone, on the kernels, and on the merged copy: step_ms, tokens_per_s,
           of_base (tokens_per_s / the base's), bound (1/(1+1/R)), of_bound for the kernels.
  prefill  one eager forward of `prefill_rows` x `prefill_tokens` tokens of the tenant on each path (plus the dense
           scratch path of deltapack.kernels.schedule, dequantize-once + GEMM), and the base alone.
  merge    seconds to build the merged copy (all sites at once on an idle device) and its bytes; max relative
           difference of the merged path's logits against the kernels' on the same prefill (bf16 rounding).

    PYTHONPATH=src python bench/serving/merged.py            # GPU, ~3 min: bench/results/serving_merged.json
    PYTHONPATH=src python bench/serving/merged.py --smoke    # CPU, Triton interpreter, tiny shapes, ~1 min:
                                                             # bench/results/serving_merged_cpu_smoke.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402  (bench/serving/run.py: World, timing, the model)

SETTINGS = {
    "gpu": {"codecs": ["delta-come"], "ratios": [16.0, 32.0], "batch": 64, "prompt": 16, "steps": 32,
            "prefill_rows": 1, "prefill_tokens": 512, "reps": 10},
    "smoke": {"codecs": ["delta-come"], "ratios": [8.0], "batch": 4, "prompt": 4, "steps": 3,
              "prefill_rows": 1, "prefill_tokens": 8, "reps": 1},
}


def build_entry(world, slot: int):
    """The merged copy of `slot`'s tenant over every wrapped linear, built at once (the server builds it a few sites
    per engine step): a MergedEntry, and the seconds it took."""
    from deltapack.serve.merged import MergedEntry, merged_weight
    from deltapack.serve.model import DeltaLinear

    torch = world.torch
    world.sync()
    t0 = time.perf_counter()
    e = MergedEntry("bench", slot, 1, 0)
    with torch.inference_mode():
        for m in world.model.modules():
            if not isinstance(m, DeltaLinear):
                continue
            lay = world.state.layers.get(m.wkey)
            p = lay.get(slot) if lay is not None else None
            if p is None:
                continue
            e.weights[m.wkey] = merged_weight(m.base.weight, p, world.dtype)
            e.sources[m.wkey] = p
            e.nbytes += e.weights[m.wkey].numel() * e.weights[m.wkey].element_size()
    world.sync()
    return e, time.perf_counter() - t0


def prefill_s(world, row_slots: list[int], tokens: int, reps: int, *, merged=None, costs=None):
    """Seconds of one eager forward of len(row_slots) x tokens, and its last-position logits."""
    from deltapack.serve.model import BatchContext

    torch = world.torch
    vocab = world.cfg["model"]["vocab"]
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, vocab, (len(row_slots), tokens), generator=g).to(world.device)
    out = {}

    def fwd():
        ctx = BatchContext(row_slots, world.device)
        ctx.merged = merged
        world.state.ctx, world.state.costs = ctx, costs
        try:
            with torch.inference_mode():
                out["logits"] = world.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1].float()
        finally:
            world.state.ctx, world.state.costs = None, None

    fwd()
    world.sync()
    return run.timed(world, fwd, reps), out["logits"]


def dense_everywhere(world):
    """A CostModel that sends every tenant's tokens to the dense scratch path (its cost, not its choice)."""
    from deltapack.kernels.schedule import CostModel, cost_key

    costs = CostModel()
    for lay in world.state.layers.values():
        for p in lay.slots:
            if p is not None and p.kind != "vector":
                costs.dense_from[cost_key(p)] = 1
    return costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/serving_merged[_cpu_smoke].json)")
    args = ap.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    world = run.World(args.smoke)
    cfg = SETTINGS["smoke" if args.smoke else "gpu"]
    if not args.smoke and not world.cuda:
        raise SystemExit("no CUDA device: run with --smoke on a CPU")
    out = Path(args.out) if args.out else run.RESULTS / ("serving_merged_cpu_smoke.json" if args.smoke else "serving_merged.json")
    B, P, steps, reps = cfg["batch"], cfg["prompt"], cfg["steps"], cfg["reps"]
    world.build_model()
    shapes = world.model_shapes()
    world.install([])
    world.decode_step_s([-1] * B, P, steps)  # untimed: first calls (allocation, lazy initialisation)
    base_s = world.decode_step_s([-1] * B, P, steps)
    base_pre, _ = prefill_s(world, [-1] * cfg["prefill_rows"], cfg["prefill_tokens"], reps)
    run.log(f"base: {base_s * 1e3:.2f} ms/step at batch {B}; prefill {base_pre * 1e3:.2f} ms")
    decode, prefill, merges = [], [], []
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    def save(done: bool) -> None:
        """After every codec x ratio: a call killed at its time limit still returns what it measured."""
        run.write_json(out, {
            "command": run.command_line(), "device": world.name(), "date": started, "kernels_sha": run.kernels_sha(),
            "complete": done, "decode": decode, "prefill": prefill, "merge": merges,
            "notes": {"model": world.cfg["model"], "batch": B, "prompt_tokens": P, "timed_steps": steps,
                      "path": "run.py's wrapped transformers Llama (random bf16 weights), deltas on every linear and "
                              "lm_head; decode: StaticDecoder (CUDA graph per step on the GPU, eager on the CPU)",
                      "smoke": args.smoke},
        })

    for codec in cfg["codecs"]:
        for ratio in cfg["ratios"]:
            tenant = world.tenant(codec, ratio, shapes, 0)
            R = world.base_linear_bytes / sum(p.nbytes() for p in tenant.values())
            world.install([tenant])
            rows = [0] * B
            dec = world.decoder(B, P + steps + 4)
            dec.set_merged(None)
            kern_s = world.decode_step_s(rows, P, steps)
            entry, build_s = build_entry(world, 0)
            dec.set_merged(entry)
            merged_s = world.decode_step_s(rows, P, steps)
            dec.set_merged(None)
            bound = 1 / (1 + 1 / R)
            for path, sec in (("base", base_s), ("kernels", kern_s), ("merged", merged_s)):
                rec = {"codec": codec, "ratio": ratio, "k": 1, "batch": B, "path": path, "step_ms": round(sec * 1e3, 3),
                       "tokens_per_s": round(B / sec, 1), "of_base": round(base_s / sec, 3), "bound": round(bound, 4)}
                if path == "kernels":
                    rec["of_bound"] = round(base_s / sec / bound, 3)
                decode.append(rec)
                run.log(f"{codec} {ratio:g}x decode k=1 {path}: {sec * 1e3:.2f} ms/step = {base_s / sec:.2f} of base "
                        f"(bound {bound:.3f})")
            pr = [0] * cfg["prefill_rows"]
            t_k, lk = prefill_s(world, pr, cfg["prefill_tokens"], reps)
            t_d, _ = prefill_s(world, pr, cfg["prefill_tokens"], reps, costs=dense_everywhere(world))
            t_m, lm = prefill_s(world, pr, cfg["prefill_tokens"], reps, merged=entry)
            rel = float(((lm - lk).norm() / lk.norm().clamp_min(1e-30)))
            for path, sec in (("base", base_pre), ("kernels", t_k), ("dense", t_d), ("merged", t_m)):
                prefill.append({"codec": codec, "ratio": ratio, "rows": len(pr), "tokens": cfg["prefill_tokens"],
                                "path": path, "ms": round(sec * 1e3, 3), "of_base": round(base_pre / sec, 3)})
                run.log(f"{codec} {ratio:g}x prefill {path}: {sec * 1e3:.2f} ms")
            merges.append({"codec": codec, "ratio": ratio, "build_s": round(build_s, 4), "gb": round(entry.nbytes / 1e9, 4),
                           "logits_rel_diff_vs_kernels": rel})
            run.log(f"{codec} {ratio:g}x merge: {build_s:.2f} s, {entry.nbytes / 1e9:.2f} GB; logits rel diff {rel:.2e}")
            save(done=False)
            world.install([])
            world.decoders.clear()
            del entry, tenant
            gc.collect()
            if world.cuda:
                world.torch.cuda.empty_cache()
    save(done=True)
    run.log(f"wrote {out}")


if __name__ == "__main__":
    main()
