"""Serving equals merging, on real fine-tunes: every tenant's greedy output through the HTTP server (all tenants'
requests in flight at once, so decode batches mix tenants) against the greedy output of its merged model.

Reference per tenant: `deltapack.serve.testing.merged_model` (base + decoded delta, rebuilt in memory exactly as
`deltapack merge` writes it) under transformers' own cached `generate`, greedy, stopping at EOS like the server.
Server: `deltapack serve`'s app in-process on 127.0.0.1 (real HTTP), one request per (tenant, prompt), all sent
concurrently from threads; every decode step's distinct tenants are counted by wrapping the runner's forward.
Default dtype float32: server computes base(x) + delta(x), the merged model (base + delta) x; in fp32 both agree to
rounding, so any token difference is a bug, not bf16 rounding.

    # GPU, after `bench/quality/run.py --keep-deltas --workdir /root/dpq ...` left deltas of one task:
    python bench/serve_equality.py --deltas-from /root/dpq/deltas --ratio 16 --prompts-task arithmetic \
        --out $OUT/serve-equality.json
    # CPU smoke: pico pair, two methods
    python bench/serve_equality.py --smoke --out /tmp/serve-eq.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "quality"))

from common import command_line, device_name, embedded_base_dir, now_iso, write_json  # noqa: E402

log = logging.getLogger("bench.serve_equality")


def reference_tokens(model, ids: list[int], n: int, eos: set[int], ignore_eos: bool) -> list[int]:
    """Greedy with the model's own KV cache, step by step (with ignore_eos an EOS is emitted and decoding goes on,
    as in the server; transformers' min_new_tokens would instead forbid EOS)."""
    dev = next(model.parameters()).device
    toks: list[int] = []
    with torch.no_grad():
        out = model(torch.tensor([ids], device=dev), use_cache=True)
        for _ in range(n):
            t = int(out.logits[0, -1].float().argmax())
            toks.append(t)
            if t in eos and not ignore_eos:
                break
            out = model(torch.tensor([[t]], device=dev), past_key_values=out.past_key_values, use_cache=True)
    return toks


def tie_margin(model, prefix: list[int], ref_tok: int, got_tok: int) -> dict:
    """At the first differing position: the reference model's logits of its own token and the server's token. A gap
    near fp32 rounding of the logits means a tie broken differently, not a wrong delta."""
    dev = next(model.parameters()).device
    with torch.no_grad():
        logits = model(torch.tensor([prefix], device=dev)).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return {"ref_logit": float(logits[ref_tok]), "server_token_logit": float(logits[got_tok]),
            "gap": float(logits[ref_tok] - logits[got_tok]), "top2_gap": float(top[0] - top[1])}


def count_mixing(state) -> list[int]:
    """Distinct tenants (base counted as one) of every forward the engine runs, recorded in a list."""
    seen: list[int] = []
    runner = state.runner
    orig = runner.forward

    def forward(*a, **kw):
        slots = kw.get("row_slots", a[4] if len(a) > 4 else [])
        seen.append(len(set(slots)))
        return orig(*a, **kw)

    runner.forward = forward
    return seen


