"""The quality benchmark's report: merge the device calls' JSON parts into bench/results/quality.json, then generate
from that JSON alone (nothing typed by hand):

- bench/results/quality.png: accuracy kept vs true ratio, worst task per method with its interval; tuning families
  and held-out families in separate panels; default calibration solid, task-calibrated dashed;
- docs/benchmarks.md, between `<!-- table:quality -->` markers: worst task (default calibration first, the
  task-calibrated column second), held-out families apart, every task's table, the issue's targets, paired
  differences (auto vs the best single method, auto+heal vs auto), fine-tunes, every run, notes; and between
  `<!-- table:quality-superseded -->` markers the previous benchmark's tables from bench/results/superseded/
  quality_v1.json (report_v1.py renders them, byte for byte as they were);
- the "which method should I use" table: bench/results/which-method.md and README.md between
  `<!-- table:which-method -->` markers (bench/update_readme.py copies the same file into the same block).

    python bench/quality/report.py --merge bench/results/quality_parts/*.json    # parts -> quality.json, render
    python bench/quality/report.py                                               # render from quality.json
    python bench/quality/report.py --check    # exit 1 when a generated text differs from what the JSON generates

Records are keyed by (task, method label, target ratio, calibration); the latest part's record of a key wins (parts
are ordered by their date; a record's `measured` time breaks ties).
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (INTERVAL_TEXT, LABEL_ORDER, REPO, RESULTS, command_line, hex_to_items, label_key,  # noqa: E402
                    load_json, notes_block, now_iso, paired_difference_interval, save_figure, write_json)
from common import fmt_or_dash as _f  # noqa: E402
from tasks import HELDOUT, TASKS, TUNING  # noqa: E402

from deltapack.eval.metrics import wilson  # noqa: E402

JSON_PATH = RESULTS / "quality.json"
SUPERSEDED_JSON = RESULTS / "superseded" / "quality_v1.json"
DOCS = REPO / "docs" / "benchmarks.md"
README = REPO / "README.md"
WHICH_MD = RESULTS / "which-method.md"
# the same table shipped inside the package, for `deltapack methods` (bench/ is not installed)
PACKAGE_WHICH_MD = REPO / "src" / "deltapack" / "methods" / "which_method.md"
TARGETS = {16.0: 0.99, 32.0: 0.98, 64.0: 0.95, 128.0: 0.90}  # issue 24: worst task, default calibration
BLOCK_QUALITY, BLOCK_SUPERSEDED, BLOCK_WHICH = "quality", "quality-superseded", "which-method"


# ---- merge ----------------------------------------------------------------------------------------------------------
def record_key(r: dict) -> tuple:
    return (r["task"], r.get("label", r["method"]), r["target_ratio"], r.get("calibration", "default"))


def merge(paths: list[Path]) -> dict:
    parts = sorted(((Path(p), load_json(p)) for p in paths), key=lambda pd: pd[1].get("date", ""))
    results: dict[tuple, dict] = {}
    history: dict[tuple, list[dict]] = defaultdict(list)
    finetunes: dict[str, dict[str, dict]] = defaultdict(dict)  # task -> finetune_id -> info (latest part's)
    timing: dict[tuple, dict] = {}
    notes: dict[tuple, dict] = {}
    part_info, devices = [], []
    for p, d in parts:
        part_info.append({k: d.get(k) for k in ("command", "device", "date", "complete", "elapsed_s", "smoke")}
                         | {"file": p.name})
        if d.get("device") and d["device"] not in devices:
            devices.append(d["device"])
        for r in sorted(d.get("results", []), key=lambda r: r.get("measured", "")):
            key = record_key(r)
            if results.get(key, {}).get("measured") != r.get("measured") or key not in results:
                history[key].append(r)
            results[key] = {**r, "part": p.name}
        for task, f in d.get("finetunes", {}).items():
            finetunes[task][f.get("finetune_id", p.name)] = {**f, "part": p.name}
        for t in d.get("timing", []):  # the part's date: a timing is only comparable with the code of its day
            timing[(t.get("label", t["method"]), t["target_ratio"])] = {"measured": d.get("date"), **t}
        for n in d.get("notes", []):
            notes[(n.get("task"), n.get("method"), n.get("target_ratio"), n.get("calibration"), n["note"])] = n
    # a note about a job that some part did measure (e.g. "not started" in the first call, run in the second) goes
    done = {k for k in results}
    notes_kept = [n for (task, method, ratio, cal, _), n in notes.items()
                  if not (ratio is not None and (task, method, ratio, cal or "default") in done)]
    # one fine-tune per task is current: the latest made. A cell measured only on an earlier fine-tune of the same
    # recipe (a call that ran out of time) keeps that record, marked, rather than vanishing; paired comparisons only
    # ever pair records of the same fine-tune.
    current = {task: max(fs.values(), key=lambda f: (f.get("created") or "", f["part"]))["finetune_id"]
               for task, fs in finetunes.items() if fs and all(f.get("finetune_id") for f in fs.values())}
    for r in results.values():
        if r["task"] in current and r.get("finetune_id") != current[r["task"]]:
            r["earlier_finetune"] = True
        else:
            r.pop("earlier_finetune", None)
    used = {(r["task"], r.get("finetune_id")) for r in results.values()}
    return {
        "benchmark": "quality v2 (issue 24): six task families, default and task calibration",
        "command": command_line(), "merged": now_iso(), "device": ", ".join(devices), "parts": part_info,
        "finetunes": {t: [f for fid, f in fs.items() if (t, fid) in used or not used] for t, fs in finetunes.items()},
        "results": sorted(results.values(), key=lambda r: (TASKS.index(r["task"]) if r["task"] in TASKS else 99,
                                                           label_key(r["label"]), r["target_ratio"] or 0,
                                                           r.get("calibration", "default"))),
        "timing": sorted(timing.values(), key=lambda t: (label_key(t.get("label", t["method"])), t["target_ratio"] or 0)),
        "notes": notes_kept,
        # a key measured in more than one call (a re-run): how much the numbers moved
        "repeats": [{"task": k[0], "label": k[1], "target_ratio": k[2], "calibration": k[3],
                     "kept": [r.get("kept") for r in rs], "kl": [r.get("kl") for r in rs],
                     "true_ratio": [r.get("true_ratio") for r in rs]}
                    for k, rs in history.items() if len(rs) > 1],
    }


# ---- views of the merged results ------------------------------------------------------------------------------------
def by_cell(results: list[dict]) -> dict[tuple, dict[str, dict]]:
    """(label, target ratio, calibration) -> task -> record."""
    out: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in results:
        out[(r["label"], r["target_ratio"], r.get("calibration", "default"))][r["task"]] = r
    return out


def worst(cell: dict[str, dict], tasks: tuple[str, ...]) -> tuple[dict | None, bool]:
    """The record of the task with the lowest accuracy kept among `tasks`, and whether every one of them was run."""
    recs = [cell[t] for t in tasks if t in cell and cell[t].get("kept") is not None]
    if not recs:
        return None, False
    low = min(recs, key=lambda r: (r["kept"], r["task"]))
    if any(r.get("earlier_finetune") for r in recs) and not low.get("earlier_finetune"):
        # the worst of a row that mixes fine-tune sets is marked too: with the other set's records the worst might differ
        low = {**low, "mixed_sets": True}
    return low, len(recs) == len(tasks)


def kept_text(r: dict | None, *, ratio: bool = False, task: bool = False, complete: bool = True) -> str:
    if r is None:
        return "–"
    lo, hi = (r.get("kept_interval") or [None, None])
    text = f"{_f(r['kept'])} [{_f(lo)}, {_f(hi)}]"
    if ratio:
        text += f" {r['true_ratio']:.1f}x"
    if task:
        text += f" {r['task']}"
    return text + ("" if complete else " †") + (" ‡" if r.get("earlier_finetune") or r.get("mixed_sets") else "")


def labels_of(results: list[dict]) -> list[str]:
    return sorted({r["label"] for r in results}, key=label_key)


def ratios_of(results: list[dict]) -> list[float]:
    return sorted({r["target_ratio"] for r in results if r["target_ratio"] is not None})


def has_task_calibration(results: list[dict], label: str) -> bool:
    return any(r["label"] == label and r.get("calibration") == "task" for r in results)


def worst_table(results: list[dict], tasks: tuple[str, ...]) -> list[str]:
    cells = by_cell(results)
    ratios = ratios_of(results)
    head = "| method | " + " | ".join(f"{r:g}x default | {r:g}x task" for r in ratios) + " |"
    lines = [head, "|---|" + "---|---|" * len(ratios)]
    for label in labels_of(results):
        row = []
        for ratio in ratios:
            for cal in ("default", "task"):
                rec, complete = worst(cells.get((label, ratio, cal), {}), tasks)
                if rec is None and cal == "task" and not has_task_calibration(results, label):
                    row.append("n/a")
                else:
                    row.append(kept_text(rec, task=True, complete=complete))
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return lines


def task_table(results: list[dict], task: str) -> list[str]:
    cells = by_cell([r for r in results if r["task"] == task])
    ratios = ratios_of(results)
    lines = ["| method | " + " | ".join(f"{r:g}x default | {r:g}x task" for r in ratios) + " |",
             "|---|" + "---|---|" * len(ratios)]
    for label in labels_of(results):
        row = []
        for ratio in ratios:
            for cal in ("default", "task"):
                rec = cells.get((label, ratio, cal), {}).get(task)
                row.append("n/a" if rec is None and cal == "task" and not has_task_calibration(results, label)
                           else kept_text(rec, ratio=True))
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return lines


def which_method_markdown(merged: dict | None, json_name: str) -> str:
    head = f"<!-- generated by bench/quality/report.py from {json_name}; do not edit by hand -->"
    if not merged or not merged.get("results"):
        return (f"{head}\nNo results of the quality benchmark yet (bench/quality/README.md says how to run it on the "
                "GPU machine).\n")
    results = [r for r in merged["results"] if r.get("calibration", "default") == "default"]
    cells = by_cell(results)
    ratios = ratios_of(results)
    # the labels a user can ask for (LABEL_ORDER); variants of a method's settings stay in docs/benchmarks.md
    public = [lab for lab in labels_of(results) if lab in LABEL_ORDER]
    best = {}
    for ratio in ratios:
        # bold only a row of all six families measured on the latest fine-tunes: a partial or mixed row is no winner
        scores = []
        for lab in public:
            rec, complete = worst(cells.get((lab, ratio, "default"), {}), TASKS)
            if rec is not None and complete and not (rec.get("earlier_finetune") or rec.get("mixed_sets")):
                scores.append(rec["kept"])
        best[ratio] = max(scores, default=None)
    lines = [head, "Accuracy kept by the worst of the six task families (held-out families included) at each target "
             "true ratio, with no calibration file (the default), rebuilt ÷ fine-tune, 95% paired interval; best per "
             "column in bold (among rows with all six families on the latest fine-tunes); † = not every family "
             "measured; ‡ = on an earlier fine-tune of the same recipe, or a row mixing fine-tune sets. "
             "Per-family tables: "
             "[docs/benchmarks.md](docs/benchmarks.md).", "",
             "| method | " + " | ".join(f"{r:g}x" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
    for label in public:
        row = []
        for ratio in ratios:
            rec, complete = worst(cells.get((label, ratio, "default"), {}), TASKS)
            text = kept_text(rec, complete=complete)
            if (rec is not None and complete and rec["kept"] == best[ratio]
                    and not (rec.get("earlier_finetune") or rec.get("mixed_sets"))):
                text = f"**{_f(rec['kept'])}**" + text[len(_f(rec["kept"])):]
            row.append(text)
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def targets_lines(results: list[dict]) -> list[str]:
    """The issue's targets (worst task, held-out included, default calibration) against the best method."""
    cells = by_cell([r for r in results if r.get("calibration", "default") == "default"])
    out = ["| target ratio | target kept | best method (worst task) | interval | met | short by |", "|---|---|---|---|---|---|"]
    for ratio, goal in TARGETS.items():
        cands = []
        for label in labels_of(results):
            cell = cells.get((label, ratio, "default"), {})
            rec, complete = worst(cell, TASKS)
            if rec is not None and complete:
                mixed = bool(rec.get("earlier_finetune") or rec.get("mixed_sets"))
                cands.append((not mixed, rec["kept"], label, rec))
        if not cands:
            out.append(f"| {ratio:g}x | {goal:.2f} | not measured on every family | – | – | – |")
            continue
        # a row measured wholly on the latest fine-tunes first: a row that mixes fine-tune sets takes each task's
        # worst-case from whichever set it was measured on, which no single user's fine-tune sees (marked ‡)
        latest, kept, label, rec = max(cands, key=lambda c: (c[0], c[1], -label_key(c[2])[0]))  # tie: earlier label
        lo, hi = rec.get("kept_interval") or [None, None]
        met = "yes" if kept >= goal else ("no (interval below the target)" if hi is not None and hi < goal else "no")
        out.append(f"| {ratio:g}x | {goal:.2f} | {label}: {kept:.3f} ({rec['task']}, true {rec['true_ratio']:.1f}x)"
                   f"{'' if latest else ' ‡'} | [{_f(lo)}, {_f(hi)}] | {met} | {_f(max(0.0, goal - kept))} |")
    return out


