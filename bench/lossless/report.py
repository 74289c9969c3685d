"""Tables of bench/results/lossless.json as markdown (bench/results/lossless.md): every figure is read from the JSON.

    python bench/lossless/report.py [--results bench/results/lossless.json] [--out bench/results/lossless.md]
    python bench/lossless/report.py --join PART.json --pair-prefix quality2- --note '...'   # add PART's run, render
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _f(v, fmt="{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def render(doc: dict) -> str:
    recs = doc["records"]
    runs = doc.get("runs", [doc])
    out = ["# Lossless deltas and the entropy stage (generated from lossless.json by bench/lossless/report.py)", ""]
    for i, r in enumerate(runs):
        out.append(f"- run {i}: `{r['command']}` — {r['device']}, {r['date']}, torch {r['torch']}, "
                   f"zstandard {r['zstandard']}" + (f". {r['note']}" if r.get("note") else ""))
    out += ["", "## Exact methods", "",
            "| pair | method | unchanged elements | true ratio | without hf/ files | vs bf16 fine-tune | encode s | "
            "decode s (1 thread) | decode GB/s per core | merge s (wall) | merge CPU s | exact |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in recs:
        if r["method"] in ("lossless", "raw", "dense-exact") and "error" not in r:
            out.append(f"| {r['pair']} | {r['method']} | {100 * r['unchanged_share']:.1f}% | {r['true_ratio']:.2f}x | "
                       f"{_f(r.get('true_ratio_weights_only'), '{:.2f}x')} | {r['ratio_vs_finetune']:.2f}x | {r['encode_s']:.1f} | {r['decode_s']:.2f} | "
                       f"{_f(r.get('decode_gb_per_s_per_core'))} | {_f(r.get('merge_s'))} | {_f(r.get('merge_cpu_s'))} | "
                       f"{r['exact']} |")
    out += ["", "## Codec study (sampled 16-bit tensors; ratio against their bf16 bytes)", ""]
    for r in recs:
        if r["method"] != "codec-study":
            continue
        out += [f"### {r['pair']} ({len(r['tensors'])} tensors, {r['bf16_bytes'] / 1e6:.1f} MB bf16)", "",
                "| variant | ratio |", "| --- | --- |"]
        out += [f"| {k} | {v:.3f}x |" for k, v in r["ratio_vs_bf16"].items()]
        out += ["", f"zstd frames alone: {r['zstd_planes_decode_gb_per_s_per_core']:.2f} GB/s per core; "
                    + (f"whole codec rebuild: {r['codec_rebuild_gb_per_s_per_core']:.2f} GB/s per core"
                       if "codec_rebuild_gb_per_s_per_core" in r else ""), ""]
    lossy = [r for r in recs if "entropy_stage" in r]
    if lossy:
        out += ["## Entropy stage on lossy deltas", "",
                "| pair | method | target | true ratio without stage | with stage | saving on disk |",
                "| --- | --- | --- | --- | --- | --- |"]
        for r in lossy:
            out.append(f"| {r['pair']} | {r['method']} | {r['target_ratio']:g}x | {r['true_ratio_without_entropy']:.2f}x | "
                       f"{r['true_ratio']:.2f}x | {100 * r['entropy_saving_on_disk']:.1f}% |")
        out += ["", "Per part (bytes as the codec made them, saving, order-0 entropy of those bytes in bits per byte: "
                    "8 means incompressible by any order-0 coder):", "",
                "| pair | method | codec:part | MB | parts coded | saving | byte entropy |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in lossy:
            for k, p in sorted(r["entropy_stage"]["by_part"].items(), key=lambda kv: -kv[1]["bytes"]):
                out.append(f"| {r['pair']} | {r['method']} | {k} | {p['bytes'] / 1e6:.2f} | {p['coded_parts']}/{p['parts']} | "
                           f"{100 * p['saving']:.1f}% | {p['byte_entropy_bits']:.2f} |")
    errs = [r for r in recs if "error" in r]
    if errs:
        out += ["", "## Not measured", ""] + [f"- {r['pair']} {r['method']}: {r['error']}" for r in errs]
    return "\n".join(out) + "\n"


def join(doc: dict, part: dict, pair_prefix: str, note: str | None = None) -> dict:
    """`doc` with `part` (one run.py output) added as its next run; the part's pairs renamed `pair_prefix + pair` so
    that a second set of fine-tunes of the same tasks stays apart from the first. Refuses a run already joined."""
    runs = doc.setdefault("runs", [])
    meta = {k: part[k] for k in ("command", "device", "date", "torch", "zstandard") if k in part}
    if any(r.get("command") == meta.get("command") and r.get("date") == meta.get("date") for r in runs):
        raise SystemExit(f"that run ({meta.get('date')}) is already in the results")
    idx = len(runs)
    runs.append({**meta, **({"note": note} if note else {})})
    for r in part["records"]:
        doc["records"].append({**r, "pair": pair_prefix + r["pair"], "run": idx})
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "lossless.json")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "lossless.md")
    ap.add_argument("--join", type=Path, default=None, help="a run.py output to add to --results as its next run")
    ap.add_argument("--pair-prefix", default="", help="with --join: prefix of the joined pairs' names")
    ap.add_argument("--note", default=None, help="with --join: what the joined run was (kept in the results)")
    a = ap.parse_args(argv)
    doc = json.loads(a.results.read_text())
    if a.join is not None:
        doc = join(doc, json.loads(a.join.read_text()), a.pair_prefix, a.note)
        tmp = a.results.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(a.results)
        print(f"joined {a.join} into {a.results} as run {len(doc['runs']) - 1}")
    a.out.write_text(render(doc))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
