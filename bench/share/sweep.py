"""The delta-rank sweep of DeltaLLM sharing as one table, from the result files of bench/share/run.py.

    python bench/share/sweep.py        # bench/results/share.json + bench/results/share_sweep/*.json
                                       # -> bench/results/share_rank_sweep.md

Each row is one deltallm result: how many dependents the plan chose and at what rank (the --rank / default rule of
deltapack.share.plan.budget), the training tokens it got, and its held-out quality; the command and date come from
the result file, so every figure traces to a run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"


def rows(path: Path) -> list[dict]:
    res = json.loads(path.read_text())
    out = []
    for r, d in zip((r for r in res["results"] if r["method"] == "deltallm"), res["details"]):
        blocks = d["plan"]["blocks"]
        out.append({
            "file": str(path.relative_to(ROOT)), "command": res["command"], "date": res["date"], "device": res["device"],
            "reduction": r["reduction"], "modules": res["settings"]["modules"], "dependents": len(blocks), "rank": min(b["rank"] for b in blocks),
            "tokens": r["tokens"], "ppl": r["ppl"], "kl": r["kl"], "kept": r["kept"], "choice_kept": r.get("choice_kept"),
        })
    return out


def main(argv: list[str]) -> None:
    files = [Path(a) for a in argv] or [RESULTS / "share.json", *sorted((RESULTS / "share_sweep").glob("*.json"))]
    recs = sorted((x for f in files for x in rows(f.resolve())), key=lambda x: (x["reduction"], x["modules"] != "mlp", x["dependents"], x["tokens"]))
    lines = ["| reduction | modules | dependents × rank | training tokens | ppl | KL | answers kept | paper's scoring | date | command (file) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for x in recs:
        lines.append(f"| {x['reduction']:.0%} | {x['modules']} | {x['dependents']} × {x['rank']} | {x['tokens']:,} | {x['ppl']:.2f} | "
                     f"{x['kl']:.4f} | {x['kept']:.1%} | {x['choice_kept']:.1%} | {x['date'][:16]} | `{x['command']}` ({x['file']}) |")
    devices = sorted({x["device"] for x in recs})
    text = ("DeltaLLM on SmolLM2-135M-Instruct, sequential pattern, KL criterion: how the delta rank (and hence "
            "the number of dependents at a fixed parameter budget) and the shared modules move quality. Device: "
            + ", ".join(devices) + ".\n\n" + "\n".join(lines) + "\n")
    (RESULTS / "share_rank_sweep.md").write_text(text)
    (RESULTS / "share_rank_sweep.json").write_text(json.dumps({"command": "python bench/share/sweep.py", "records": recs}, indent=1))
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
