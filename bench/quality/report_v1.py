"""The report of the SUPERSEDED quality benchmark (three easy tasks: arithmetic, python, json; before issue 24),
kept so that its committed results stay reproducible: bench/results/superseded/quality_v1.{json,md,png} and the
"previous benchmark" section of docs/benchmarks.md (report.py renders it with `markdown` below). The tasks and the
runner that produced those results are in git history (commit 45af9e4, bench/quality/tasks.py and run.py).

Every number in quality_v1.md and the plot comes from the merged JSON (nothing typed by hand). Parts are run.py
outputs (`results`, `finetunes`, `notes`) and timing_7b.py outputs (`timing`); a (task, method label, target ratio)
measured in more than one part keeps the latest part's record.

    python bench/quality/report_v1.py bench/results/superseded/quality_v1_parts/*.json --out /tmp/v1/quality.json
    python bench/quality/report_v1.py --from-json bench/results/superseded/quality_v1.json   # re-render png + md
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, command_line, hex_to_items, load_json, now_iso, notes_block, paired_interval, save_figure, write_json  # noqa: E402
from common import fmt_or_dash as _f  # noqa: E402

from deltapack.eval.metrics import wilson  # noqa: E402

LABEL_ORDER = ["raw", "lowrank", "bitdelta", "bitdelta-distill", "dare", "delta-come-paper", "delta-come-optimal", "deltadq"]


def _label_key(label: str) -> tuple:
    return (LABEL_ORDER.index(label) if label in LABEL_ORDER else len(LABEL_ORDER), label)


def merge(paths: list[Path]) -> dict:
    parts = sorted(((p, load_json(p)) for p in paths), key=lambda pd: pd[1].get("date", ""))
    results: dict[tuple, dict] = {}
    history: dict[tuple, list[dict]] = defaultdict(list)  # every part's record of a key, oldest first
    timing: dict[tuple, dict] = {}
    finetunes: dict[str, dict] = {}
    notes, part_info, devices = [], [], []
    for p, d in parts:
        part_info.append({k: d.get(k) for k in ("command", "device", "date", "complete", "elapsed_s", "smoke")} | {"file": p.name})
        if d.get("device") and d["device"] not in devices:
            devices.append(d["device"])
        for r in d.get("results", []):
            # which fine-tune a record measured: a task can be fine-tuned in several parts (same seeded recipe)
            key = (r["task"], r.get("label", r["method"]), r["target_ratio"])
            results[key] = {**r, "finetune_part": p.name}
            history[key].append(results[key])
        for t in d.get("timing", []):
            timing[(t.get("label", t["method"]), t["target_ratio"])] = t
        for task, f in d.get("finetunes", {}).items():
            finetunes.setdefault(task, []).append({**f, "part": p.name, "date": d.get("date")})
        for n in d.get("notes", []):
            notes.append({**n, "part": p.name})
    # keep only the fine-tunes some kept record measured (a part whose records were all superseded drops out)
    used = {(r["task"], r["finetune_part"]) for r in results.values()}
    finetunes = {task: [f for f in fs if (task, f["part"]) in used] for task, fs in finetunes.items()}
    return {
        "command": command_line(),
        "part_commands": [pi["command"] for pi in part_info],
        "device": ", ".join(devices),
        "date": now_iso(),
        "parts": part_info,
        "finetunes": finetunes,
        "results": sorted(results.values(), key=lambda r: (r["task"], _label_key(r.get("label", r["method"])), r["target_ratio"] or 0)),
        "timing": sorted(timing.values(), key=lambda t: (_label_key(t.get("label", t["method"])), t["target_ratio"] or 0)),
        "notes": notes,
        # a (task, method, ratio) measured in more than one part: how much a re-run moves the numbers
        "repeats": [{"task": k[0], "label": k[1], "target_ratio": k[2], "parts": [r["finetune_part"] for r in rs],
                     "kept": [r.get("kept") for r in rs], "kl": [r["kl"] for r in rs],
                     "true_ratio": [r["true_ratio"] for r in rs], "n_eval": [r.get("n_eval") for r in rs]}
                    for k, rs in sorted(history.items(), key=lambda kv: (kv[0][0], _label_key(kv[0][1]), kv[0][2] or 0))
                    if len(rs) > 1 and k[2] is not None],
    }


def summarize(results: list[dict]) -> dict[str, dict]:
    """label -> target ratio -> mean over tasks of kept / accuracy / true ratio / KL (tasks with a record)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        groups[(r.get("label", r["method"]), r["target_ratio"])].append(r)
    out: dict[str, dict] = defaultdict(dict)
    for (label, ratio), rs in groups.items():
        kept = [r["kept"] for r in rs if r.get("kept") is not None]
        out[label]["lossless" if ratio is None else f"{ratio:g}"] = {
            "target_ratio": ratio,
            "tasks": sorted(r["task"] for r in rs),
            "kept": sum(kept) / len(kept) if kept else None,
            "accuracy": sum(r["accuracy"] for r in rs) / len(rs),
            "true_ratio": sum(r["true_ratio"] for r in rs) / len(rs),
            "nominal_ratio": sum(r["nominal_ratio"] for r in rs) / len(rs),
            "kl": sum(r["kl"] for r in rs) / len(rs),
            "seconds": sum(r["seconds"] for r in rs) / len(rs),
            "n_eval": sorted({r.get("n_eval") for r in rs if r.get("n_eval")}),
        }
    return dict(sorted(out.items(), key=lambda kv: _label_key(kv[0])))


