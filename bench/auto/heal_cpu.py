"""Does healing lower the KL to the fine-tune on text it did not train on? On the CPU, on the demo pair (the embedded
SmolLM2-135M-Instruct and its cached CPU fine-tune): compress at 16x with each method and `heal`, then read healing's
own record from the delta's manifest (held-out calibration KL before and after, steps, seconds).

    python bench/auto/heal_cpu.py --methods dare,delta-come --steps 40 --out bench/results/heal_cpu_demo.json

The held-out sequences are a quarter of healing's calibration (at most 8), never trained on; healing keeps the
un-healed delta when their KL did not drop. The task-level check (the quality benchmark's auto+heal rows, held-out
families included) needs the GPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="dare,delta-come")
    ap.add_argument("--ratio", type=float, default=16.0)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=None, help="healing's learning rate (default: its own)")
    ap.add_argument("--max-seconds", type=float, default=900.0, help="generous: on the CPU a step takes seconds")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "heal_cpu_demo.json")
    args = ap.parse_args()

    from deltapack import api
    from deltapack.demo import demo_pair
    from deltapack.format.manifest import MANIFEST_NAME

    torch.set_num_threads(1)  # the shared 2-core machine: one thread is faster and steadier
    base, ft = demo_pair()
    heal = {"steps": args.steps, "max_seconds": args.max_seconds} | ({"lr": args.lr} if args.lr else {})
    doc = {"command": "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]]),
           "device": f"cpu {platform.machine()}, {torch.get_num_threads()} torch thread", "torch": torch.__version__,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "base": str(base),
           "finetuned": str(ft), "ratio": args.ratio, "heal": heal, "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        for method in [m for m in args.methods.split(",") if m]:
            out = Path(tmp) / method
            t0 = time.perf_counter()
            api.compress(base, ft, out, method=method, ratio=args.ratio, heal=heal, device="cpu", progress=False)
            rec = json.loads((out / MANIFEST_NAME).read_text()).get("calibration") or {}
            h = rec.get("heal") or {}
            row = {"method": method, "compress_seconds": round(time.perf_counter() - t0, 1),
                   "true_ratio": round(api.inspect(out)["true_ratio"], 3), "heal_seconds": h.get("seconds"),
                   **{k: h.get(k) for k in ("kl_before", "kl_after", "applied", "steps_done", "trainable", "lr",
                                            "batch", "best_step", "kl_last", "held_out_curve", "eval_every")}}
            if h.get("kl_before"):
                row["kl_change"] = round(h["kl_after"] / h["kl_before"] - 1, 4)
            doc["results"].append(row)
            print(json.dumps(row), flush=True)
            tmp_out = args.out.with_name(args.out.name + ".part")
            tmp_out.write_text(json.dumps(doc, indent=1) + "\n")
            tmp_out.replace(args.out)  # after every method: a killed run keeps what it measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
