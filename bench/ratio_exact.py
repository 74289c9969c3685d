"""Does `--ratio R` give a file of true ratio R? Compress one pair with each lossy method, record the true ratio on
disk, the compression seconds and how much the entropy stage saved per tensor kind; one labelled run per call,
merged into the output JSON (so a `before` run made with an older checkout's package and an `after` run sit side by
side).

    PYTHONPATH=/tmp/before/src python bench/ratio_exact.py --label before     # package of the commit before the change
    PYTHONPATH=src python bench/ratio_exact.py --label after

Default pair: the demo's (the embedded SmolLM2-135M-Instruct and its cached CPU full fine-tune, 16 AdamW steps: a
real fine-tune, though a short one; made on first use).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = "dare,deltadq,delta-come,lowrank,bitdelta,auto"


def entropy_savings(delta_dir: Path) -> dict[str, dict[str, float]]:
    """Per tensor kind: stored bytes before and after the entropy stage (coded parts at their frame sizes)."""
    from deltapack.compress.plan import tensor_kind
    from deltapack.format.directory import DeltaDir

    d = DeltaDir.open(delta_dir)
    out: dict[str, dict[str, float]] = {}
    for n, te in d.manifest.tensors.items():
        raw = coded = 0
        for k, t in d.parts(n).items():
            size = t.numel() * t.element_size()
            raw += size
            coded += sum(te.entropy[k]["frames"]) if k in te.entropy else size
        row = out.setdefault(tensor_kind(n, tuple(te.shape)), {"raw_bytes": 0, "coded_bytes": 0})
        row["raw_bytes"] += raw
        row["coded_bytes"] += coded
    for row in out.values():
        row["coded_fraction"] = round(row["coded_bytes"] / max(1, row["raw_bytes"]), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", required=True, help="name of this run in the JSON (e.g. before / after)")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--ratio", type=float, default=16.0)
    ap.add_argument("--base", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--finetuned", default=None, help="default: the demo's cached fine-tune")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ratio_exact_cpu.json")
    args = ap.parse_args(argv)

    import deltapack
    from deltapack import api

    torch.set_num_threads(2)
    base, ft = args.base, args.finetuned
    if base is None or ft is None:
        from deltapack.demo import demo_pair

        base, ft = demo_pair()
    pkg = Path(deltapack.__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(pkg), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        commit = None  # an exported tree (e.g. `git archive` of the commit before the change)
    run = {"command": "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]]),
           "package": str(Path(deltapack.__file__).resolve().parent), "package_commit": commit,
           "device": f"CPU, 2 cores ({torch.get_num_threads()} torch threads), torch {torch.__version__}",
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "base": str(base),
           "finetuned": str(ft), "ratio": args.ratio, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for method in [m for m in args.methods.split(",") if m]:
            out = Path(tmp) / method
            t0 = time.perf_counter()
            api.compress(base, ft, out, method=method, ratio=args.ratio, device="cpu", progress=False)
            seconds = time.perf_counter() - t0
            info = api.inspect(out)
            row = {"true_ratio": round(info["true_ratio"], 3), "off_target": round(info["true_ratio"] / args.ratio - 1, 4),
                   "compress_seconds": round(seconds, 1), "total_bytes": info["total_bytes"],
                   "entropy_by_kind": entropy_savings(out)}
            run["results"][method] = row
            print(f"{args.label} {method}: true {row['true_ratio']}x ({100 * row['off_target']:+.1f}%), "
                  f"{row['compress_seconds']} s", flush=True)
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc.setdefault("what", "true ratio on disk vs --ratio, per method (bench/ratio_exact.py)")
    doc.setdefault("runs", {})[args.label] = run
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
