"""Scale benchmark: compress a 7B-shaped pair streamed from disk, and compress-many vs sequential compress.

    PYTHONPATH=src python bench/scale/run.py --phase single        # GPU: Llama-2-7B-shaped bf16 pair (2 x 13.5 GB)
    PYTHONPATH=src python bench/scale/run.py --phase many          # GPU: 3 fine-tunes of an 8-layer 7B-wide model
    PYTHONPATH=src python bench/scale/run.py --phase all           # both (about 8-10 minutes on an H100 box)
    PYTHONPATH=src python bench/scale/run.py --smoke               # CPU, tiny shapes, same code path

single: writes base + fine-tune shard by shard (bench/scale/synth.py; skipped when already there), evicts them from
  the page cache (POSIX_FADV_DONTNEED) so compress reads from disk, then times `deltapack.api.compress` in a child
  process (its peak RSS from /proc VmHWM). `--layers N` (< 32) runs a shallower model of 7B width and reports the
  time scaled linearly in bytes to 32 layers as `extrapolated_7b_seconds` (labelled as such). Then `merge` rebuilds
  the fine-tune from a cold cache in another child (its time and peak RSS: a few tensors, whatever the shard size).
many: N fine-tunes of one base; times N sequential `compress` runs (one child process) against one
  `compress_many` run (local process pool, default workers), both from a cold page cache, and checks that both
  wrote the same delta shards.
Results: bench/results/scale.json (smoke: scale_smoke.json), one entry per phase with command, device and date; a
phase run later updates its own entry only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = ROOT / "bench" / "results"


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def vm_hwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# ---- measurements, each in a fresh child process (clean peak memory, no warm caches from the parent) -----------------
def child(spec: dict) -> None:
    import torch

    from deltapack import api
    from deltapack.scale.many import compress_many

    torch.ones(8) + 1  # import-time costs stay out of the timing
    t0 = time.perf_counter()
    out: dict = {}
    if spec["kind"] == "compress":
        api.compress(spec["base"], spec["ft"], spec["out"], method=spec["method"], ratio=spec["ratio"],
                     device=spec["device"], overwrite=True, progress=False)
        out["true_ratio"] = api.inspect(spec["out"])["true_ratio"]
    elif spec["kind"] == "merge":
        api.merge(spec["base"], spec["delta"], spec["out"], overwrite=True, progress=False)
        out["merged_bytes"] = sum(f.stat().st_size for f in Path(spec["out"]).glob("*.safetensors"))
        out["merged_shards"] = len(list(Path(spec["out"]).glob("*.safetensors")))
    elif spec["kind"] == "sequential":
        out["each_seconds"] = []
        for ft, o in zip(spec["fts"], spec["outs"]):
            t1 = time.perf_counter()
            api.compress(spec["base"], ft, o, method=spec["method"], ratio=spec["ratio"], device=spec["device"],
                         overwrite=True, progress=False)
            out["each_seconds"].append(time.perf_counter() - t1)
    else:
        s = compress_many(spec["base"], spec["fts"], spec["out"], method=spec["method"], ratio=spec["ratio"],
                          device=spec["device"], workers=spec.get("workers"), overwrite=True, progress=False)
        out["units"] = len(s["encoded_units"])
        out["workers"] = s["workers"]
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_bytes"] = vm_hwm()
    if torch.cuda.is_available():
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    print("RESULT " + json.dumps(out), flush=True)


def run_child(spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"child {spec['kind']} failed:\n{r.stderr[-4000:]}")
    return json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])


def same_shards(a: Path, b: Path) -> bool:
    fa = sorted(p.name for p in a.glob("*.safetensors"))
    return fa == sorted(p.name for p in b.glob("*.safetensors")) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in fa
    )


# ---- phases ---------------------------------------------------------------------------------------------------------
def phase_single(args, shape_base, dev: str) -> dict:
    from synth import evict_page_cache, write_family

    shape = dataclasses.replace(shape_base, layers=args.layers)
    root = args.work / f"single-L{args.layers}"
    log(f"single: writing a {shape.nbytes() / 1e9:.2f} GB pair ({args.layers} layers) under {root}")
    base, (ft,), wsec = write_family(root, shape, 1, shard_bytes=args.shard_bytes, device=dev, log=log)
    cold = evict_page_cache(base, ft)
    log(f"single: written in {wsec:.0f} s; compressing ({args.method} {args.ratio}x, {'cold' if cold else 'warm'} cache)")
    res = run_child({"kind": "compress", "base": str(base), "ft": str(ft), "out": str(root / "delta"), "method": args.method,
                     "ratio": args.ratio, "device": args.device})
    out = {
        "shape": dataclasses.asdict(shape), "model_bytes": shape.nbytes(), "write_seconds": round(wsec, 1), "method": args.method,
        "ratio": args.ratio, "cold_cache": cold, "compress_seconds": round(res["seconds"], 2),
        "read_gb_per_s": round(2 * shape.nbytes() / res["seconds"] / 1e9, 3), "true_ratio": round(res["true_ratio"], 2),
        "peak_rss_bytes": res["peak_rss_bytes"], "peak_cuda_bytes": res.get("peak_cuda_bytes"),
    }
    # merge back from a cold cache: base read by byte range, output in 2 GB shards written tensor by tensor
    evict_page_cache(base, root / "delta")
    mres = run_child({"kind": "merge", "base": str(base), "delta": str(root / "delta"), "out": str(root / "merged")})
    out.update({"merge_seconds": round(mres["seconds"], 2), "merge_peak_rss_bytes": mres["peak_rss_bytes"],
                "merged_shards": mres["merged_shards"], "largest_tensor_bytes": 2 * max(
                    math.prod(s) for s in shape.tensors().values())})
    log(f"single: merge {mres['seconds']:.1f} s into {mres['merged_shards']} shards, peak RSS "
        f"{mres['peak_rss_bytes'] / 2**30:.2f} GiB")
    full = dataclasses.replace(shape_base, layers=LLAMA_LAYERS)
    if args.layers != LLAMA_LAYERS and not args.smoke:
        out["extrapolated_7b_seconds"] = round(res["seconds"] * full.nbytes() / shape.nbytes(), 1)
        out["extrapolation"] = f"measured at {args.layers} layers, scaled linearly in bytes to {LLAMA_LAYERS}"
    log(f"single: {res['seconds']:.1f} s, true ratio {res['true_ratio']:.2f}x, peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return out


def phase_many(args, shape_base, dev: str) -> dict:
    from synth import evict_page_cache, write_family

    shape = dataclasses.replace(shape_base, layers=args.many_layers)
    root = args.work / f"many-L{args.many_layers}-n{args.fts}"
    log(f"many: writing base + {args.fts} fine-tunes of {shape.nbytes() / 1e9:.2f} GB each ({args.many_layers} layers)")
    base, fts, wsec = write_family(root, shape, args.fts, shard_bytes=args.shard_bytes, device=dev, log=log)
    seq_outs = [root / "seq" / f.name for f in fts]
    cold = evict_page_cache(base, *fts)
    log("many: sequential compress")
    seq = run_child({"kind": "sequential", "base": str(base), "fts": [str(f) for f in fts], "outs": [str(o) for o in seq_outs],
                     "method": args.method, "ratio": args.ratio, "device": args.device})
    evict_page_cache(base, *fts)
    log(f"many: sequential {seq['seconds']:.1f} s; compress-many")
    many = run_child({"kind": "many", "base": str(base), "fts": [str(f) for f in fts], "out": str(root / "many"),
                      "method": args.method, "ratio": args.ratio, "device": args.device, "workers": args.workers})
    identical = all(same_shards(root / "many" / f.name, o) for f, o in zip(fts, seq_outs))
    out = {
        "shape": dataclasses.asdict(shape), "model_bytes": shape.nbytes(), "finetunes": args.fts, "method": args.method,
        "ratio": args.ratio, "cold_cache": cold, "write_seconds": round(wsec, 1),
        "sequential_seconds": round(seq["seconds"], 2), "sequential_each_seconds": [round(s, 2) for s in seq["each_seconds"]],
        "many_seconds": round(many["seconds"], 2), "many_workers": many["workers"], "many_units": many["units"],
        "speedup": round(seq["seconds"] / many["seconds"], 2), "identical_shards": identical,
        "sequential_peak_rss_bytes": seq["peak_rss_bytes"], "many_driver_peak_rss_bytes": many["peak_rss_bytes"],
    }
    log(f"many: compress-many {many['seconds']:.1f} s -> speed-up {out['speedup']}x; identical shards: {identical}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return out


LLAMA_LAYERS = 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["single", "many", "all"], default="all")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the code path)")
    ap.add_argument("--layers", type=int, default=None, help="single: decoder layers (default 32 = Llama-2-7B)")
    ap.add_argument("--many-layers", type=int, default=None, help="many: decoder layers per model (default 8)")
    ap.add_argument("--fts", type=int, default=None, help="many: fine-tunes (default 3)")
    ap.add_argument("--method", default="lowrank")
    ap.add_argument("--ratio", type=float, default=16.0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=None, help="compress-many workers (default: its own)")
    ap.add_argument("--work", type=Path, default=None, help="where the synthetic checkpoints go (default: ./.scale-work)")
    ap.add_argument("--shard-bytes", type=int, default=2 << 30)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints and outputs")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    import torch

    import deltapack
    from synth import LLAMA2_7B, TINY

    shape_base = TINY if args.smoke else LLAMA2_7B
    if args.smoke:
        args.device = "cpu"
    args.layers = args.layers or (2 if args.smoke else LLAMA_LAYERS)
    args.many_layers = args.many_layers or (2 if args.smoke else 8)
    args.fts = args.fts or (2 if args.smoke else 3)
    if args.smoke:
        args.ratio = min(args.ratio, 2.0)  # tiny matrices: metadata caps the reachable ratio
        args.shard_bytes = min(args.shard_bytes, 64 << 10)
    args.work = (args.work or Path.cwd() / ".scale-work").resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    gen_dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    out_path = args.out or RESULTS / ("scale_smoke.json" if args.smoke else "scale.json")
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    meta = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else f"cpu ({platform.processor() or platform.machine()})",
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "deltapack": deltapack.__version__,
        "torch_threads": torch.get_num_threads(),
        "host_ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
    }
    phases = ["single", "many"] if args.phase == "all" else [args.phase]
    for ph in phases:
        t0 = time.perf_counter()
        res = phase_single(args, shape_base, gen_dev) if ph == "single" else phase_many(args, shape_base, gen_dev)
        results[ph] = {**meta, **res, "phase_wall_seconds": round(time.perf_counter() - t0, 1)}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=1) + "\n")  # after each phase: a later timeout keeps it
        log(f"{ph}: written to {out_path}")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
