"""DeltaDQ study: does group-wise dropout beat DARE, which group size, does separate quantization pay, and what the
method keeps end to end at 16-128x. Every number in docs/methods/deltadq.md comes from this script's output.

A real fine-tune is needed (on i.i.d. synthetic deltas no dropout pattern can beat another), so the script makes one:
  --model pico     (CPU) a small Llama (hidden 256, 4 layers, byte-level tokenizer) pre-trained from scratch on the
                   stdlib-docstring corpus, then fully fine-tuned on Python stdlib source code; ~10 min on 2 cores.
  --model smollm2  (GPU) the embedded SmolLM2-135M-Instruct fully fine-tuned on Python stdlib source code.
  --smoke          the same code path, tiny (CPU, a minute).

Experiments (per linear layer, errors are layer-output errors tr(E H Eᵀ) / tr(Δ H Δᵀ), H from held-out fine-tune-domain
text, i.e. not the text the search saw):
  E1 dropout pattern, unquantized survivors: DARE (Bernoulli) vs group-wise dropout at each group size g, over seeds;
     the searched g (chosen on the calibration corpus) vs the default; the same on i.i.d. Gaussian deltas (control).
  E2 separate quantization at k = 4 bits, s = 0..3: true bits per kept value, the paper's nominal k - s, output error,
     and the entropy of the part ids (what an entropy coder could save).
  E3 end to end: api.compress with dare and deltadq variants at 16/32/64/128x: true ratio, held-out loss, KL to the
     fine-tune, share of the fine-tune's loss improvement kept.

    python bench/deltadq_study.py --model pico --out bench/results/deltadq_study_pico
    python bench/deltadq_study.py --model smollm2 --out bench/results/deltadq_study_smollm2     # GPU
    python bench/deltadq_study.py --smoke --out /tmp/dq-smoke
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from deltapack import api  # noqa: E402
from deltapack.calib.activations import collect_hessians  # noqa: E402
from deltapack.calib.data import default_calibration_texts, token_batches  # noqa: E402
from deltapack.format import codec_deltadq as dq  # noqa: E402
from deltapack.format.masks import bernoulli_mask, seed_for  # noqa: E402
from deltapack.format.packing import unpack_bits  # noqa: E402
from deltapack.io.sources import open_model  # noqa: E402

log = logging.getLogger("deltadq_study")

# fine-tune domain: the source code of these stdlib modules (train) and of those (held out)
TRAIN_MODULES = ("json.decoder", "json.encoder", "csv", "textwrap", "difflib", "fractions", "statistics", "heapq",
                 "bisect", "shlex", "string", "calendar", "dataclasses", "enum", "functools", "argparse", "pprint",
                 "configparser", "glob", "fnmatch", "copy", "ast", "tokenize", "gettext", "colorsys", "graphlib")
HELDOUT_MODULES = ("base64", "quopri", "uu", "wave", "netrc", "sched", "tabnanny", "queue", "weakref", "abc",
                   "numbers", "operator", "keyword", "linecache", "reprlib", "stringprep", "zipapp", "filecmp")


def module_sources(names) -> list[str]:
    import importlib

    out = []
    for n in names:
        try:
            out.append(inspect.getsource(importlib.import_module(n)))
        except (ImportError, OSError, TypeError):
            continue
    return out


# ---- models -----------------------------------------------------------------------------------------------------------
def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


def train(model, ids: torch.Tensor, steps: int, lr: float, batch: int, device, desc: str) -> list[float]:
    """AdamW, warmup 10 steps then cosine to 10%, fp32 master weights (bf16 autocast on CUDA)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in tqdm(range(steps), desc=desc, leave=False):
        f = min(1.0, (step + 1) / 10) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
        for pg in opt.param_groups:
            pg["lr"] = lr * f
        x = ids[torch.randint(0, ids.shape[0], (batch,), generator=g)].to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def make_pair(args, work: Path, device) -> tuple[Path, Path, dict]:
    """(base dir, fine-tune dir, facts). Cached in `work`: a second run reuses the pair."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    base_dir, ft_dir = work / "base", work / "ft"
    facts_path = work / "pair.json"
    if facts_path.is_file() and (ft_dir / "config.json").is_file():
        return base_dir, ft_dir, json.loads(facts_path.read_text())
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    code = module_sources(TRAIN_MODULES)
    facts: dict = {"model": args.model}
    if args.model == "smollm2":
        from deltapack.io.embedded import embedded_gguf

        src = open_model(str(embedded_gguf()))
        shutil.copytree(src.path, base_dir)
        tok = AutoTokenizer.from_pretrained(str(base_dir))
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(device)
    else:
        tok = byte_tokenizer()
        small = args.smoke
        cfg = LlamaConfig(hidden_size=64 if small else 256, intermediate_size=192 if small else 768,
                          num_hidden_layers=2 if small else 4, num_attention_heads=4, num_key_value_heads=2,
                          vocab_size=264, max_position_embeddings=512, tie_word_embeddings=False,
                          bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(device)
        docs = token_batches(tok, default_calibration_texts(), args.seq_len, 4000)
        t0 = time.time()
        losses = train(model, docs, args.pretrain_steps, 3e-3, args.batch, device, "pretrain")
        facts["pretrain"] = {"steps": args.pretrain_steps, "tokens_available": int(docs.numel()),
                             "loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:]),
                             "seconds": round(time.time() - t0, 1)}
        model.to(torch.bfloat16).save_pretrained(base_dir)
        tok.save_pretrained(base_dir)
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(device)
    ids = token_batches(tok, code, args.seq_len, 4000)
    t0 = time.time()
    losses = train(model, ids, args.ft_steps, args.ft_lr, args.batch, device, "fine-tune")
    facts["finetune"] = {"steps": args.ft_steps, "lr": args.ft_lr, "tokens_available": int(ids.numel()),
                         "loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:]),
                         "seconds": round(time.time() - t0, 1)}
    model.to(torch.bfloat16).save_pretrained(ft_dir)
    tok.save_pretrained(ft_dir)
    facts_path.write_text(json.dumps(facts, indent=1))
    return base_dir, ft_dir, facts


# ---- per-layer errors -------------------------------------------------------------------------------------------------
def err(E: torch.Tensor, H: torch.Tensor) -> float:
    return float(((E @ H) * E).sum())


def group_drop(delta: torch.Tensor, g: int, n_values: int, seed: int, hashes=None) -> torch.Tensor:
    """Group-wise dropout with rescale, unquantized (fp32 survivors)."""
    m, n = delta.shape
    keep, rows_hi = dq.keep_layout(m, n, g, n_values)
    params = {"g": g, "keep": keep, "rows_hi": rows_hi, "seed": seed}
    pos = dq.positions(params, (m, n), delta.device, hashes)
    vals, _ = dq.gather_rescaled(delta, params, pos)
    return dq.scatter_values(vals, params, (m, n), pos)


def dare_drop(delta: torch.Tensor, q: float, seed: int) -> torch.Tensor:
    mask = bernoulli_mask(tuple(delta.shape), q, seed, delta.device)
    return delta * mask / q


def exp_dropout(deltas: dict, H_search: dict, H_eval: dict, keep_rates, group_sizes, seeds, device) -> dict:
    """E1. For each keep rate q: mean (over layers) relative output error of DARE, of each g, of the searched g."""
    out = {}
    for q in keep_rates:
        rows = []
        for name, delta in tqdm(deltas.items(), desc=f"E1 q={q:g}", leave=False):
            m, n = delta.shape
            H = H_eval[name].mean().to(device)
            Hs = H_search[name].mean().to(device)
            ref = err(delta, H)
            iid = torch.randn(delta.shape, generator=torch.Generator().manual_seed(7)).to(device) * delta.std()
            ref_iid = err(iid, H)
            nv = int(q * m * n)
            gs = [g for g in group_sizes if n % g == 0 and g * q >= 1]
            row = {"layer": name, "dare": [], "iid_dare": [], "group": {g: [] for g in gs},
                   "iid_group": {g: [] for g in gs}}
            for s in seeds:
                sd = seed_for(name, s)
                row["dare"].append(err(delta - dare_drop(delta, q, sd), H) / ref)
                row["iid_dare"].append(err(iid - dare_drop(iid, q, sd), H) / ref_iid)
                hashes = dq.MaskHashes((m, n), sd, device)
                for g in gs:
                    row["group"][g].append(err(delta - group_drop(delta, g, nv, sd, hashes), H) / ref)
                    row["iid_group"][g].append(err(iid - group_drop(iid, g, nv, sd, hashes), H) / ref_iid)
            # the search: g with the lowest error on the calibration corpus (seed 0's mask), judged on held-out text
            sd0 = seed_for(name, seeds[0])
            hashes = dq.MaskHashes((m, n), sd0, device)
            search_err = {g: err(delta - group_drop(delta, g, nv, sd0, hashes), Hs) for g in gs}
            g_star = min(search_err, key=search_err.get)
            row["searched_g"] = g_star
            row["searched"] = row["group"][g_star][0]
            row["oracle"] = min(v[0] for v in row["group"].values())  # best g chosen on the held-out text itself
            rows.append(row)
        out[str(q)] = summarize_dropout(rows, seeds)
    return out


def _mean(x):
    x = list(x)
    return sum(x) / len(x) if x else float("nan")


def summarize_dropout(rows, seeds) -> dict:
    def per_seed(get):  # mean over layers, for each seed -> (mean over seeds, spread over seeds)
        vals = [_mean(get(r)[i] for r in rows) for i in range(len(seeds))]
        m = _mean(vals)
        sd = (sum((v - m) ** 2 for v in vals) / max(1, len(vals) - 1)) ** 0.5
        return {"mean": m, "seed_sd": sd}

    gs = sorted({g for r in rows for g in r["group"]})
    common = [g for g in gs if all(g in r["group"] for r in rows)]
    s0 = {
        "layers": len(rows),
        "dare": per_seed(lambda r: r["dare"]),
        "group": {str(g): per_seed(lambda r, g=g: r["group"][g]) for g in common},
        "iid_dare": per_seed(lambda r: r["iid_dare"]),
        "iid_group": {str(g): per_seed(lambda r, g=g: r["iid_group"][g]) for g in common},
        "seed0": {
            "dare": _mean(r["dare"][0] for r in rows),
            "searched": _mean(r["searched"] for r in rows),
            "oracle": _mean(r["oracle"] for r in rows),
            **{f"g={g}": _mean(r["group"][g][0] for r in rows) for g in common},
        },
        "searched_g_counts": {str(g): sum(r["searched_g"] == g for r in rows) for g in gs},
        "per_layer": [{"layer": r["layer"], "dare": _mean(r["dare"]), "searched_g": r["searched_g"],
                       **{f"g{g}": _mean(v) for g, v in r["group"].items()}} for r in rows],
    }
    return s0


def exp_split(deltas: dict, H_eval: dict, q: float, bits: int, device) -> dict:
    """E2. Separate quantization at k = bits, s = 0..bits-1, on the same survivors (g = 32 where it divides)."""
    res = {}
    for s in range(0, bits):
        tot_vals = tot_bits = 0
        rel_w, rel_o, ent = [], [], []
        for name, delta in deltas.items():
            m, n = delta.shape
            g = 32 if n % 32 == 0 else n
            nv = int(q * m * n)
            sd = seed_for(name, 0)
            params, parts, pos = dq.encode(delta, g=g, n_values=nv, seed=sd, bits=bits, s=s, scale="tensor")
            vals, _ = dq.gather_rescaled(delta, params, pos)
            got = dq.decode_values(params, parts, (m, n))
            approx = dq.scatter_values(got, params, (m, n), pos)
            unq = dq.scatter_values(vals, params, (m, n), pos)
            H = H_eval[name].mean().to(device)
            payload = sum(parts[k].numel() for k in ("codes", "part_ids") if k in parts)
            side = sum(t.numel() * t.element_size() for k, t in parts.items() if k not in ("codes", "part_ids"))
            tot_vals += vals.numel()
            tot_bits += 8 * (payload + side)
            rel_w.append(float((got - vals).norm() / vals.norm()))
            rel_o.append(err(approx - unq, H) / err(unq, H))
            if s:
                pid = unpack_bits(parts["part_ids"].view(1, -1), s, vals.numel()).view(-1).long()
                pid = pid.bincount(minlength=1 << s).float()
                p = pid[pid > 0] / pid.sum()
                ent.append(float(-(p * p.log2()).sum()))
        res[str(s)] = {
            "stored_bits_per_value": tot_bits / tot_vals,
            "paper_bits_per_value": bits - s,
            "part_id_entropy_bits": _mean(ent) if s else 0.0,
            "quant_rel_error": _mean(rel_w),
            "quant_rel_output_error": _mean(rel_o),
        }
    return res


# ---- end to end -------------------------------------------------------------------------------------------------------
def lm_eval(model, ids: torch.Tensor, ref_logp: list | None, device, batch: int = 8):
    """(mean next-token loss, mean KL(ref || model) per token, log-probs)."""
    tot_loss = tot_kl = 0.0
    n = 0
    logps = []
    with torch.no_grad():
        for i, b0 in enumerate(range(0, ids.shape[0], batch)):
            x = ids[b0 : b0 + batch].to(device)
            logits = model(input_ids=x).logits.float()
            lp = F.log_softmax(logits[:, :-1], -1)
            tot_loss += float(F.nll_loss(lp.reshape(-1, lp.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
            if ref_logp is not None:
                r = ref_logp[i].to(device)
                tot_kl += float((r.exp() * (r - lp)).sum())
            else:
                logps.append(lp.cpu())
            n += x[:, 1:].numel()
    return tot_loss / n, tot_kl / n, logps


def exp_end_to_end(base_dir, ft_dir, eval_ids, ratios, variants, seeds, work: Path, device) -> dict:
    """E3. Every variant at every ratio, once per mask salt (`seed` knob): true ratio, loss, KL, kept share."""
    from transformers import AutoConfig

    from deltapack.api import merged_state_dict, model_from_state_dict

    cfg = AutoConfig.from_pretrained(str(ft_dir))
    dt = torch.float32

    def load(d):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(d), dtype=dt).to(device).eval()

    ft_loss, _, ref = lm_eval(load(ft_dir), eval_ids, None, device)
    base_loss, base_kl, _ = lm_eval(load(base_dir), eval_ids, ref, device)
    out = {"finetune_loss": ft_loss, "base_loss": base_loss, "base_kl": base_kl, "seeds": list(seeds), "runs": []}
    for ratio in ratios:
        for label, method, params in variants:
            for seed in seeds:
                d = work / f"d-{label}-{ratio:g}-{seed}"
                shutil.rmtree(d, ignore_errors=True)
                t0 = time.time()
                p = dict(params, seed=seed)
                try:
                    api.compress(base_dir, ft_dir, d, method=method, ratio=ratio, params=p, progress=False,
                                 device=str(device))
                except Exception as e:  # an unreachable ratio is a result, not a crash
                    out["runs"].append({"variant": label, "ratio": ratio, "seed": seed,
                                        "error": f"{e.__class__.__name__}: {e}"})
                    continue
                secs = time.time() - t0
                info = api.inspect(d)
                man = json.loads((d / "delta_config.json").read_text())
                bits_used = sorted({t["params"].get("bits") for t in man["tensors"].values() if t["codec"] != "dense"},
                                   key=str)
                sd = merged_state_dict(base_dir, d)
                model = model_from_state_dict(cfg, sd, device=device, dtype=dt)
                loss, kl, _ = lm_eval(model, eval_ids, ref, device)
                out["runs"].append({
                    "variant": label, "method": method, "params": p, "ratio": ratio, "seed": seed,
                    "true_ratio": info["true_ratio"], "nominal_ratio": info["nominal_ratio"], "loss": loss, "kl": kl,
                    "kept": (base_loss - loss) / (base_loss - ft_loss) if base_loss != ft_loss else float("nan"),
                    "bits_used": bits_used, "seconds": round(secs, 1),
                })
                log.info("%s", out["runs"][-1])
                shutil.rmtree(d, ignore_errors=True)
    return out


# ---- report -----------------------------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    L = [f"# DeltaDQ study ({res['args']['model']}{', smoke' if res['args']['smoke'] else ''})", "",
         "Generated by `bench/deltadq_study.py`; do not edit by hand.", "",
         f"Pair: {json.dumps(res['pair'])}", ""]
    L += ["## E1: dropout pattern (unquantized survivors), relative layer-output error on held-out text", "",
          "mean over layers of tr(EHEᵀ)/tr(ΔHΔᵀ); ± = spread of that mean over mask seeds", ""]
    for q, r in res["E1"].items():
        gs = list(r["group"])
        L.append(f"keep rate q = {float(q):g} ({r['layers']} layers)")
        L.append("")
        L.append("| deltas | DARE | " + " | ".join(f"g={g}" for g in gs) + " |")
        L.append("|---|---|" + "---|" * len(gs))
        for kind, dkey, gkey in (("fine-tune", "dare", "group"), ("i.i.d. Gaussian", "iid_dare", "iid_group")):
            cells = [f"{r[dkey]['mean']:.4f} ± {r[dkey]['seed_sd']:.4f}"]
            cells += [f"{r[gkey][g]['mean']:.4f} ± {r[gkey][g]['seed_sd']:.4f}" for g in gs]
            L.append(f"| {kind} | " + " | ".join(cells) + " |")
        s0 = r["seed0"]
        fixed = ", ".join(f"{k} {v:.4f}" for k, v in s0.items() if k.startswith("g="))
        L += ["", f"seed 0 masks: DARE {s0['dare']:.4f}; fixed {fixed}; searched g (chosen on the calibration corpus) "
                  f"{s0['searched']:.4f}; oracle g (chosen on the held-out text) {s0['oracle']:.4f}; searched g counts "
                  f"{json.dumps(r['searched_g_counts'])}", ""]
    L += ["## E2: separate quantization (k = %d), q = %s" % (res["E2"]["bits"], res["E2"]["q"]), "",
          "| s | stored bits/value (true) | paper's bits/value (k-s) | part-id entropy | value rel. error | "
          "output rel. error (vs unquantized survivors) |", "|---|---|---|---|---|---|"]
    for s, r in res["E2"]["by_s"].items():
        L.append(f"| {s} | {r['stored_bits_per_value']:.3f} | {r['paper_bits_per_value']} | "
                 f"{r['part_id_entropy_bits']:.3f} | {r['quant_rel_error']:.4f} | {r['quant_rel_output_error']:.5f} |")
    e3 = res["E3"]
    L += ["", "## E3: end to end (held-out fine-tune-domain text)", "",
          f"fine-tune loss {e3['finetune_loss']:.4f}, base loss {e3['base_loss']:.4f} (KL to fine-tune "
          f"{e3['base_kl']:.4f}); kept = share of the fine-tune's loss improvement retained", "",
          "one row per variant and ratio: mean over mask salts " + json.dumps(e3["seeds"]) + " (± half the range)", "",
          "| variant | target | true ratio | nominal | loss | KL to fine-tune | kept | bits used | seconds |",
          "|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in e3["runs"]:
        groups.setdefault((r["variant"], r["ratio"]), []).append(r)
    for (variant, ratio), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            L.append(f"| {variant} | {ratio:g}x | - | - | - | - | {rs[0]['error'][:70]} | - | - |")
            continue

        def pm(key, fmt):
            v = [r[key] for r in ok]
            return f"{fmt.format(_mean(v))} ± {fmt.format((max(v) - min(v)) / 2)}"

        L.append(f"| {variant} | {ratio:g}x | {pm('true_ratio', '{:.1f}')} | {_mean(r['nominal_ratio'] for r in ok):.1f} "
                 f"| {pm('loss', '{:.4f}')} | {pm('kl', '{:.4f}')} | {pm('kept', '{:.3f}')} | "
                 f"{','.join(map(str, ok[0]['bits_used']))} | {_mean(r['seconds'] for r in ok):.1f} |")
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("pico", "smollm2"), default="pico")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default="bench/results/deltadq_study_pico")
    ap.add_argument("--work", default=None, help="where the model pair is kept (default: OUT-work, reused)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--ft-steps", type=int, default=150)
    ap.add_argument("--ft-lr", type=float, default=None)
    ap.add_argument("--ratios", default="16,32,64,128")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: shared machines oversubscribe badly)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.smoke:
        args.pretrain_steps, args.ft_steps, args.seq_len, args.batch = 20, 10, 64, 4
        args.ratios = "16"
    if args.ft_lr is None:
        args.ft_lr = 2e-5 if args.model == "smollm2" else 1e-3
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or f"{args.out}-work")
    t_start = time.time()
    base_dir, ft_dir, facts = make_pair(args, work, device)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ft_dir))
    n_cal = 8 if args.smoke else 32
    cal_ids = token_batches(tok, default_calibration_texts(), args.seq_len, n_cal)  # what a user gets by default
    held = module_sources(HELDOUT_MODULES)
    eval_ids = token_batches(tok, held, args.seq_len, n_cal)
    ft_src = open_model(str(ft_dir))
    H_search = collect_hessians(ft_src, cal_ids, device, progress=False)
    H_eval = collect_hessians(ft_src, eval_ids, device, progress=False)
    base_src = open_model(str(base_dir))
    deltas = {}
    for name in sorted(H_eval):
        if name in H_search and name in base_src:
            deltas[name] = (ft_src.get(name).float() - base_src.get(name).float()).to(device)
    if args.smoke:
        deltas = dict(list(deltas.items())[:4])
    seeds = [0, 1] if args.smoke else [0, 1, 2]
    res = {"args": vars(args), "pair": facts, "device": str(device)}
    res["E1"] = exp_dropout(deltas, H_search, H_eval, (0.25, 0.125, 0.0625), (16, 32, 64, 128, 256, 512, 768),
                            seeds, device)
    res["E2"] = {"bits": 4, "q": 0.125, "by_s": exp_split(deltas, H_eval, 0.125, 4, device)}
    variants = [
        ("dare", "dare", {}),
        ("deltadq", "deltadq", {}),
        ("deltadq-datafree", "deltadq", {"calibrate": False}),
        ("deltadq-g32", "deltadq", {"group_size": 32}),
        ("deltadq-auto-bits", "deltadq", {"bits": "auto"}),
        ("deltadq-k4", "deltadq", {"min_keep": 0}),
        ("deltadq-k2", "deltadq", {"bits": 2}),
    ]
    if args.smoke:
        variants = variants[:2]
    ratios = [float(r) for r in args.ratios.split(",")]
    e3_seeds = [0] if args.smoke else [0, 1]
    res["E3"] = exp_end_to_end(base_dir, ft_dir, eval_ids, ratios, variants, e3_seeds, work, device)
    res["seconds"] = round(time.time() - t_start, 1)
    Path(f"{out}.json").write_text(json.dumps(res, indent=1, default=str))
    Path(f"{out}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
