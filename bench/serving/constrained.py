"""Per-token cost of structured output (xgrammar JSON-schema masks) in the serving engine at batch 64.

The engine itself (no HTTP) on one base model, three runs of --batch requests each, all admitted together:
every row unconstrained, every row constrained by a JSON schema, and half / half. Each row generates exactly
--max-tokens tokens (unconstrained rows ignore EOS; the schema ends in a string with a minimum length the rows
cannot reach in that many tokens, so no constrained row leaves early and all runs decode the same number of rows
per step). Reported per run: decode ms per step, decode tokens/s, the time per step spent on grammars (filling and applying
masks, accepting tokens), and the schema's compile time (once; compiled grammars are cached).

    python bench/serving/constrained.py --device cuda                 # GPU figure: bench/results/serving_constrained.json
    python bench/serving/constrained.py --smoke                       # CPU, short: bench/results/serving_constrained_cpu_smoke.json

Default base: the embedded SmolLM2-135M-Instruct (deltapack.io.embedded); --base takes any served base.
"""

from __future__ import annotations

import argparse
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
    args = ap.parse_args()
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

        # time spent on grammars: masks (fill + apply, around the function the sampler calls) and token accepts
        mask_s = [0.0]
        real_masks = gmod.apply_grammar_masks

        def timed_masks(*a, **kw):
            t = time.perf_counter()
            try:
                return real_masks(*a, **kw)
            finally:
                if r.device.type == "cuda":
                    torch.cuda.synchronize(r.device)
                mask_s[0] += time.perf_counter() - t

        real_matcher = gmod.new_matcher

        class TimedMatcher:
            """The engine's matcher with its accept_token timed (the other per-token grammar cost)."""

            def __init__(self, m):
                self._m = m

            def accept_token(self, tok):
                t = time.perf_counter()
                try:
                    return self._m.accept_token(tok)
                finally:
                    mask_s[0] += time.perf_counter() - t

            def __getattr__(self, name):
                return getattr(self._m, name)

        gmod.apply_grammar_masks = timed_masks
        gmod.new_matcher = lambda compiled: TimedMatcher(real_matcher(compiled))
        modes = {"unconstrained": lambda i: False, "constrained": lambda i: True, "half": lambda i: i % 2 == 0}
        run_batch(state, prompts[: min(8, args.batch)], lambda i: params(i % 2 == 0))  # warm-up: kernels, first masks
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(args.repeats):
            for mode, pick in modes.items():
                mask_s[0] = 0.0
                res = run_batch(state, prompts, lambda i, pick=pick: params(pick(i)))
                res["mask_s"] = mask_s[0]
                runs[mode].append(res)
        gmod.apply_grammar_masks, gmod.new_matcher = real_masks, real_matcher
        summary = {}
        for mode, rs in runs.items():
            best = min(rs, key=lambda x: x["decode_s"] / max(1, x["steps"]))
            decode_tokens = best["tokens"] - args.batch  # the first token of each row comes from the prefill
            summary[mode] = {
                "ms_per_decode_step": round(1000 * best["decode_s"] / max(1, best["steps"]), 3),
                "decode_tokens_per_s": round(decode_tokens / best["decode_s"], 1),
                "grammar_ms_per_step": round(1000 * best["mask_s"] / max(1, best["steps"] + 1), 3),
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
        print(f"{mode:>13}: {s['ms_per_decode_step']:8.2f} ms/step  {s['decode_tokens_per_s']:9.1f} tok/s  grammar {s['grammar_ms_per_step']:.2f} ms/step")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