def plot(merged: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    summary = summarize(merged["results"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    markers = "os^vD<>ph*"
    for i, (label, by_ratio) in enumerate(summary.items()):
        pts = sorted((v["true_ratio"], v["kept"], v["kl"]) for v in by_ratio.values() if v["kept"] is not None)
        if not pts:
            continue
        xs, ys, kls = zip(*pts)
        style = dict(marker=markers[i % len(markers)], label=label, linestyle="-" if len(xs) > 1 else "none")
        ax.plot(xs, ys, **style)
        pos = [(x, k) for x, k in zip(xs, kls) if k > 0]  # a lossless method's KL is exactly 0: nothing to draw on log y
        if pos:
            ax2.plot(*zip(*pos), **{**style, "linestyle": "-" if len(pos) > 1 else "none"})
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xlabel("true compression ratio (dense bf16 delta bytes / bytes on disk)")
        a.grid(True, which="both", alpha=0.3)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_ylabel("accuracy kept (rebuilt / fine-tune), mean over tasks")
    ax.set_ylim(bottom=0)
    ax2.set_yscale("log")
    ax2.set_ylabel("KL(fine-tune || rebuilt), nats/answer token")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    tasks = sorted({r["task"] for r in merged["results"]})
    fig.suptitle(f"SmolLM2-135M-Instruct full fine-tunes ({', '.join(tasks)}) on {merged.get('device', '?')}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def kept_interval(r: dict, finetune_items: str | None = None) -> tuple[tuple[float, float], str] | None:
    """Sampling interval of a record's accuracy kept, and how it was made. With per-item results of the record and
    of its fine-tune: paired bootstrap. Without (runs before per-item results were stored): the rebuilt model's
    Wilson 95% interval over n_eval items divided by the fine-tune's accuracy, which ignores the pairing and so is
    wider than the truth."""
    n, ft = r.get("n_eval"), r.get("finetuned_accuracy")
    if not n or not ft or r.get("accuracy") is None:
        return None
    if r.get("correct_items") and finetune_items:
        return paired_interval(hex_to_items(r["correct_items"], n), hex_to_items(finetune_items, n)), "paired bootstrap"
    lo, hi = wilson(r["accuracy"] * n, n)
    return (lo / ft, hi / ft), "unpaired Wilson"


def finetune_items_of(merged: dict, r: dict) -> str | None:
    runs = merged.get("finetunes", {}).get(r["task"], [])
    for f in runs if isinstance(runs, list) else [runs]:
        if f.get("part") == r.get("finetune_part"):
            return f.get("correct_items")
    return None


def targets_markdown(merged: dict, summary: dict) -> list[str]:
    """The issue's targets against the measured numbers (computed here, never typed)."""
    rows = []
    for label in ("delta-come-paper", "delta-come-optimal"):
        recs = {r["task"]: r for r in merged["results"]
                if r.get("label") == label and r["target_ratio"] == 16 and r.get("kept") is not None}
        if recs:
            worst = min(recs, key=lambda t: recs[t]["kept"])
            got = kept_interval(recs[worst], finetune_items_of(merged, recs[worst]))
            span = (f", 95% interval {got[0][0]:.3f}–{got[0][1]:.3f} ({got[1]}) over {recs[worst]['n_eval']} items"
                    if got else "")
            rows.append((f"{label} at 16x keeps ≥ 0.99 on every task", 0.99, recs[worst]["kept"],
                         f"lowest: {worst} {recs[worst]['kept']:.3f}{span}"))
    for ratio, goal in ((32, 0.97), (64, 0.90)):
        cands = [(by[f"{ratio}"]["kept"], label) for label, by in summary.items()
                 if f"{ratio}" in by and by[f"{ratio}"]["kept"] is not None]
        if cands:
            best, label = max(cands)
            rows.append((f"best method at {ratio}x keeps ≥ {goal:.2f} (mean over tasks)", goal, best, f"{label}"))
    for t in merged.get("timing", []):
        if t["method"] == "delta-come":
            rows.append((f"7B-shaped {t.get('label', t['method'])} in ≤ 300 s", None, t["seconds"],
                         f"{t['seconds']:.0f} s"))
    if not rows:
        return []
    out = ["", "**Targets** (issue 4) against this run (intervals: a paired bootstrap over the test items where "
           "per-item results were stored, else the rebuilt model's binomial interval ÷ the fine-tune's accuracy, "
           "which ignores the pairing and is wider):", "",
           "| target | measured | met |", "|---|---|---|"]
    for text, goal, value, detail in rows:
        met = value <= 300 if goal is None else value >= goal
        shown = detail if goal is None else f"{value:.3f} ({detail})"
        out.append(f"| {text} | {shown} | {'yes' if met else 'no'} |")
    return out


def markdown(merged: dict, json_name: str) -> str:
    summary = summarize(merged["results"])
    ratios = sorted({r["target_ratio"] for r in merged["results"] if r["target_ratio"] is not None})
    lines = [
        "<!-- generated by bench/quality/report.py from " + json_name + "; do not edit by hand -->",
        f"Device: {merged.get('device') or '?'}. Generated {merged['date']}.",
        "",
        "**Accuracy kept** (exact-match accuracy of the rebuilt model / the fine-tune's, mean over tasks), with the mean "
        "true ratio reached in parentheses:",
        "",
        "| method | " + " | ".join(f"{r:g}x" for r in ratios) + (" | lossless |" if any(r["target_ratio"] is None for r in merged["results"]) else " |"),
        "|---|" + "---|" * (len(ratios) + (1 if any(r["target_ratio"] is None for r in merged["results"]) else 0)),
    ]
    has_lossless = any(r["target_ratio"] is None for r in merged["results"])
    all_tasks = sorted({r["task"] for r in merged["results"]})
    subset_marks: dict[tuple, str] = {}  # task subsets other than all tasks get a footnote mark each
    for label, by in summary.items():
        cells = []
        for r in ratios:
            v = by.get(f"{r:g}")
            if not v:
                cells.append("–")
                continue
            mark = ""
            if v["tasks"] != all_tasks:
                mark = subset_marks.setdefault(tuple(v["tasks"]), "†" * (len(subset_marks) + 1))
            if abs(v["true_ratio"] / r - 1) > 0.10:
                mark += "‡"
            if v.get("n_eval") and max(v["n_eval"]) > 128:
                mark += "§"
            cells.append(f"{_f(v['kept'])} ({v['true_ratio']:.1f}x){mark}")
        if has_lossless:
            v = by.get("lossless")
            cells.append(f"{_f(v['kept'])} ({v['true_ratio']:.2f}x)" if v else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for tasks, mark in subset_marks.items():
        lines.append(f"\n{mark} {', '.join(tasks)} only (not every task was run at this ratio).")
    if any("§" in ln for ln in lines):
        lines.append("\n§ re-measured on more test items (1024 per task, fine-tune re-made by the same recipe) where the "
                     "128-item runs could not resolve the target; the n per record is in the full table below, the "
                     "earlier values under 'Repeated measurements'.")
    if any("‡" in ln for ln in lines):
        lines.append("\n‡ true ratio more than 10% away from the target (the method cannot reach it, or did not fill it).")
    keys = [f"{r:g}" for r in ratios] + (["lossless"] if has_lossless else [])
    lines += ["", "**KL(fine-tune ‖ rebuilt)**, nats per answer token, mean over tasks:", "",
              "| method | " + " | ".join(k if k == "lossless" else f"{k}x" for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for label, by in summary.items():
        lines.append(f"| {label} | " + " | ".join(_f(by[k]['kl'], '{:.4f}') if k in by else "–" for k in keys) + " |")

    if merged.get("finetunes"):
        lines += ["", "**Fine-tunes** (test split exact match; a task fine-tuned in two device runs by the same seeded "
                  "recipe has a row per run, and each record's accuracy kept is against its own run's fine-tune):", "",
                  "| task | run (part) | ratios measured on it | base | fine-tune | gain | steps | final train loss | train s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for task, runs in sorted(merged["finetunes"].items()):
            for f in runs if isinstance(runs, list) else [runs]:
                ratios = sorted({r["target_ratio"] for r in merged["results"]
                                 if r["task"] == task and r.get("finetune_part") == f.get("part")}, key=lambda x: x or 0)
                shown = ", ".join("lossless" if x is None else f"{x:g}x" for x in ratios) or "–"
                lines.append(f"| {task} | {f.get('part', '–')} | {shown} | {_f(f.get('base_accuracy'))} | "
                             f"{_f(f.get('finetuned_accuracy'))} | {_f(f.get('gain'))} | {f.get('steps', '–')} | "
                             f"{_f((f.get('rounds') or [{}])[-1].get('final_loss'), '{:.10g}')} | "
                             f"{_f(f.get('train_seconds'), '{:.0f}')} |")

    lines += ["", "<details><summary>Every run</summary>", "",
              "| task | method | target | true ratio | nominal | test items | accuracy | kept | KL | compress s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in merged["results"]:
        tgt = "lossless" if r["target_ratio"] is None else f"{r['target_ratio']:g}x"
        lines.append(f"| {r['task']} | {r.get('label', r['method'])} | {tgt} | {r['true_ratio']:.2f}x | {r['nominal_ratio']:.2f}x | "
                     f"{r.get('n_eval', '–')} | {r['accuracy']:.3f} | {_f(r.get('kept'))} | {r['kl']:.4f} | {r['seconds']:.1f} |")
    lines += ["", "</details>"]

    if merged.get("timing"):
        lines += ["", "**Compression time on a Llama-2-7B-shaped pair** (`deltapack.api.compress`, sharded safetensors "
                  "checkpoint, synthetic long-tailed delta):", "",
                  "| method | target | seconds | peak GPU GB | peak host RSS GB | true ratio | shape |",
                  "|---|---|---|---|---|---|---|"]
        for t in merged["timing"]:
            tgt = "lossless" if t["target_ratio"] is None else f"{t['target_ratio']:g}x"
            lines.append(f"| {t.get('label', t['method'])} | {tgt} | {t['seconds']:.1f} | {_f(t.get('peak_gpu_gb'), '{:.1f}')} | "
                         f"{_f(t.get('peak_rss_gb'), '{:.1f}')} | "
                         f"{_f(t.get('true_ratio'), '{:.1f}x')} | {t.get('shape', '–')} |")
    lines += targets_markdown(merged, summary)
    if merged.get("repeats"):
        lines += ["", "<details><summary>Repeated measurements</summary>", "", "**Repeated measurements** (the same task, method and ratio in more than one device run, oldest "
                  "first; every fine-tune is the same seeded recipe, see the final losses above, but a larger test split "
                  "changes the test items and can change the training split; with the same items and the same true "
                  "ratio, only delta-come moves, since its GPU compression is not bit-reproducible; a different true "
                  "ratio means the method's code changed between the runs; the tables above keep the latest):", "",
                  "| task | method | target | true ratio | test items | accuracy kept | KL | parts |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in merged["repeats"]:
            lines.append(f"| {r['task']} | {r['label']} | {r['target_ratio']:g}x | "
                         f"{' → '.join(f'{x:.1f}x' for x in r['true_ratio'])} | "
                         f"{' → '.join(str(n or '–') for n in r['n_eval'])} | "
                         f"{' → '.join(_f(k) for k in r['kept'])} | {' → '.join(_f(k, '{:.4f}') for k in r['kl'])} | "
                         f"{' → '.join(r['parts'])} |")
        lines += ["", "</details>"]
    if merged.get("notes"):
        lines += notes_block(merged["notes"], ("task", "method", "target_ratio"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="merge benchmark parts; write quality.json, .png, .md")
    ap.add_argument("parts", nargs="*", type=Path)
    ap.add_argument("--out", type=Path, default=RESULTS / "superseded" / "quality_v1.json")
    ap.add_argument("--from-json", type=Path, default=None, help="re-render from an existing merged JSON")
    args = ap.parse_args(argv)
    if args.from_json:
        merged, out = load_json(args.from_json), args.from_json
    else:
        if not args.parts:
            ap.error("give part files, or --from-json")
        merged, out = merge(args.parts), args.out
        merged["summary"] = summarize(merged["results"])
        write_json(out, merged)
    png = plot(merged, out.with_suffix(".png"))
    md = out.with_suffix(".md")
    tmp = md.with_name(md.name + ".part")
    tmp.write_text(markdown(merged, out.name))
    tmp.replace(md)
    print(f"wrote {out}, {png}, {md} ({len(merged['results'])} results, {len(merged.get('timing', []))} timings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