TIME_TARGET_S = 300.0  # issue 24: 7B-shaped compression with auto (and auto+heal) on one H100


def _items(r: dict) -> list[bool]:
    return hex_to_items(r["correct_items"], r["n_eval"])


def difference_lines(results: list[dict], finetunes: dict) -> list[str]:
    """auto vs the best other method, and auto+heal vs auto, per task and ratio (default calibration), as paired
    differences of accuracy kept with 95% bootstrap intervals over the same test items."""
    cells = by_cell([r for r in results if r.get("calibration", "default") == "default"])
    ft_items = {}
    for task, runs in finetunes.items():
        for f in runs:
            if f.get("finetuned_items"):
                ft_items[(task, f.get("finetune_id"))] = hex_to_items(f["finetuned_items"], f["n_eval"])
    labels = labels_of(results)
    method_of = {r["label"]: r.get("method") for r in results}
    # auto against the single methods; every other label of method auto (auto+heal, variants) against auto
    pairs = [("auto", "best")] + [(lab, "auto") for lab in labels if lab != "auto" and method_of.get(lab) == "auto"]
    out = []
    for a_label, against in pairs:
        if a_label not in labels:
            continue
        rows = []
        for task in (*TUNING, *HELDOUT):
            for ratio in ratios_of(results):
                cell = cells.get((a_label, ratio, "default"), {})
                a = cell.get(task)
                if a is None:
                    continue
                if against == "best":
                    others = [cells.get((lab, ratio, "default"), {}).get(task) for lab in labels
                              if method_of.get(lab) != "auto"]
                    others = [o for o in others if o is not None and o.get("kept") is not None
                              and o.get("finetune_id") == a.get("finetune_id")]
                    if not others:
                        continue
                    b = max(others, key=lambda o: (o["kept"], -label_key(o["label"])[0]))
                else:
                    b = cells.get(("auto", ratio, "default"), {}).get(task)
                    if b is None or b.get("finetune_id") != a.get("finetune_id"):
                        continue
                ref = ft_items.get((task, a.get("finetune_id")))
                if ref is None or len(ref) != a["n_eval"] or b["n_eval"] != a["n_eval"] or not any(ref):
                    continue  # (a fine-tune that gets nothing right has no "kept" to compare: smoke runs)
                d, lo, hi = paired_difference_interval(_items(a), _items(b), ref)
                sign = "better" if lo > 0 else "worse" if hi < 0 else "equal within the interval"
                rows.append(f"| {task}{' (held out)' if task in HELDOUT else ''} | {ratio:g}x | {a['kept']:.3f} | "
                            f"{b['label']}: {b['kept']:.3f} | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] | {sign} |")
        if rows:
            title = ("**auto against the best single method** of the same task and ratio (default calibration; "
                     "the issue asks that auto is never worse):" if against == "best" else
                     "**auto+heal against auto** (default calibration; the held-out rows show whether healing "
                     "overfits):" if a_label == "auto+heal" else
                     f"**{a_label} against auto** (default calibration; a variant of auto's settings):")
            out += ["", title, "", f"| task | ratio | {a_label} kept | {'best other' if against == 'best' else 'auto'} "
                    "kept | difference [95% paired interval] | verdict |", "|---|---|---|---|---|---|", *rows]
    return out


