"""Per-token cost of structured output (xgrammar JSON-schema masks) in the serving engine at batch 64.

The engine itself (no HTTP) on one base model, three runs of --batch requests each, all admitted together:
every row unconstrained, every row constrained by a JSON schema, and half / half. Each row generates exactly
--max-tokens tokens (unconstrained rows ignore EOS; the schema ends in a string with a minimum length the rows
cannot reach in that many tokens, so no constrained row leaves early and all runs decode the same number of rows
per step). Reported per run: decode ms per step, decode tokens/s, the host time per step spent on grammars (filling
masks, queueing their application, accepting tokens; timed without any device sync, so on a GPU the fill overlaps the
forward as it does in serving and the wall cost is the difference in step time), and the schema's compile time
(once; compiled grammars are cached). --micro times the mask step alone, the previous path against the current one.

    python bench/serving/constrained.py --device cuda                 # GPU figure: bench/results/serving_constrained.json
    python bench/serving/constrained.py --smoke                       # CPU, short: bench/results/serving_constrained_cpu_smoke.json
    python bench/serving/constrained.py --micro                       # mask cost alone: bench/results/serving_constrained_cpu_micro.json

Default base: the embedded SmolLM2-135M-Instruct (deltapack.io.embedded); --base takes any served base.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.metadata
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from serve_load import _cpu_name, _git_commit  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"enum": ["Paris", "Oslo", "Lima", "Kyoto"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "notes": {"type": "string", "minLength": 0},  # minLength set from --max-tokens: rows never finish early
    },
    "required": ["name", "age", "city", "tags", "notes"],
    "additionalProperties": False,
}
TOPICS = ["a chef", "a pilot", "a poet", "a farmer", "a nurse", "a judge", "a diver", "a baker"]


def run_batch(state, prompts: list[list[int]], params_of) -> dict:
    """Submit every prompt at once (engine held while they queue), wait for all; the engine's decode time and steps."""
    from deltapack.serve.engine import ErrorEvent, FinishEvent, GenRequest

    eng = state.engine
    done = threading.Event()
    results: dict[int, object] = {}
    lock = threading.Lock()

    def emit(i, ev):
        if isinstance(ev, (FinishEvent, ErrorEvent)):
            with lock:
                results[i] = ev
                if len(results) == len(prompts):
                    done.set()

    r = state.runner
    before = dict(eng.busy), eng.steps
    t0 = time.perf_counter()
    with state.tiers.lock:  # all join the batch in one admission
        for i, ids in enumerate(prompts):
            eng.submit(GenRequest(f"b{i}", state.base_name, None, ids, params_of(i), lambda ev, i=i: emit(i, ev),
                                  r.tokenizer, r.vocab_size, set(r.eos_ids)))
        while eng.snapshot()["waiting"] < len(prompts):
            time.sleep(0.001)
    if not done.wait(3600):
        raise RuntimeError("batch did not finish")
    wall = time.perf_counter() - t0
    errors = [ev for ev in results.values() if isinstance(ev, ErrorEvent)]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    tokens = sum(ev.completion_tokens for ev in results.values())
    steps = eng.steps - before[1]
    decode_s = eng.busy["decode_s"] - before[0]["decode_s"]
    return {"wall_s": wall, "tokens": tokens, "steps": steps, "decode_s": decode_s, "prefill_s": eng.busy["prefill_s"] - before[0]["prefill_s"],
            "finish": sorted({ev.reason for ev in results.values()})}


def old_apply_grammar_masks(x: torch.Tensor, rows: list[int], matchers: list, vocabs: list[int], _batch=[]) -> None:
    """The mask path before GrammarMasks (deltapack 172d4a8), kept as the micro-benchmark's baseline: a fresh bitmask
    per step and vocabulary, a blocking copy, and the rows gathered, masked and scattered back."""
    import xgrammar as xgr

    if not _batch:
        _batch.append(xgr.BatchGrammarMatcher(max_threads="auto"))
    for vocab in sorted(set(vocabs)):
        idx = [i for i, v in enumerate(vocabs) if v == vocab]
        group = [matchers[i] for i in idx]
        bitmask = xgr.allocate_token_bitmask(len(group), vocab)
        if len(group) > 1:
            _batch[0].batch_fill_next_token_bitmask(group, bitmask)
        else:
            group[0].fill_next_token_bitmask(bitmask, 0)
        sel = torch.tensor([rows[i] for i in idx], device=x.device)
        sub = x.index_select(0, sel)[:, :vocab].contiguous()
        xgr.apply_token_bitmask_inplace(sub, bitmask.to(x.device))
        x[sel, :vocab] = sub


