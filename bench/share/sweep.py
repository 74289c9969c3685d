"""The sweep of DeltaLLM sharing settings (delta rank, shared modules, pattern, training data) as one table, from
the result files of bench/share/run.py.

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
sys.path.insert(0, str(ROOT / "src"))

from deltapack.io.writer import write_bytes_atomic, write_json_atomic  # noqa: E402
from deltapack.share.tasks import percent, result_intervals  # noqa: E402


def rows(path: Path) -> list[dict]:
    """One record per deltallm result of a bench/share/run.py results file."""
    res = json.loads(path.read_text())
    plans = {d["reduction"]: d["plan"] for d in res["details"]}
    name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    orig = res.get("original", {})
    out = []
    for r in (r for r in res["results"] if r["method"] == "deltallm"):
        blocks = plans[r["reduction"]]["blocks"]
        ci = result_intervals(orig, r)
        out.append({
            "file": name, "command": res["command"], "date": res["date"], "device": res["device"],
            "reduction": r["reduction"], "modules": res["settings"]["modules"], "pattern": res["settings"]["pattern"],
            "dependents": len(blocks), "rank": min(b["rank"] for b in blocks), "tokens": r["tokens"], "ppl": r["ppl"],
            "kl": r["kl"], "kept": r["kept"], "choice_kept": r.get("choice_kept"),
            "self_chat": res.get("data", {}).get("self_chat_samples"),
            "self_text": res.get("data", {}).get("self_text_samples", 0),  # files before --self-text existed had none
            "lr": res["settings"].get("lr"), "block_lr": res["settings"].get("block_lr", 0.0), "alpha": res["settings"].get("alpha", 1.0), "seed": res["settings"].get("seed"),
            "choice_kept_paired": r.get("choice_kept_paired"), "choice_kept_paired_interval": ci.get("choice_kept_paired"),
            "kept_items": orig.get("task_items_kept"),
            "task_items": orig.get("task_items"), "items_sha256": orig.get("task_items_sha256"),
            "kept_interval": ci["kept"], "choice_kept_interval": ci["choice_kept"],
        })
    return out


def _n(x) -> str:
    return "n/a" if x is None else f"{x:,}"


def repeated_runs_summary(recs: list[dict]) -> list[str]:
    """Mean and range over repeated runs of the default plan (mlp, sequential, ~8M tokens, 215 items), grouped by
    reduction, self-text samples and block learning rate: single runs differ by more than most knobs, so the
    comparison is made over runs."""
    lines = ["Repeated runs of the default plan (mlp, sequential, 215 items, 2048 self-chat samples, 8M tokens, α = 1; "
             "any lr and seed), with and without self-text, deltas trained alone (block lr 0) or with every other block "
             "weight (--block-lr): mean (min–max) over runs (runs with identical figures, a rerun on cached samples, "
             "count once).", "",
             "| reduction | self-text | block lr | runs | answers kept | paper's scoring | KL |", "|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for x in recs:
        if (x["modules"], x["pattern"], x["task_items"], x["self_chat"], x["alpha"]) == ("mlp", "sequential", 215, 2048, 1.0) \
                and 7_900_000 <= x["tokens"] <= 8_000_000:
            runs = groups.setdefault((x["reduction"], x["self_text"], x["block_lr"]), [])
            # a rerun on cached samples reproduces its figures exactly: one run, not two
            if not any((y["kl"], y["kept"], y["choice_kept"]) == (x["kl"], x["kept"], x["choice_kept"]) for y in runs):
                runs.append(x)

    def stat(xs: list[dict], key: str, fmt: str) -> str:
        v = [x[key] for x in xs if x[key] is not None]
        return f"{format(sum(v) / len(v), fmt)} ({format(min(v), fmt)}–{format(max(v), fmt)})" if v else "n/a"

    for (red, st, blr), xs in sorted(groups.items()):
        lines.append(f"| {red:.0%} | {st:,} | {blr:g} | {len(xs)} | {stat(xs, 'kept', '.1%')} | {stat(xs, 'choice_kept', '.1%')} | "
                     f"{stat(xs, 'kl', '.4f')} |")
    return lines


def sweep(files: list[Path]) -> tuple[str, list[dict]]:
    """The markdown table and its records, sorted by reduction, item set, modules, pattern, self-chat samples,
    dependents, tokens."""
    recs = sorted((x for f in files for x in rows(f.resolve())),
                  key=lambda x: (x["reduction"], x["task_items"] or 0, x["modules"] != "mlp", x["pattern"],
                                 x["self_text"], x["self_chat"] or 0, x["dependents"], x["block_lr"], x["tokens"], x["date"]))
    lines = ["| reduction | modules | pattern | dependents × rank | self-chat / self-text samples | lr, block lr, α, seed | training tokens | "
             "ppl | KL | items (kept set) | answers kept | paper's scoring | paired | date | command (file) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in recs:
        lines.append(f"| {x['reduction']:.0%} | {x['modules']} | {x['pattern']} | {x['dependents']} × {x['rank']} | "
                     f"{_n(x['self_chat'])} / {_n(x['self_text'])} | {'n/a' if x['lr'] is None else format(x['lr'], 'g')}, {x['block_lr']:g}, {x['alpha']:g}, {_n(x['seed'])} | {x['tokens']:,} | {x['ppl']:.2f} | {x['kl']:.4f} | "
                     f"{_n(x['task_items'])} ({_n(x['kept_items'])}){' ' + x['items_sha256'] if x['items_sha256'] else ''} | {percent(x['kept'], x['kept_interval'], bound_unit='%')} | "
                     f"{percent(x['choice_kept'], x['choice_kept_interval'], bound_unit='%')} | {percent(x['choice_kept_paired'], x['choice_kept_paired_interval'], bound_unit='%')} | "
                     f"{x['date'][:16]} | `{x['command']}` ({x['file']}) |")
    lines += ["", *repeated_runs_summary(recs)]
    text = ("DeltaLLM on SmolLM2-135M-Instruct, KL criterion: how the delta rank (and hence the number of dependents at "
            "a fixed parameter budget), the shared modules, the pattern and the training data (self-chat samples and "
            "free self-text the original generates, tokens) move quality. Device: "
            + ", ".join(sorted({x["device"] for x in recs})) + ". Runs without --rank use the default rule of their "
            "date: ⌊F/(4c)⌋ before 2026-11-24T12:00 (default_f4c.json), ⌊F/(2c)⌋ after. Rows with fewer than 8M "
            "tokens hit the run's wall-time bound (--train-seconds, which also pays for the block-wise local fit). "
            "Kept figures: value (95% interval); runs with different item counts were scored on different item "
            "sets (--per-task; files dated before 2026-11-24T15:50 drew the add/larger items with repeats, later ones "
            "record a hash of their item prompts beside the counts), so compare a row with rows of the same items. 'paired': "
            "of the items the original ranks right by likelihood, the share the model ranks right too (files before "
            "2026-11-24T20:30 did not record it). 'block lr' > 0: every other block weight (anchors, attention, intact "
            "blocks) trained too, at that learning rate (--block-lr, beyond the paper); runs on the same cached "
            "self-chat/self-text samples: blocklr0_same_samples.json with blocklr2e-5, 1e-4, 3e-4, 1e-3 and 3e-4_24pct; "
            "blocklr0_seed1_same_samples.json with blocklr3e-4_seed1; blocklr3e-4_run3 with blocklr3e-4_16m; healed_12 with healed_24 (the two parts of share.json; their baselines are in share.md). Runs of one device call ran as concurrent processes on the "
            "one GPU: their quality is unaffected, their seconds are not comparable (not shown).\n\n"
            + "\n".join(lines) + "\n")
    return text, recs


def default_files() -> list[Path]:
    """share.json and every sweep file; share.json is left out when it was combined (run.py --combine) from runs whose
    files are among the sweep files, so that no run is listed twice."""
    sweep_files = sorted((RESULTS / "share_sweep").glob("*.json"))
    main_file = RESULTS / "share.json"
    parts = {p["command"] for p in json.loads(main_file.read_text()).get("parts", [])} if main_file.exists() else set()
    listed = {json.loads(f.read_text())["command"] for f in sweep_files}
    return ([] if parts and parts <= listed else [main_file] if main_file.exists() else []) + sweep_files


def main(argv: list[str]) -> None:
    files = [Path(a) for a in argv] or default_files()
    text, recs = sweep(files)
    write_bytes_atomic(RESULTS / "share_rank_sweep.md", text.encode())
    write_json_atomic(RESULTS / "share_rank_sweep.json", {"command": "python bench/share/sweep.py", "records": recs})
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