def finetune_lines(finetunes: dict) -> list[str]:
    out = ["| task | held out | base | fine-tune (95% interval) | test items | dev | steps (planned) | final train loss "
           "| train s | chat: fact accuracy base → fine-tune |", "|---|---|---|---|---|---|---|---|---|---|"]
    for task in (*TUNING, *HELDOUT):
        for f in finetunes.get(task, []):
            n = f.get("n_eval") or 0
            lo, hi = wilson(f["finetuned_accuracy"] * n, n) if n else (None, None)
            dev = f.get("dev", {})
            dev_text = _f(dev.get("accuracy", dev.get("fact_accuracy")))
            fact = (f"{_f(f.get('base_fact_accuracy'))} → {_f(f.get('finetuned_fact_accuracy'))}"
                    if "finetuned_fact_accuracy" in f else "")
            out.append(f"| {task} | {'yes' if task in HELDOUT else 'no'} | {_f(f.get('base_accuracy'))} | "
                       f"{_f(f['finetuned_accuracy'])} [{_f(lo)}, {_f(hi)}] | {n} | {dev_text} | {f.get('steps')} "
                       f"({f.get('steps_planned')}) | {_f(f.get('final_loss'), '{:.4f}')} | "
                       f"{_f(f.get('train_seconds'), '{:.0f}')} | {fact} |")
    return out