def micro(args, tok, vocab: int, compiled, schema: dict, compile_s: float, base: str) -> dict:
    """Per-step mask cost, old path against GrammarMasks (fill and apply timed apart), on host tensors: a batch of
    --batch rows of which all or half are constrained, walked --max-tokens steps through the schema (each step both
    paths mask the same states and must agree, then every matcher takes a random allowed token), --repeats times."""
    import statistics

    import xgrammar as xgr

    from deltapack.serve.grammar import GrammarMasks

    @dataclasses.dataclass
    class Row:
        vocab: int
        matcher: object | None

    dev = torch.device("cpu" if args.device == "auto" else args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)  # time the GPU work too
    # one intra-op thread: on a shared 2-core machine torch's parallel copies (index_select) fall off a cliff when
    # another process holds a core (hundreds of ms), which would only measure the neighbours
    torch.set_num_threads(1)
    out = {}
    def walk(every: int) -> tuple[int, dict[str, list[float]]]:
        """One seeded walk: per step the seconds of the old path, the fill and the apply (the same states each walk)."""
        rows = [Row(vocab, xgr.GrammarMatcher(compiled) if b % every == 0 else None) for b in range(args.batch)]
        cons = [b for b, r in enumerate(rows) if r.matcher is not None]
        masks = GrammarMasks(dev)
        gen = torch.Generator().manual_seed(0)
        times: dict[str, list[float]] = {"old": [], "fill": [], "apply": []}
        for step in range(args.max_tokens):
            x = (torch.randn(args.batch, vocab, generator=gen) * 4).to(dev)
            a, b_ = x.clone(), x.clone()
            t = {}
            for which in (("old", "new") if step % 2 else ("new", "old")):  # alternate: neither always runs on warm caches
                sync()
                t0 = time.perf_counter()
                if which == "old":
                    old_apply_grammar_masks(a, cons, [rows[b].matcher for b in cons], [vocab] * len(cons))
                    sync()
                    t["old"] = time.perf_counter() - t0
                else:
                    masks.fill(rows)
                    t1 = time.perf_counter()
                    masks.apply(b_)
                    sync()
                    t["fill"], t["apply"] = t1 - t0, time.perf_counter() - t1
            if step >= 2:  # the first steps pay for thread pools and allocations
                for k in times:
                    times[k].append(t[k])
            if not torch.equal(a, b_):
                raise RuntimeError(f"old and new masks differ at step {step}")
            toks = b_.argmax(-1).tolist()  # a random allowed token per constrained row (random logits)
            for b in cons:
                if not rows[b].matcher.accept_token(toks[b]):
                    raise RuntimeError(f"row {b} refused token {toks[b]} at step {step}")
        return len(cons), times

    for label, every in (("constrained", 1), ("half", 2)):
        walks = [walk(every) for _ in range(max(1, args.repeats))]
        n_cons = walks[0][0]
        # each step's work is identical across the walks: its fastest is its cost without the neighbours' noise
        best = {k: [min(w[1][k][i] for w in walks) for i in range(len(walks[0][1][k]))] for k in walks[0][1]}
        best["new"] = [min(w[1]["fill"][i] + w[1]["apply"][i] for w in walks) for i in range(len(best["fill"]))]
        us = lambda v: round(1e6 * statistics.median(v), 1)
        out[label] = {"constrained_rows": n_cons, "steps_timed": len(best["old"]), "walks": len(walks),
                      "old_us_per_step": us(best["old"]), "new_us_per_step": us(best["new"]),
                      "new_fill_us_per_step": us(best["fill"]), "new_apply_us_per_step": us(best["apply"]),
                      "mean_us": {k: round(1e6 * statistics.mean(v), 1) for k, v in best.items()}}
    return {
        "command": "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]]),
        "device": (f"{torch.cuda.get_device_name(dev)} (logits and masks applied there; fill on its host, "
                   f"{os.cpu_count()} cores)" if dev.type == "cuda" else
                   f"cpu ({_cpu_name()}), {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "config": {"base": str(base), "vocab": vocab, "batch": args.batch, "steps": args.max_tokens, "schema": schema,
                   "xgrammar": importlib.metadata.version("xgrammar"), "logits": f"float32 on {dev}",
                   "mask_threads": "xgrammar BatchGrammarMatcher auto (half the hardware threads)"},
        "schema_compile_s": round(compile_s, 3),
        "stat": ("per step the fastest of --repeats identical walks, then the median over the steps (mean_us: "
                 "the mean over the steps; xgrammar's CPU masking kernel is slow on steps where most tokens are "
                 "disallowed, so the mean is well above the median)"),
        "note": ("the mask step alone (no forward pass to overlap with): fixed per-step costs (allocation, "
                 "gather/contiguous/scatter, copies) and, on a GPU, that both paths give the same masked logits; the "
                 "overlap of the fill with the forward shows in the engine run only"),
        "results": out,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kernels", default="auto")
    ap.add_argument("--decode", default="auto", choices=["auto", "graph", "static", "dynamic"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each mode (the fastest is reported, all are kept)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU, 16 tokens, one run per mode")
    ap.add_argument("--micro", action="store_true", help="no model: the per-step mask cost alone, old path against "
                    "the current one (--device cuda: logits on the GPU; bench/results/serving_constrained_{cpu,gpu}_micro.json)")
    args = ap.parse_args()
    if args.micro:
        return main_micro(args)
    if args.smoke:
        args.max_tokens, args.repeats = 16, 1
        if args.device == "auto":
            args.device = "cpu"
    out = args.out or ROOT / "bench" / "results" / ("serving_constrained_cpu_smoke.json" if args.smoke else "serving_constrained.json")
    from deltapack.serve import grammar as gmod
    from deltapack.serve.app import build_server
    from deltapack.serve.grammar import GrammarSpec, compile_spec
    from deltapack.serve.sampling import SamplingParams

    base = args.base
    if base is None:
        from deltapack.io.embedded import embedded_model_dir

        base = str(embedded_model_dir())
    state = build_server(base, [], device=args.device, dtype=args.dtype, kernels=args.kernels, max_batch=args.batch,
                         decode=args.decode, prefill_delay_s=0.0, max_model_len=512)
    try:
        r = state.runner
        tok = r.tokenizer
        schema = json.loads(json.dumps(SCHEMA))
        schema["properties"]["notes"]["minLength"] = 8 * args.max_tokens  # no token spells more than 8 characters of it here
        t0 = time.perf_counter()
        compiled = compile_spec(GrammarSpec("json_schema", schema, "bench"), tok, r.vocab_size, set(r.eos_ids))
        compile_s = time.perf_counter() - t0
        prompts = []
        for i in range(args.batch):
            msgs = [{"role": "user", "content": f"Describe {TOPICS[i % len(TOPICS)]} (person {i}) as a JSON object."}]
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            prompts.append(list(tok(text, add_special_tokens=False)["input_ids"]))

        def params(constrained: bool) -> SamplingParams:
            return SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, grammar=compiled if constrained else None)

        # the grammar's own host time per step, in three parts: the bitmask fill (runs while the forward is queued on
        # a GPU), the apply (host side: it queues a copy and a kernel) and token accepts. No device sync is added:
        # one would move the fill after the forward and change the very overlap being measured; the wall cost of the
        # grammar is the step time's difference between the runs.
        spent = {"fill": 0.0, "apply": 0.0, "accept": 0.0}

        def timed(key, fn):
            def wrapper(*a, **kw):
                t = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    spent[key] += time.perf_counter() - t
            return wrapper

        real_fill, real_apply = gmod.GrammarMasks.fill, gmod.GrammarMasks.apply
        real_matcher = gmod.new_matcher

        class TimedMatcher:
            """The engine's matcher with its accept_token timed (the other per-token grammar cost)."""

            def __init__(self, m):
                self._m = m
                self.accept_token = timed("accept", m.accept_token)

            def __getattr__(self, name):
                return getattr(self._m, name)

        gmod.GrammarMasks.fill = timed("fill", real_fill)
        gmod.GrammarMasks.apply = timed("apply", real_apply)
        gmod.new_matcher = lambda compiled: TimedMatcher(real_matcher(compiled))
        modes = {"unconstrained": lambda i: False, "constrained": lambda i: True, "half": lambda i: i % 2 == 0}
        run_batch(state, prompts[: min(8, args.batch)], lambda i: params(i % 2 == 0))  # warm-up: kernels, first masks
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(args.repeats):
            for mode, pick in modes.items():
                for k in spent:
                    spent[k] = 0.0
                res = run_batch(state, prompts, lambda i, pick=pick: params(pick(i)))
                res.update({f"{k}_s": v for k, v in spent.items()})
                runs[mode].append(res)
        gmod.GrammarMasks.fill, gmod.GrammarMasks.apply, gmod.new_matcher = real_fill, real_apply, real_matcher
        summary = {}
        for mode, rs in runs.items():
            best = min(rs, key=lambda x: x["decode_s"] / max(1, x["steps"]))
            decode_tokens = best["tokens"] - args.batch  # the first token of each row comes from the prefill
            summary[mode] = {
                "ms_per_decode_step": round(1000 * best["decode_s"] / max(1, best["steps"]), 3),
                "decode_tokens_per_s": round(decode_tokens / best["decode_s"], 1),
                # host time per step (the prefill's sampling counts as one more step), no device sync inside
                **{f"{k}_ms_per_step": round(1000 * best[f"{k}_s"] / max(1, best["steps"] + 1), 3) for k in spent},
                "grammar_cpu_ms_per_step": round(1000 * sum(best[f"{k}_s"] for k in spent) / max(1, best["steps"] + 1), 3),
                "steps": best["steps"], "tokens": best["tokens"], "wall_s": round(best["wall_s"], 3),
                "prefill_s": round(best["prefill_s"], 3), "finish_reasons": best["finish"],
            }
        u = summary["unconstrained"]["ms_per_decode_step"]
        result = {
            "command": "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]]),
            "device": (torch.cuda.get_device_name(r.device) if r.device.type == "cuda" else f"cpu ({_cpu_name()}), {torch.get_num_threads()} torch threads"),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": _git_commit(),
            "config": {"base": str(base), "batch": args.batch, "max_tokens": args.max_tokens, "repeats": args.repeats,
                       "dtype": str(r.dtype).replace("torch.", ""), "kernels": r.state.kernels.name, "decode": state.engine.decode_mode,
                       "schema": schema, "xgrammar": importlib.metadata.version("xgrammar"),
                       "mask_threads": "xgrammar BatchGrammarMatcher auto (half the hardware threads)"},
            "schema_compile_s": round(compile_s, 3),
            "results": summary,
            "overhead": {
                mode: {"ms_per_step": round(summary[mode]["ms_per_decode_step"] - u, 3),
                       "percent": round(100 * (summary[mode]["ms_per_decode_step"] / u - 1), 1)}
                for mode in ("constrained", "half")
            },
            "runs": runs,
        }
    finally:
        state.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.part")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    for mode, s in summary.items():
        print(f"{mode:>13}: {s['ms_per_decode_step']:8.2f} ms/step  {s['decode_tokens_per_s']:9.1f} tok/s  grammar host "
              f"{s['grammar_cpu_ms_per_step']:.2f} ms/step (fill {s['fill_ms_per_step']:.2f}, apply {s['apply_ms_per_step']:.2f}, "
              f"accept {s['accept_ms_per_step']:.2f})")
    print(f"wrote {out}")
    return 0


def main_micro(args) -> int:
    from transformers import AutoConfig, AutoTokenizer

    from deltapack.serve.grammar import GrammarSpec, compile_spec

    base = args.base
    if base is None:
        from deltapack.io.embedded import embedded_model_dir

        base = str(embedded_model_dir())
    tok = AutoTokenizer.from_pretrained(base)
    vocab = int(AutoConfig.from_pretrained(base).vocab_size)
    schema = json.loads(json.dumps(SCHEMA))
    schema["properties"]["notes"]["minLength"] = 8 * args.max_tokens
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    t0 = time.perf_counter()
    compiled = compile_spec(GrammarSpec("json_schema", schema, "bench"), tok, vocab, eos)
    compile_s = time.perf_counter() - t0
    result = micro(args, tok, vocab, compiled, schema, compile_s, base)
    where = "gpu" if args.device.startswith("cuda") else "cpu"
    out = args.out or ROOT / "bench" / "results" / f"serving_constrained_{where}_micro.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.part")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    for label, r in result["results"].items():
        print(f"{label:>12} ({r['constrained_rows']} of {args.batch} rows): old {r['old_us_per_step']:.0f} us/step, new "
              f"{r['new_us_per_step']:.0f} us/step (fill {r['new_fill_us_per_step']:.0f}, apply {r['new_apply_us_per_step']:.0f})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
