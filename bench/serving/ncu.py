"""Nsight Compute counters of the Triton delta kernels at the 7B decode shape 4096x4096: why each launch runs at
the speed it does (occupancy, issue rate, DRAM share, and the stall reasons per issued instruction).

    PYTHONPATH=src python bench/serving/ncu.py [--out bench/results/serving_ncu.json] [--cases delta-come:8,...]

Each case (codec, k) builds k tenants of that codec at 16x (the kernels part's templates, batch 64, k tenants
round-robin), warms up, then profiles one `kernels.linear` call between cudaProfilerStart/Stop, so each of its
launches (factors: V side then U side) is one record. Needs `ncu` on PATH and permission to read the counters.
Nsight Compute locks the clocks to base for a stable measurement (~1.4 GHz on an H100 SXM against ~1.98 boost),
so its durations are longer than the benchmark's; the ratios (issue rate, occupancy, stalls) are what to read.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CASES = ["delta-come:8", "delta-come:64", "bitdelta:8", "bitdelta:64", "lowrank:8", "dare:8"]
METRICS = {
    "us": "gpu__time_duration.sum",
    "registers": "launch__registers_per_thread",
    "grid": "launch__grid_size",
    "block": "launch__block_size",
    "occupancy_pct": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "issue_active_pct": "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "dram_pct": "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "l1tex_pct": "l1tex__throughput.avg.pct_of_peak_sustained_active",
}
STALL = r"regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio$"
DEFINITIONS = {
    "us": "launch duration under ncu (clocks locked to base: longer than in the benchmark)",
    "occupancy_pct": "achieved active warps per SM, % of the 64 possible",
    "issue_active_pct": "cycles in which a scheduler issued an instruction, % (100 = one per cycle per scheduler)",
    "dram_pct": "DRAM throughput, % of peak over the launch",
    "l1tex_pct": "L1/TEX (and shared memory) throughput, % of peak",
    "stalls": "warp-cycles per issued instruction spent in each stall reason (ncu smsp__average_warps_issue_stalled_*)"
              "; 'selected' = 1 is the issue itself; a launch with few warps per scheduler and large "
              "'wait'/'long_scoreboard' is latency-bound",
}


def child(codec: str, k: int) -> None:
    """One profiled `kernels.linear` call (run under ncu by the parent)."""
    sys.path.insert(0, str(HERE))
    import run as R
    import torch

    from deltapack.kernels.triton import LaunchConfig, TritonKernels

    world = R.World(smoke=False)
    kern = TritonKernels(LaunchConfig())
    (layer,), _, tokens, x = R.kernel_case(world, codec, (4096, 4096), k)
    for _ in range(3):  # compile, build the plan, warm the caches of everything but the measured call
        kern.linear(x, tokens, layer)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    kern.linear(x, tokens, layer)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def parse(text: str) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO("".join(ln + "\n" for ln in text.splitlines() if ln.startswith('"')))))
    by_launch: dict[str, dict] = {}
    for r in rows:
        by_launch.setdefault(r["ID"], {"kernel": r["Kernel Name"]})[r["Metric Name"]] = r["Metric Value"]
    out = []
    for launch_id, m in sorted(by_launch.items(), key=lambda kv: int(kv[0])):
        num = {k: float(str(v).replace(",", "")) for k, v in m.items() if k != "kernel"}
        rec = {"kernel": m["kernel"]}
        for key, metric in METRICS.items():
            if metric in num:
                v = num[metric] / (1000.0 if key == "us" else 1.0)
                rec[key] = int(v) if key in ("registers", "grid", "block") else round(v, 2)
        stalls = {k.removeprefix("smsp__average_warps_issue_stalled_").removesuffix("_per_issue_active.ratio"): round(v, 2)
                  for k, v in num.items() if k.startswith("smsp__average_warps_issue_stalled_")}
        rec["stalls"] = dict(sorted(((k, v) for k, v in stalls.items() if v >= 0.05), key=lambda kv: -kv[1]))
        out.append(rec)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serving_ncu.json"))
    ap.add_argument("--cases", default=",".join(CASES), help="comma list of codec:k")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        codec, k = args.child.split(":")
        return child(codec, int(k))
    ncu = shutil.which("ncu")
    if ncu is None:
        sys.exit("ncu (Nsight Compute) not found on PATH")
    import torch

    sys.path.insert(0, str(HERE))
    from run import kernels_sha, write_json

    result = {
        "command": R.command_line(),
        "device": torch.cuda.get_device_name(0), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "kernels_sha": kernels_sha(), "shape": "4096x4096", "ratio": 16, "definitions": DEFINITIONS, "records": [],
        "errors": [],
    }
    metrics = ",".join(METRICS.values()) + "," + STALL
    for case in args.cases.split(","):
        codec, k = case.split(":")
        cmd = [ncu, "--profile-from-start", "off", "--kernel-name", "regex:_seg_kernel|_ell_kernel", "--csv", "--metrics", metrics, sys.executable, __file__, "--child", case]
        p = subprocess.run(cmd, capture_output=True, text=True)
        launches = parse(p.stdout)
        if p.returncode != 0 or not launches:
            result["errors"].append({"case": case, "rc": p.returncode, "tail": (p.stdout + p.stderr)[-1500:]})
            print(f"{case}: FAILED (rc {p.returncode})", flush=True)
            continue
        names = ["V side", "U side"] if codec in ("delta-come", "lowrank") and len(launches) == 2 else ["launch"] * len(launches)
        for name, rec in zip(names, launches):
            result["records"].append({"codec": codec, "k": int(k), "launch": name, **rec})
            print(f"{codec} k={k} {name}: {rec.get('us')} us, {rec.get('registers')} regs, occupancy "
                  f"{rec.get('occupancy_pct')}%, issue {rec.get('issue_active_pct')}%, dram {rec.get('dram_pct')}%, "
                  f"stalls {list(rec['stalls'].items())[:4]}", flush=True)
    write_json(Path(args.out), result)
    if result["errors"]:
        sys.exit(f"{len(result['errors'])} case(s) failed")


if __name__ == "__main__":
    main()