def smoke_setup(work: Path) -> tuple[Path, dict[str, Path], list[list[int]]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_finetune, make_llama  # noqa: E402

    from deltapack import api
    from deltapack.serve.testing import make_word_tokenizer, to_float32

    base = work / "base"
    make_llama(base, hidden=64, layers=2, vocab=128, seed=0, dtype=torch.float32)
    make_word_tokenizer(base, 128)
    deltas = {}
    for i, m in enumerate(("lowrank", "bitdelta", "dare")):
        ft = work / f"ft-{m}"
        make_finetune(base, ft, scale=0.6, seed=11 + i, **({"rank": 4} if m == "lowrank" else {}))
        to_float32(ft)
        deltas[m] = api.compress(base, ft, work / m, method=m, ratio=2.0, progress=False)
    prompts = [[1, 5 + i, 9, 17 + i] for i in range(4)]
    return base, deltas, prompts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=None, help="base checkpoint (default: embedded SmolLM2)")
    ap.add_argument("--delta", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--deltas-from", type=Path, default=None, help="a folder of delta dirs (bench/quality --keep-deltas)")
    ap.add_argument("--ratio", default="16", help="with --deltas-from: take dirs ending in -<ratio>x (plus lossless)")
    ap.add_argument("--prompts-task", default="arithmetic", help="bench/quality task whose test prompts are sent")
    ap.add_argument("--n-prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens (longer comparisons)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--kernels", default="reference", help="comma-separated backends to check, e.g. reference,triton")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reference", choices=["merge", "exact"], default="merge",
                    help="merge: what `deltapack merge` writes by default (the fine-tune's dtype); exact: what "
                         "`deltapack merge --dtype float32` writes (base + delta in fp32, unrounded)")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "uvicorn", "uvicorn.access", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import httpx

    from deltapack.compress import resolve_device
    from deltapack.serve.model import eos_token_ids, load_tokenizer
    from deltapack.serve.testing import merged_model, running_server

    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    work = Path(tempfile.mkdtemp(prefix="dp-serve-eq-"))
    if args.smoke:
        base, deltas, prompt_ids = smoke_setup(work)
    else:
        base = Path(args.base) if args.base else embedded_base_dir()
        deltas = {}
        for spec in args.delta:
            name, _, path = spec.partition("=")
            deltas[name] = Path(path)
        if args.deltas_from:
            for d in sorted(args.deltas_from.iterdir()):
                if d.name.endswith(f"-{args.ratio}x") or d.name.endswith("-lossless"):
                    deltas[d.name] = d
        if len(deltas) < 3:
            raise SystemExit(f"need 3+ deltas, found {sorted(deltas)}")
        tok = load_tokenizer(Path(base))
        from tasks import make_splits  # bench/quality/tasks.py

        recs = make_splits(args.prompts_task, 8, 8, args.n_prompts)["test"][: args.n_prompts]
        prompt_ids = [tok(tok.apply_chat_template([{"role": "user", "content": r.prompt}], add_generation_prompt=True,
                                                   tokenize=False), add_special_tokens=False)["input_ids"] for r in recs]

    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(base))
    eos = eos_token_ids(Path(base), cfg, load_tokenizer(Path(base)))
    # exact: base + delta summed in fp32 without rounding to the fine-tune's dtype (`deltapack merge --dtype float32`),
    # i.e. what the server computes up to summation order; plain `deltapack merge` writes the fine-tune's dtype (bf16
    # for SmolLM2), whose rounding can flip a near-tie argmax; the two references separate the effects
    merge_dtype = torch.float32 if args.reference == "exact" else None

    def build_ref(base, path, dtype):
        return merged_model(base, path, dtype=dtype, merge_dtype=merge_dtype)

    t0 = time.perf_counter()
    refs: dict[str, list[list[int]]] = {}
    models_cpu: dict[str, Path | None] = {}
    for name, path in [("base", None)] + list(deltas.items()):
        model = (AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype) if path is None
                 else build_ref(base, path, dtype=dtype)).to(device).eval()
        refs[name] = [reference_tokens(model, ids, args.max_tokens, eos, args.ignore_eos) for ids in prompt_ids]
        models_cpu[name] = path
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ref_seconds = time.perf_counter() - t0
    distinct_outputs = len({json.dumps(v) for v in refs.values()})

    runs = []
    for backend in [b.strip() for b in args.kernels.split(",") if b.strip()]:
        t1 = time.perf_counter()
        with running_server(base, list(deltas.items()), device=str(device), dtype=args.dtype, kernels=backend,
                            max_batch=64, gpu_delta_bytes=16 << 30) as (state, url):
            mixing = count_mixing(state)
            client = httpx.Client(base_url=url, timeout=600)

            def ask(job):
                name, i = job
                r = client.post("/v1/completions", json={"model": name, "prompt": prompt_ids[i], "max_tokens": args.max_tokens,
                                                        "temperature": 0, "return_token_ids": True,
                                                        "ignore_eos": args.ignore_eos})
                r.raise_for_status()
                return name, i, r.json()["choices"][0]["token_ids"]

            jobs = [(name, i) for i in range(len(prompt_ids)) for name in refs]
            got: dict[str, list] = {name: [None] * len(prompt_ids) for name in refs}
            with cf.ThreadPoolExecutor(len(jobs)) as pool:
                for name, i, ids in pool.map(ask, jobs):
                    got[name][i] = ids
            backend_name = state.runner.state.kernels.name
        per_tenant = []
        for name in refs:
            equal = [got[name][i] == refs[name][i] for i in range(len(prompt_ids))]
            first_diff = [next((k for k, (a, b) in enumerate(zip(got[name][i], refs[name][i])) if a != b),
                               None if len(got[name][i]) == len(refs[name][i]) else min(len(got[name][i]), len(refs[name][i])))
                          for i in range(len(prompt_ids))]
            ties = []
            if not all(equal):  # how close to a tie the reference was where the server chose differently
                path = models_cpu[name]
                model = (AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype) if path is None
                         else build_ref(base, path, dtype=dtype)).to(device).eval()
                for i, k in enumerate(first_diff):
                    if k is not None and k < min(len(got[name][i]), len(refs[name][i])):
                        ties.append({"prompt": i, "position": k, **tie_margin(model, prompt_ids[i] + refs[name][i][:k],
                                                                               refs[name][i][k], got[name][i][k])})
                del model
            per_tenant.append({"tenant": name, "equal": all(equal), "prompts_equal": sum(equal),
                               "tokens": sum(len(t) for t in refs[name]), "first_difference": first_diff,
                               "differences": ties})
        runs.append({"kernels": backend_name, "all_equal": all(t["equal"] for t in per_tenant), "tenants": per_tenant,
                     "forwards": len(mixing), "max_tenants_in_one_forward": max(mixing or [0]),
                     "forwards_with_3plus_tenants": sum(1 for m in mixing if m >= 3),
                     "seconds": round(time.perf_counter() - t1, 2)})
        log.info("%s: all equal %s, max tenants in one forward %d", backend_name, runs[-1]["all_equal"], runs[-1]["max_tenants_in_one_forward"])

    out = {"command": command_line(), "device": device_name(device), "date": now_iso(), "smoke": args.smoke,
           "base": str(base), "dtype": args.dtype, "reference": args.reference, "max_tokens": args.max_tokens, "n_prompts": len(prompt_ids),
           "deltas": {k: str(v) for k, v in deltas.items()}, "distinct_reference_outputs": distinct_outputs,
           "reference_seconds": round(ref_seconds, 2), "runs": runs,
           "all_equal": all(r["all_equal"] for r in runs)}
    write_json(args.out, out)
    log.info("wrote %s: all_equal=%s", args.out, out["all_equal"])
    return 0 if out["all_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
