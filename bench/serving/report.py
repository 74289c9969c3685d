"""Render bench/results/serving.md (the README's serving block) from the committed serving results: the GPU
equality check (bench/serve_equality.py), the load test (bench/serve_load.py), the kernel/decode/trace/resident
benchmark (bench/serving/run.py) and the live trace through the engine (bench/serving/live.py). Every figure comes from those JSON files; nothing is typed here.

    python bench/serving/report.py && python bench/update_readme.py
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def equality_lines(eq: dict, name: str) -> list[str]:
    runs = eq["runs"]
    tenants = [t["tenant"] for t in runs[0]["tenants"]]
    ref = ("`deltapack merge --dtype float32` (base + delta summed in fp32, unrounded)" if eq.get("reference") == "exact"
           else "`deltapack merge` (the fine-tune's dtype)")
    ratios = sorted({k.rsplit("-", 1)[-1] for k in eq["deltas"] if not k.endswith("-lossless")})
    out = [f"**Serving equals merging** on the GPU ({eq['device']}, `{name}`): the SmolLM2 fine-tunes of the quality "
           f"benchmark at {', '.join(ratios) or '?'} (plus raw, lossless), every tenant's "
           f"{eq['n_prompts']} prompts sent at once through real HTTP, {eq['max_tokens']} greedy tokens each, against "
           f"the greedy output of {ref} in {eq['dtype']}:", "",
           "| tenant | " + " | ".join(f"kernels={r['kernels']}" for r in runs) + " |",
           "|---|" + "---|" * len(runs)]
    for i, t in enumerate(tenants):
        cells = []
        for r in runs:
            rec = r["tenants"][i]
            cells.append(f"{'equal' if rec['equal'] else 'DIFFERS'} ({rec['prompts_equal']}/{eq['n_prompts']} prompts, "
                         f"{rec['tokens']} tokens)")
        out.append(f"| {t} | " + " | ".join(cells) + " |")
    mix = "; ".join(f"{r['kernels']}: {r['forwards_with_3plus_tenants']} of {r['forwards']} forwards carried 3+ "
                    f"tenants (up to {r['max_tenants_in_one_forward']})" for r in runs)
    out += ["", f"Batches really mixed tenants: {mix}."]
    return out


def load_lines(ld: dict) -> list[str]:
    r, c = ld["results"], ld["config"]
    lat, rss = r["latency_s"]["all"], r["server_rss_mb"]
    return ["", f"**Load test** (`{ld['command']}`, {ld['device']}): {r['wall_s']:.0f} s, {c['concurrency']} concurrent "
            f"clients, tenants {', '.join(c['tenants'])}; {r['requests']} requests ({r['expected_400s_for_malformed']} "
            f"deliberately malformed, answered 400), **{r['errors']} errors**; latency p50 {lat['p50']:.2f} s, p99 "
            f"{lat['p99']:.2f} s; server RSS {rss['start']:.0f} → {rss['end']:.0f} MB (peak {rss['max']:.0f}, "
            f"{'flat' if rss['flat'] else 'NOT flat'}: {rss['flat_rule']}); tier loads/evictions as counted by "
            f"`/metrics` at the end in the JSON."]


ISSUE_TRACE_TENANTS = 64  # issue 26's trace targets are about the 64-tenant Zipf/Poisson trace


def live_rows(lv: dict, name: str = "bench/results/serving_live.json") -> list[str]:
    """The live trace (bench/serving/live.py), one row per engine mode, against issue 26's trace targets: throughput
    >= 0.8 of what the bound model predicts for the trace (the simulation with every decode step at 1/(1+k/R)) and
    TTFT p99 >= 5x better than swapping merged models (simulated)."""
    rec = {r["system"]: r for r in lv["records"]}
    swap, sim = rec.get("swap (simulated)"), rec.get("deltapack (simulated)")
    bound = rec.get("deltapack at the bound (simulated)")
    tr = lv["trace"]
    rows = []
    for mode, eng in lv.get("engine", {}).items():
        live = rec.get(f"deltapack live ({mode})")
        if not live or not swap or not bound:
            continue
        of_bound = live["throughput"] / bound["throughput"]
        ttft_x = swap["ttft_p99"] / live["ttft_p99"]
        split = (f" (launching {eng['decode_launch_s']:.0f} s, waiting for the device {eng['decode_wait_s']:.0f} s, "
                 f"accepting tokens {eng['decode_accept_s']:.0f} s)" if "decode_wait_s" in eng else "")
        busy = (f"; engine time: decode steps {eng['decode_s']:.0f} s over {eng['steps']} steps{split}, prefill "
                f"forwards {eng['prefill_s']:.0f} s ({eng['prefill_forwards']} forwards)" if "decode_s" in eng else "")
        merged = eng.get("merged")
        if merged is not None:
            busy += (f"; merged copies: {merged['merges']} merges, {merged['merged_forwards']} of "
                     f"{merged['forwards']} forwards on one")
        sim_text = f"; simulated with the measured step costs: {sim['throughput']:.0f} tok/s" if sim else ""
        if tr["tenants"] == ISSUE_TRACE_TENANTS:
            met = "yes" if of_bound >= 0.8 and ttft_x >= 5 else "no"
        else:
            met = "(not the issue's trace)"
        rows.append(
            f"| trace, live, decode={mode} (`{name}`, {lv['device']}, {lv['date'][:10]}; "
            f"{tr['requests']} requests, {tr['tenants']} tenant{'s' if tr['tenants'] != 1 else ''}, load {tr['load']:g}): throughput ≥ 0.8 of the bound "
            f"model's, TTFT p99 ≥ 5x better than swapping | {live['throughput']:.0f} tok/s = {of_bound:.2f} of the "
            f"bound model's {bound['throughput']:.0f}{sim_text}; TTFT p99 {live['ttft_p99']:.1f} s vs swap "
            f"{swap['ttft_p99']:.1f} s ({ttft_x:.1f}x), p50 {live['ttft_p50']:.1f} s; ITL p50 "
            f"{live['itl_p50'] * 1e3:.0f} ms{busy} | {met} |")
    return rows


def bench_lines(sv: dict, live: list[tuple[str, dict]] = ()) -> list[str]:
    t = sv.get("notes", {}).get("targets", {})
    out = ["", f"**Kernels and decode** (`bench/results/serving.json`, {sv['device']}; 7B shapes, batch 64):", "",
           "| target (issue 6) | measured | met |", "|---|---|---|"]
    for codec, v in t.get("kernels_70pct_of_copy_at_k>=8", {}).items():
        best = max((r["efficiency"] for r in sv["kernels"] if r["codec"] == codec and r["k"] >= 8), default=None)
        out.append(f"| {codec} kernel ≥ 70% of the copy rate at k ≥ 8 | worst {v['efficiency']:.1%} ({v['worst']}), "
                   f"best {best:.1%} | {'yes' if v['met'] else 'no'} |")
    dec = t.get("decode_80pct_of_bound", {})
    if dec:
        lo = min(dec.items(), key=lambda kv: kv[1]["of_bound"])
        hi = max(dec.items(), key=lambda kv: kv[1]["of_bound"])
        met = [k for k, v in dec.items() if v["met"]]
        verdict = "yes" if len(met) == len(dec) else (f"only {', '.join(met)}" if met else "no")
        why = ""
        if "extra_over_bound" in lo[1]:  # targets written before the decomposition lack it
            why = (f"; at {lo[0]} a step takes {lo[1]['step_ms']:.1f} ms against the base's {lo[1]['base_step_ms']:.1f}: "
                   f"the delta kernels add {lo[1]['extra_ms']:.1f} ms where their bytes would take "
                   f"{lo[1]['extra_ms_at_bound']:.2f} ms ({lo[1]['extra_over_bound']:g}x; at {hi[0]}: "
                   f"{hi[1]['extra_over_bound']:g}x; `notes.targets.what_bounds_decode`)")
        out.append(f"| end-to-end decode ≥ 80% of 1/(1+k/R) | {lo[1]['of_bound']:.1%} ({lo[0]}) to "
                   f"{hi[1]['of_bound']:.1%} ({hi[0]}){why} | {verdict} |")
    paths = (t.get("what_bounds_the_kernels") or {})
    if isinstance(paths, dict) and paths.get("best_by_path"):
        few = ", ".join(f"{c} {p['1-2 tokens/tenant']['efficiency']:.0%}" for c, p in paths["best_by_path"].items()
                        if "1-2 tokens/tenant" in p)
        many = ", ".join(f"{c} {p['>= 3 tokens/tenant']['efficiency']:.0%}" for c, p in paths["best_by_path"].items()
                         if ">= 3 tokens/tenant" in p)
        ncu = (paths.get("ncu") or {}).get("by_path", {})
        counters = ""
        if "1-2 tokens/tenant" in ncu and ">= 3 tokens/tenant" in ncu:
            bc, tc = ncu["1-2 tokens/tenant"], ncu[">= 3 tokens/tenant"]

            def span(v, unit=""):
                return f"{v[0]:g}{unit}" if v[0] == v[1] else f"{v[0]:g}-{v[1]:g}{unit}"

            counters = (f" Nsight Compute (`bench/results/serving_ncu.json`): the decode path issues on "
                        f"{span(bc['issue_active_pct'], '%')} of cycles with DRAM at {span(bc['dram_pct'], '%')} of "
                        f"peak; the tensor-core path issues on {span(tc['issue_active_pct'], '%')} with "
                        f"{span(tc['warps_per_scheduler'])} warps per scheduler.")
        out.append(f"| what bounds the kernels | best with 1-2 tokens per tenant: {few}; with ≥ 3 (k = 8 at batch 64): "
                   f"{many}. The first is bound by instruction issue and load latency; the second, for factors and "
                   f"sign codes, by decoding codes into the tensor cores' operand layout with too few warps to hide "
                   f"the latency, for sparse ones by gathers (`notes.targets.what_bounds_the_kernels`).{counters} | |")
    tr = t.get("trace_10x_swap_throughput")
    if tr:
        rec = {r["system"]: r for r in sv["trace"]}
        sat = tr.get("saturated") or {}
        sat_text = (f"; saturated (offered load {sat['offered_load']:g}x capacity): {sat['ratio']:.2f}x, and "
                    f"{sat['ratio_with_kernels_at_bound']:.2f}x if the delta kernels ran at the 1/(1+k/R) bound"
                    if sat.get("ratio_with_kernels_at_bound") is not None else "")
        out.append(f"| trace throughput ≥ 10x swapping merged models (simulated with costs measured on the GPU) | "
                   f"{tr['ratio']:.2f}x at {tr.get('offered_load', 0.8):g} of capacity ({rec['deltapack']['throughput']:.0f}"
                   f" vs {rec['swap']['throughput']:.0f} tok/s; TTFT p99 {rec['deltapack']['ttft_p99']:.2f} vs "
                   f"{rec['swap']['ttft_p99']:.2f} s){sat_text} | {'yes' if tr['met'] else 'no'} |")
    for name, lv in live:
        out += live_rows(lv, name)
    costs = sv.get("notes", {}).get("trace", {}).get("step_costs_at_full_batch")
    if costs:
        out += ["", f"What bounds the trace (measured step costs at batch {sv['notes']['trace']['max_batch']}): a decode "
                f"step of the base takes {costs['base_step_s'] * 1e3:.1f} ms, the deltas of the ~"
                f"{sv['notes']['trace']['expected_distinct_tenants_per_full_batch']:.0f} distinct tenants of a full batch add "
                f"{costs['delta_extra_s_at_expected_distinct'] * 1e3:.1f} ms (the bound would be "
                f"{costs['delta_extra_s_at_bound'] * 1e3:.1f} ms), one 128-token prefill with deltas takes "
                f"{costs['prefill_s_one_prompt'] * 1e3:.0f} ms, and swapping a merged model in from pinned memory "
                f"{costs['swap_s'] * 1e3:.0f} ms, which Zipf popularity amortises over large per-tenant batches. "
                f"Swap's prefill in this simulation: {sv['notes']['trace'].get('swap_prefill', 'as deltapack')}.", "",
                "| target (issue 6) | measured | met |", "|---|---|---|"]
    for key, v in t.get("resident_50_tenants_16x", {}).items():
        why = f"; {v['bounded_by']}" if v.get("bounded_by") else ""
        out.append(f"| ≥ 50 resident 16x tenants per 80 GB: {key} | {v['tenants']}{why} | {'yes' if v['met'] else 'no'} |")
    return out


COLDSTART_TARGETS = {"cold": 60.0, "warm": 15.0}  # issue 26: /health and a first token of every tenant, seconds


def coldstart_lines(sv: dict) -> list[str]:
    recs = sv.get("coldstart") or []
    if not recs:
        return []
    r0 = recs[0]
    out = ["", f"**Cold start** (`bench/serving/coldstart.py`, {r0['device']}, {r0['date'][:10]}; `deltapack serve` as a "
           f"subprocess, {r0['tenants']} tenants of {len(r0['codecs'])} codecs ({', '.join(r0['codecs'])}), "
           f"{r0['shape']} shape, batch {r0['max_batch']}; cold = the kernel cache emptied first):", "",
           "| cache | /health ready | first token, every tenant | target | met | kernels compiled in the background | "
           "warm-up done |", "|---|---|---|---|---|---|---|"]
    for r in recs:
        goal = COLDSTART_TARGETS.get(r["cache"])
        first = max(r["first_token_s"].values()) if r.get("first_token_s") else None
        k = r.get("kernels") or {}
        met = "–" if goal is None or first is None else ("yes" if max(first, r["ready_s"]) <= goal else
                                                          f"no (by {max(first, r['ready_s']) - goal:.1f} s)")
        out.append(f"| {r['cache']} | {r['ready_s']:.1f} s | {_s(first)} | ≤ {goal:g} s | {met} | "
                   f"{k.get('ready', '?')} variants in {_s(k.get('elapsed_s'))} ({k.get('workers', '?')} threads) | "
                   f"{_s(r.get('warmup_s'))} |")
    return out


def _is_commit(s: str) -> bool:
    return re.fullmatch(r"[0-9a-f]{7,40}", s) is not None


def _baseline_of(results: Path, current: Path) -> dict | None:
    """`<name>_<commit>.json` beside `<name>.json`: the same command run on older code."""
    for f in sorted(results.glob(f"{current.stem}_*.json")):
        if _is_commit(f.stem[len(current.stem) + 1:]):
            return _load(f)
    return None


def host_lines(results: Path) -> list[str]:
    """CPU micro-benchmarks of the host's share of serving (bench/serving/pack_speed.py, detok_speed.py), each beside
    its baseline file when there is one (_baseline_of)."""
    out: list[str] = []
    for p in sorted(results.glob("serving_pack_cpu*.json")):
        cur = _load(p)
        if cur is None or _is_commit(p.stem.rsplit("_", 1)[-1]):
            continue
        base = _baseline_of(results, p)
        if not out:
            out += ["", "**Packing deltas for serving, on the host** (`bench/serving/pack_speed.py`: every start packs its "
                    "deltas on the CPU before they go to the device; seconds per delta at 16x, best of the repeats, "
                    "against the same command on older code where kept):", ""]
        out += [f"{_rel(p)}: {cur['shape']} shape, {cur['device']}, {cur['date'][:10]}", "",
                f"| delta | layout | {cur['commit']} |" + (f" {base['commit'].split(' ')[0]} |" if base else ""),
                "|---|---|---|" + ("---|" if base else "")]
        old = {(r["delta"], r["layout"]): r["seconds"] for r in (base or {}).get("packs", [])}
        for r in cur["packs"]:
            prev = old.get((r["delta"], r["layout"]))
            out.append(f"| {r['delta']} | {r['layout']} | {r['seconds']:.2f} s |"
                       + ((" – |" if prev is None else f" {prev:.2f} s |") if base else ""))
        out.append("")
    path = results / "serving_detok_cpu.json"
    det = _load(path)
    if det:
        base = _baseline_of(results, path)
        old = {r["output_tokens"]: r for r in (base or {}).get("steps", [])}
        out += ["", f"**Detokenization per decode step** (`bench/serving/detok_speed.py`, {det['device']}, "
                f"{det['date'][:10]}: {det['rows']} rows, {det['tokenizer']}'s tokenizer; ms of host time per step, "
                "mean over the output / over its last 100 tokens):", "",
                "| output tokens | now |" + (f" {base['commit'].split(' (')[0]} |" if base else ""),
                "|---|---|" + ("---|" if base else "")]
        for r in det["steps"]:
            o = old.get(r["output_tokens"])
            out.append(f"| {r['output_tokens']} | {r['ms_per_step']:.2f} / {r['ms_per_step_last_100']:.2f} |"
                       + (f" {o['ms_per_step']:.2f} / {o['ms_per_step_last_100']:.2f} |" if o else ""))
    return out


def merged_lines(md: dict | None) -> list[str]:
    """k = 1 (every row one tenant's) on the merged copy against the delta kernels and the base
    (bench/serving/merged.py)."""
    if not md or (md.get("notes") or {}).get("smoke") or not md.get("decode"):
        return []
    out = ["", f"**One tenant owning the batch (k = 1) on a merged copy** (`bench/serving/merged.py`, {md['device']}, "
           f"{md['date'][:10]}; 7B shape, W_base + dW in bf16 vs the delta kernels; decode = one CUDA-graph step of "
           f"batch {md['decode'][0]['batch']}, prefill = one eager forward):", "",
           "| codec | ratio | decode base | decode kernels (of bound) | decode merged | prefill base | prefill kernels | "
           "prefill dense scratch | prefill merged | merge: s, GB, logits rel. diff |", "|---" * 10 + "|"]
    cells = sorted({(r["codec"], r["ratio"]) for r in md["decode"]})
    for codec, ratio in cells:
        dec = {r["path"]: r for r in md["decode"] if (r["codec"], r["ratio"]) == (codec, ratio)}
        pre = {r["path"]: r for r in md.get("prefill", []) if (r["codec"], r["ratio"]) == (codec, ratio)}
        mg = next((r for r in md.get("merge", []) if (r["codec"], r["ratio"]) == (codec, ratio)), {})

        def d(path):
            r = dec.get(path)
            return "–" if r is None else f"{r['step_ms']:.1f} ms"

        def p(path):
            r = pre.get(path)
            return "–" if r is None else f"{r['ms']:.1f} ms"

        k = dec.get("kernels")
        kern = "–" if k is None else f"{k['step_ms']:.1f} ms ({k['of_bound']:.2f})"
        merge = (f"{mg['build_s']:.2f} s, {mg['gb']:.1f} GB, {mg['logits_rel_diff_vs_kernels']:.1e}") if mg else "–"
        out.append(f"| {codec} | {ratio:g}x | {d('base')} | {kern} | {d('merged')} | {p('base')} | {p('kernels')} | "
                   f"{p('dense')} | {p('merged')} | {merge} |")
    return out


def constrained_lines(cd: dict | None) -> list[str]:
    if not cd or cd.get("smoke") or "overhead" not in cd:
        return []
    res, ov, cfg = cd["results"], cd["overhead"], cd["config"]
    return ["", f"**Structured output** (`bench/serving/constrained.py`, {cd['device']}, {cd['date'][:10]}; engine at "
            f"batch {cfg['batch']}, {cfg['max_tokens']} tokens per row, xgrammar {cfg.get('xgrammar')}, JSON schema): "
            f"a decode step takes {res['unconstrained']['ms_per_decode_step']:.2f} ms unconstrained, "
            f"{res['constrained']['ms_per_decode_step']:.2f} ms with every row constrained (+{ov['constrained']['percent']:.0f}%) "
            f"and {res['half']['ms_per_decode_step']:.2f} ms with half of them (+{ov['half']['percent']:.0f}%); the "
            "grammar's bitmask fill runs on the CPU between the forward pass and sampling, so on a small model it "
            "adds to the step almost one for one."]


def _rel(p: Path) -> str:
    p = p.resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def _s(v) -> str:
    return "–" if v is None else f"{v:.1f} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--equality", type=Path, default=RESULTS / "serve" / "equality-gpu-exact.json")
    ap.add_argument("--load", type=Path, default=RESULTS / "serve_load.json")
    ap.add_argument("--serving", type=Path, default=RESULTS / "serving.json")
    ap.add_argument("--live", type=Path, nargs="*", default=None,
                    help="live-trace results (default: bench/results/serving_live*.json, smoke runs left out)")
    ap.add_argument("--constrained", type=Path, default=RESULTS / "serving_constrained.json")
    ap.add_argument("--merged", type=Path, default=RESULTS / "serving_merged.json")
    ap.add_argument("--out", type=Path, default=RESULTS / "serving.md")
    args = ap.parse_args(argv)
    live_paths = args.live if args.live is not None else sorted(
        p for p in RESULTS.glob("serving_live*.json") if "smoke" not in p.name)
    lines = [f"<!-- generated by bench/serving/report.py from {args.equality.name}, {args.load.name}, "
             f"{args.serving.name}, {', '.join(p.name for p in live_paths) or 'no live trace'}; do not edit by hand -->"]
    eq, ld, sv = _load(args.equality), _load(args.load), _load(args.serving)
    live = [(_rel(p), d) for p in live_paths if (d := _load(p))]
    if eq:
        lines += equality_lines(eq, str(args.equality.relative_to(ROOT) if args.equality.is_relative_to(ROOT) else args.equality))
    if ld:
        lines += load_lines(ld)
    if sv:
        lines += bench_lines(sv, live)
        lines += coldstart_lines(sv)
    lines += merged_lines(_load(args.merged))
    lines += host_lines(RESULTS)
    lines += constrained_lines(_load(args.constrained))
    tmp = args.out.with_name(args.out.name + ".part")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