def kind_lines(finetunes: dict) -> list[str]:
    """The fine-tune's and the base's test score per item kind (tasks.Record.kind): where a family is too hard."""
    rows = []
    for task in (*TUNING, *HELDOUT):
        for f in finetunes.get(task, []):
            prefix = "finetuned_fact" if "finetuned_fact_by_kind" in f else "finetuned"
            for kind, (n, right) in f.get(f"{prefix}_by_kind", {}).items():
                base = f.get(prefix.replace("finetuned", "base") + "_by_kind", {}).get(kind, [n, None])[1]
                rows.append(f"| {task} | {kind} | {n} | {_f(base / n if base is not None else None)} | "
                            f"{right / n:.3f} |")
    if not rows:
        return []
    return ["", "<details><summary>Fine-tune test scores by item kind (chat: fact accuracy)</summary>", "",
            "| task | kind | items | base | fine-tune |", "|---|---|---|---|---|", *rows, "", "</details>"]


def every_run_lines(results: list[dict]) -> list[str]:
    out = ["| task | method | calibration | target | true ratio | nominal | accuracy | kept [95% interval] | KL | "
           "compress s | eval s | chat: token agreement, fact accuracy |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        chat = (f"{r['token_agreement']:.3f}, {r['fact_accuracy']:.3f}" if "token_agreement" in r else "")
        out.append(f"| {r['task']} | {r['label']} | {r.get('calibration', 'default')} | {r['target_ratio']:g}x | "
                   f"{r['true_ratio']:.2f}x | {r['nominal_ratio']:.2f}x | {r['accuracy']:.3f} | {kept_text(r)} | "
                   f"{r['kl']:.4f} | {r['seconds']:.1f} | {r.get('eval_seconds', 0):.1f} | {chat} |")
    return out


def quality_markdown(merged: dict | None, json_name: str) -> str:
    head = f"<!-- generated by bench/quality/report.py from {json_name}; do not edit by hand -->"
    if not merged or not merged.get("results"):
        return (f"{head}\nNo results yet. Run the benchmark on the GPU machine (bench/quality/README.md, "
                "bench/quality/run_gpu.sh), copy the parts to bench/results/quality_parts/ and run "
                "`python bench/quality/report.py --merge bench/results/quality_parts/*.json`.\n")
    results = merged["results"]
    lines = [head, f"Device: {merged.get('device') or '?'}; parts merged {merged.get('merged', '?')}. Accuracy kept = "
             f"rebuilt model's score ÷ the fine-tune's on the same test items; [brackets]: {INTERVAL_TEXT}. "
             "`default` = no calibration file (what `deltapack compress` does without --calib); `task` = the task's "
             "own training split as --calib; n/a = no task-calibrated run of this method (none exists for a data-free "
             "method; none was made in these parts otherwise); – = not measured. † = not every family of the "
             "row was measured. ‡ = measured on an earlier fine-tune of the same recipe (that task's latest fine-tune "
             "was not evaluated in this cell), or, on a worst-task cell, a row whose families were measured on different "
             "fine-tune sets; the fine-tunes table lists them.", "",
             "### Worst task, tuning families (" + ", ".join(TUNING) + ")", "", *worst_table(results, TUNING), "",
             "### Worst task, held-out families (" + ", ".join(HELDOUT) + ")", "",
             "Never used to choose a method, knob, default or calibration (decided before any result, "
             "bench/quality/README.md).", "", *worst_table(results, HELDOUT), "",
             "### Targets (issue 24: worst of all six families, default calibration, true ratios)", "",
             *targets_lines(results)]
    lines += difference_lines(results, merged.get("finetunes", {}))
    lines += ["", "### Per task (cells: kept [interval] and the true ratio reached)"]
    for group, tasks in (("tuning family", TUNING), ("held-out family", HELDOUT)):
        for task in tasks:
            if any(r["task"] == task for r in results):
                lines += ["", f"**{task}** ({group})", "", *task_table(results, task)]
    lines += ["", "### Fine-tunes", "", *finetune_lines(merged.get("finetunes", {}))]
    lines += kind_lines(merged.get("finetunes", {}))
    lines += ["", "<details><summary>Every run</summary>", "", *every_run_lines(results), "", "</details>"]
    if merged.get("timing"):
        lines += ["", "**Compression time on a Llama-2-7B-shaped pair** (bench/quality/timing_7b.py; target of issue "
                  f"24: ≤ {TIME_TARGET_S:.0f} s on one H100; the largest phases say where the time goes):", "",
                  "| method | target | seconds | ≤ 5 min | peak GPU GB | true ratio | largest phases (s) | measured |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in merged["timing"]:
            top = sorted(((k, v) for k, v in (t.get("phases") or {}).items() if k.count(".") == 1),
                         key=lambda kv: -kv[1])[:4]
            lines.append(f"| {t.get('label', t['method'])} | {_f(t['target_ratio'], '{:g}x')} | {t['seconds']:.1f} | "
                         f"{'yes' if t['seconds'] <= TIME_TARGET_S else 'no'} | {_f(t.get('peak_gpu_gb'), '{:.1f}')} | "
                         f"{_f(t.get('true_ratio'), '{:.1f}x')} | {', '.join(f'{k} {v:.0f}' for k, v in top) or '–'} | "
                         f"{(t.get('measured') or '–')[:16].replace('T', ' ')} |")
        timed = {t.get("label", t["method"]) for t in merged["timing"]}
        for n in merged.get("notes", []):
            if n.get("task") is None and n.get("method") not in timed and "error" in n.get("note", ""):
                lines.append(f"| {n['method']} | {_f(n.get('target_ratio'), '{:g}x')} | not measured: "
                             f"{n['note'][:160]} | no | | | | |")
    if merged.get("repeats"):
        lines += ["", "<details><summary>Repeated measurements (the same job in more than one call; the tables keep "
                  "the latest)</summary>", "", "| task | method | calibration | target | kept | KL | true ratio |",
                  "|---|---|---|---|---|---|---|"]
        for r in merged["repeats"]:
            lines.append(f"| {r['task']} | {r['label']} | {r['calibration']} | {r['target_ratio']:g}x | "
                         f"{' → '.join(_f(k) for k in r['kept'])} | {' → '.join(_f(k, '{:.4f}') for k in r['kl'])} | "
                         f"{' → '.join(_f(k, '{:.1f}x') for k in r['true_ratio'])} |")
        lines += ["", "</details>"]
    if merged.get("notes"):
        lines += notes_block(merged["notes"], ("task", "method", "target_ratio", "calibration"))
    return "\n".join(lines) + "\n"


def superseded_markdown(path: Path) -> str:
    import report_v1

    return report_v1.markdown(load_json(path), "superseded/" + path.name)


# ---- plot -----------------------------------------------------------------------------------------------------------
def plot(merged: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    results = merged["results"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, tasks) in zip(axes, (("tuning families: worst of " + ", ".join(TUNING), TUNING),
                                         ("HELD-OUT families: worst of " + ", ".join(HELDOUT), HELDOUT))):
        for i, label in enumerate(labels_of(results)):
            for cal, style in (("default", dict(linestyle="-", marker="o")),
                               ("task", dict(linestyle="--", marker="o", markerfacecolor="none", alpha=0.7))):
                cells = by_cell(results)
                pts, partial = [], []
                for ratio in ratios_of(results):
                    rec, complete = worst(cells.get((label, ratio, cal), {}), tasks)
                    if rec is not None:
                        lo, hi = rec.get("kept_interval") or [rec["kept"], rec["kept"]]
                        pts.append((rec["true_ratio"], rec["kept"], rec["kept"] - (lo if lo is not None else rec["kept"]),
                                    (hi if hi is not None else rec["kept"]) - rec["kept"]))
                        if not complete:
                            partial.append((rec["true_ratio"], rec["kept"]))
                if not pts:
                    continue
                xs, ys, lo, hi = zip(*sorted(pts))
                shift = 1.04 if cal == "task" else 1.0  # side by side where both reach the same true ratio
                ax.errorbar([x * shift for x in xs], ys, yerr=[lo, hi], color=colors[i % len(colors)], capsize=3,
                            label=f"{label} ({cal} calibration)", **style)
                for x, y in partial:  # a worst task over fewer families than the panel names (the tables' †)
                    ax.annotate("†", (x * shift, y), textcoords="offset points", xytext=(5, 4), fontsize=9,
                                color=colors[i % len(colors)])
        ax.set_xscale("log", base=2)
        ticks = [r for r in (8, 16, 32, 64, 128, 256)]
        ax.set_xticks(ticks, [f"{t}x" for t in ticks])
        xs_all = [r["true_ratio"] for r in results]
        ax.set_xlim(min(11.0, min(xs_all) / 1.2), max(200.0, max(xs_all) * 1.2))
        ax.set_xlabel("true compression ratio (dense bf16 delta bytes / bytes on disk)")
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("accuracy kept, worst task\n(rebuilt / fine-tune, 95% paired interval)")
    axes[0].set_ylim(bottom=0)
    seen: dict[str, object] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    labels, handles = list(seen), list(seen.values())
    if handles:
        fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=4)
    fig.suptitle(f"SmolLM2-135M-Instruct full fine-tunes, six task families, on {merged.get('device') or '?'}"
                 " († = not every family of the panel measured)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return save_figure(fig, path, dpi=110)


# ---- generated blocks -----------------------------------------------------------------------------------------------
def block_re(name: str) -> re.Pattern:
    return re.compile(rf"<!-- table:{re.escape(name)} -->\n.*?<!-- /table:{re.escape(name)} -->", re.S)


def with_block(text: str, name: str, body: str, *, insert_before: str | None = None) -> str:
    """`text` with the block `name` holding `body` (the format bench/update_readme.py writes). Missing markers are
    inserted before `insert_before` (or at the end); nothing else changes."""
    block = f"<!-- table:{name} -->\n{body.strip()}\n<!-- /table:{name} -->"
    if block_re(name).search(text):
        return block_re(name).sub(lambda _: block, text, count=1)
    if insert_before and insert_before in text:
        i = text.index(insert_before)
        return text[:i] + block + "\n\n" + text[i:]
    return text.rstrip("\n") + "\n\n" + block + "\n"


# where the which-method block goes in a README that has none yet: before the caveats under it
README_ANCHOR = "Caveats: these are full fine-tunes"


def by_family_markdown(merged: dict | None, json_name: str) -> str:
    """Per family, default calibration, every method and ratio measured: the page-sized view docs/methods/ quote
    (copied into their `<!-- table:quality-by-family -->` blocks by bench/update_readme.py)."""
    head = f"<!-- generated by bench/quality/report.py from {json_name}; do not edit by hand -->"
    results = [r for r in (merged or {}).get("results", []) if r.get("calibration", "default") == "default"]
    if not results:
        return f"{head}\nNo results of the quality benchmark yet.\n"
    tasks = [t for t in (*TUNING, *HELDOUT) if any(r["task"] == t for r in results)]
    cells = by_cell(results)
    lines = [head, f"Accuracy kept per task family with no calibration file (the default), {merged.get('device')}; "
             "rebuilt ÷ fine-tune [95% paired interval]; (h) = held-out family; ‡ = on an earlier fine-tune of the "
             "same recipe; – = not measured. All figures: [docs/benchmarks.md](../benchmarks.md).", ""]
    for ratio in ratios_of(results):
        lines += [f"**{ratio:g}x**", "", "| method | " + " | ".join(t + (" (h)" if t in HELDOUT else "") for t in tasks)
                  + " |", "|---|" + "---|" * len(tasks)]
        for label in labels_of(results):
            cell = cells.get((label, ratio, "default"), {})
            if not cell:
                continue
            lines.append(f"| {label} | " + " | ".join(kept_text(cell.get(t)) for t in tasks) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def render(json_path: Path, superseded: Path, docs: Path, readme: Path, which_md: Path) -> dict[Path, str]:
    """Every generated text file, as the JSON generates it: {path: full new content}."""
    merged = load_json(json_path) if json_path.is_file() else None
    try:
        name = str(json_path.relative_to(REPO))
    except ValueError:
        name = json_path.name
    which = which_method_markdown(merged, name)
    docs_text = with_block(docs.read_text(), BLOCK_QUALITY, quality_markdown(merged, name))
    if superseded.is_file():
        docs_text = with_block(docs_text, BLOCK_SUPERSEDED, superseded_markdown(superseded))
    out = {docs: docs_text, readme: with_block(readme.read_text(), BLOCK_WHICH, which, insert_before=README_ANCHOR),
           which_md: which, json_path.with_name("quality-by-family.md"): by_family_markdown(merged, name)}
    if json_path.resolve() == JSON_PATH.resolve():  # the copy `deltapack methods` prints: never from a smoke run
        out[PACKAGE_WHICH_MD] = which
    return out


def check(outputs: dict[Path, str]) -> list[str]:
    """Paths whose content differs from what the JSON generates (a unified diff of each is printed)."""
    bad = []
    for path, want in outputs.items():
        have = path.read_text() if path.is_file() else ""
        if have != want:
            bad.append(str(path))
            sys.stdout.writelines(list(difflib.unified_diff(have.splitlines(True), want.splitlines(True),
                                                            str(path), "generated", n=1))[:60])
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="merge quality parts; generate quality.png, docs/benchmarks.md and the "
                                             "README's which-method table from bench/results/quality.json")
    ap.add_argument("--merge", nargs="+", type=Path, default=None, metavar="PART",
                    help="merge these parts into --out first")
    ap.add_argument("--out", type=Path, default=JSON_PATH, help="the merged JSON (read when not merging)")
    ap.add_argument("--superseded", type=Path, default=SUPERSEDED_JSON)
    ap.add_argument("--docs", type=Path, default=DOCS)
    ap.add_argument("--readme", type=Path, default=README)
    ap.add_argument("--which-md", type=Path, default=None, help="default: which-method.md beside --out")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when a generated file differs")
    ap.add_argument("--no-png", action="store_true")
    args = ap.parse_args(argv)
    which_md = args.which_md or args.out.with_name("which-method.md")
    if args.merge:
        if args.check:
            ap.error("--check compares with the committed JSON; it does not merge")
        merged = merge(args.merge)
        write_json(args.out, merged)
        print(f"merged {len(args.merge)} parts: {len(merged['results'])} results, {len(merged['notes'])} notes "
              f"-> {args.out}")
    outputs = render(args.out, args.superseded, args.docs, args.readme, which_md)
    if args.check:
        bad = check(outputs)
        if bad:
            print(f"\nout of date (regenerate with `python bench/quality/report.py`): {', '.join(bad)}")
            return 1
        print("generated quality tables are up to date")
        return 0
    for path, text in outputs.items():
        tmp = path.with_name(path.name + ".part")
        tmp.write_text(text)
        tmp.replace(path)
    if args.out.is_file() and not args.no_png:
        merged = load_json(args.out)
        if merged.get("results"):
            print(f"wrote {plot(merged, args.out.with_suffix('.png'))}")
    print("wrote " + ", ".join(str(p) for p in outputs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
