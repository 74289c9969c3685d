"""DeltaLLM weight sharing vs layer dropping (ShortGPT Block Influence) vs the untrained SVD init, at equal size.

    PYTHONPATH=src python bench/share/run.py                  # GPU: SmolLM2-135M-Instruct, -12% and -24%
    PYTHONPATH=src python bench/share/run.py --smoke          # CPU: pico random Llama, a handful of steps
    PYTHONPATH=src python bench/share/run.py --smoke --model DIR   # CPU: a real model, a handful of steps
    python bench/share/run.py --table [bench/results/share.json]   # the README table from a results file
    python bench/update_readme.py                                  # copy bench/results/share.md into the README

Per reduction: one sharing plan (criterion measured on the original), then
  deltallm  – plan + SVD init + delta distillation with progressive module replacement (time-bounded);
  svd-init  – the same plan and parameter count, deltas left at their SVD initialisation;
  layerdrop – blocks with the lowest Block Influence dropped until the model is no larger than deltallm's;
  layerdrop-healed – that model with every remaining block weight distilled from the original on the same text,
              token budget and schedule as deltallm (--heal-lr; beyond the issue's baselines, see baselines.py).
Training text: Python's own docs, 2048 chat answers and 8192 free texts the original writes itself (see
docs/share.md). Metrics on held-out text (Python docs the training never saw): perplexity and mean token KL(original ‖ model);
`kl_self_text`: the same KL on free texts the original writes from other seeds than the training ones (the docs KL
penalises a training mix that is not documentation; this one does not);
and accuracy on seeded prompt/answer items that the original answers correctly (`kept` = share of those the
compressed model still answers; the original scores 1.0 on them by construction). Beside it, the scoring the
DeltaLLM paper reports (lm-eval-harness zero-shot tasks): every item as a choice among its family's answers by
log-likelihood, `choice_kept` = the model's accuracy over all items relative to the original's, and
`choice_kept_paired` = the share of the items the original ranks right that the model ranks right too.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from deltapack.errors import DeltapackError, InputError  # noqa: E402
from deltapack.io.writer import write_bytes_atomic, write_json_atomic  # noqa: E402
from deltapack.share import tasks  # noqa: E402
from deltapack.share.baselines import drop_layers, heal_layer_drop, layer_drop_model, svd_init_model  # noqa: E402
from deltapack.share.data import load_docs, self_chat_texts, self_text_texts, split_docs, windows  # noqa: E402
from deltapack.share.evaluate import evaluate  # noqa: E402
from deltapack.share.model import apply_plan, finalize  # noqa: E402
from deltapack.share.plan import check_plan, make_plan, unique_param_count  # noqa: E402
from deltapack.share.store import load_shared, save_shared  # noqa: E402
from deltapack.share.train import TrainConfig, local_fit, train_deltas  # noqa: E402

log = logging.getLogger("bench.share")
RESULTS = ROOT / "bench" / "results"


def embedded_dir() -> Path:
    """The embedded SmolLM2 as a safetensors directory. Falls back to dequantizing with GgufConfig(dequantize=True)
    where deltapack.io.gguf cannot save a GGUF-loaded model (transformers versions that keep GGUF weights packed)."""
    from deltapack.io.embedded import embedded_gguf, embedded_model_dir
    from deltapack.io.gguf import cache_root

    try:
        return embedded_model_dir()
    except Exception as e:  # noqa: BLE001 - any failure of the core path: try the explicit dequantizing load
        log.warning("embedded_model_dir() failed (%s); dequantizing the GGUF explicitly", e)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    g = embedded_gguf()
    out = cache_root() / "share-bench" / g.stem
    if (out / "config.json").exists():
        return out
    model = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(dequantize=True))
    tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    tmp.rename(out)  # complete directories only
    return out


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (torch {torch.__version__})"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def task_eval(model, tok, items) -> tuple[float | None, dict[str, list[int]]]:
    """(share of `items` answered right, {task family: [right, items]}): the families show where answers are lost."""
    if not items:
        return None, {}
    ok = tasks.score(model, tok, items)
    by_task: dict[str, list[int]] = {}
    for it, good in zip(items, ok):
        c = by_task.setdefault(it["task"], [0, 0])
        c[0] += int(good)
        c[1] += 1
    return sum(ok) / len(ok), by_task


def choice_eval(model, tok, items, original_ok: list[bool] | None) -> dict:
    """Choice-by-likelihood accuracy over all items; relative to the original's (the paper's 'kept'); and paired:
    the share of the items the original ranks right that this model ranks right too (a ratio of accuracies can hide
    answers lost on some items behind answers gained on others)."""
    if not items:
        return {"choice_accuracy": None, "choice_kept": None, "choice_kept_paired": None}
    ok = tasks.score_choices(model, tok, items)
    acc = sum(ok) / len(ok)
    if not original_ok:
        return {"choice_accuracy": acc, "choice_kept": None, "choice_kept_paired": None}
    orig_acc = sum(original_ok) / len(original_ok)
    right = [good for good, orig in zip(ok, original_ok) if orig]
    return {"choice_accuracy": acc, "choice_kept": acc / orig_acc if orig_acc else None,
            "choice_kept_paired": sum(right) / len(right) if right else None}


def row(method, reduction, model, held, original, tok, kept_items, *, items, original_choice: list[bool] | None, extra,
        held_free: torch.Tensor | None = None) -> dict:
    t = time.perf_counter()
    ev = evaluate(model, held, teacher=original)
    kl_free = evaluate(model, held_free, teacher=original)["kl"] if held_free is not None and len(held_free) else None
    acc, by_task = task_eval(model, tok, kept_items)
    r = {
        "method": method, "reduction": reduction, "params": unique_param_count(model), "ppl": ev["ppl"], "kl": ev["kl"],
        "kl_self_text": kl_free,
        "task_accuracy": acc, "kept": acc, "kept_by_task": by_task,
        **choice_eval(model, tok, list(items), original_choice), **extra,
        "eval_seconds": time.perf_counter() - t,
    }
    log.info("%s @%.2f: params %d ppl %.3f kl %.4f tasks %s choice %s", method, reduction, r["params"], r["ppl"], r["kl"],
             acc, r["choice_kept"])
    return r


HELDOUT_SEED_OFFSET = 1_000_003  # seed of the held-out self-text: seed + this


def healed_row(args, cfg, red, dropped, original, train_w, tok, held_w, held_free_w, kept_items, items,
               original_choice, dropped_blocks, calib_tokens) -> dict:
    """Heal `dropped` in place (same text, budget and schedule as deltallm) and score it."""
    t = time.perf_counter()
    summary = heal_layer_drop(dropped, original, train_w, cfg, lr=args.heal_lr, progress=not args.quiet)
    seconds = time.perf_counter() - t
    return row("layerdrop-healed", red, dropped, held_w, original, tok, kept_items, items=items,
               original_choice=original_choice, held_free=held_free_w, extra={
                   "tokens": summary["tokens"], "calib_tokens": calib_tokens, "seconds": seconds,
                   "train_steps": summary["steps"], "heal_lr": args.heal_lr, "dropped_blocks": dropped_blocks})


def run(args) -> dict:
    t_all = time.perf_counter()
    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    tmp_root = Path(tempfile.mkdtemp(prefix="share-bench-"))
    try:
        if args.model:
            model_dir = Path(args.model)
        elif args.smoke:
            from deltapack.share.pico import make_pico

            model_dir = tmp_root / "pico"
            make_pico(model_dir, hidden=64, layers=10)
        else:
            model_dir = embedded_dir()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        # bf16 on GPU; fp32 on CPU, where bf16 matmuls are many times slower
        original = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
        original = original.to(dev).eval()
        for p in original.parameters():
            p.requires_grad_(False)
        load_s = time.perf_counter() - t

        cfg = TrainConfig(tokens=args.tokens, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, alpha=args.alpha,
                          max_seconds=args.train_seconds, save_every=0, seed=args.seed, train_norms=args.train_norms,
                          block_lr=args.block_lr, local_steps=args.local_steps, replace_frac=args.replace_frac)
        if args.heal_lr < 0:
            raise InputError(f"--heal-lr must be >= 0, got {args.heal_lr}")
        for red in args.reductions:  # a bad --reductions/--rank fails now, not after minutes of data generation
            check_plan(original, reduction=red, pattern=args.pattern, module_set=args.modules, rank=args.rank,
                       criterion=args.criterion)
        t = time.perf_counter()
        train_texts, held_texts = split_docs(load_docs(args.data))
        chat = self_chat_texts(original, tok, args.self_chat, seed=args.seed, docs=train_texts, progress=not args.quiet,
                               cache=Path(args.cache_dir) / "self_chat.json" if args.cache_dir else None)
        free = self_text_texts(original, tok, args.self_text, seed=args.seed, progress=not args.quiet,
                               cache=Path(args.cache_dir) / "self_text.json" if args.cache_dir else None)
        # held-out free texts: another seed, so other start tokens and other draws than any training text
        free_held = self_text_texts(original, tok, args.heldout_self_text, seed=args.seed + HELDOUT_SEED_OFFSET,
                                    progress=not args.quiet,
                                    cache=Path(args.cache_dir) / "self_text_heldout.json" if args.cache_dir else None)
        train_texts = train_texts + chat + free
        train_w = windows(tok, train_texts, args.seq_len, cfg.steps * cfg.batch_size, seed=args.seed)
        held_w = windows(tok, held_texts, args.seq_len, args.eval_windows, seed=args.seed)
        held_free_w = windows(tok, free_held, args.seq_len, args.eval_windows, seed=args.seed) if free_held else None
        calib_w = train_w[: args.calib_windows]
        data_s = time.perf_counter() - t

        items = tasks.make_items(seed=args.seed, per_task=args.per_task)
        ok = tasks.score(original, tok, items)
        kept_items = [it for it, good in zip(items, ok) if good]
        original_choice = tasks.score_choices(original, tok, items) if items else None
        base = evaluate(original, held_w)
        orig_params = unique_param_count(original)
        log.info("original: %d params, ppl %.3f, %d/%d task items right", orig_params, base["ppl"], len(kept_items), len(items))

        results, details = [], []
        for red in args.reductions:
            t = time.perf_counter()
            plan = make_plan(original, reduction=red, pattern=args.pattern, module_set=args.modules, rank=args.rank,
                             criterion=args.criterion, calib=calib_w, progress=not args.quiet)
            plan_s = time.perf_counter() - t
            calib_tokens = calib_w.numel() if args.criterion == "kl" else 0

            t = time.perf_counter()
            svd = svd_init_model(original, plan)
            results.append(row("svd-init", red, svd, held_w, original, tok, kept_items, items=items,
                               original_choice=original_choice, held_free=held_free_w, extra={"tokens": 0, "calib_tokens": calib_tokens, "seconds": plan_s + time.perf_counter() - t}))
            del svd

            t = time.perf_counter()
            student = apply_plan(copy.deepcopy(original), plan, keep_original=True, delta_dtype=torch.float32)
            local, kl_local = None, None
            if cfg.local_steps:  # stage 0 run here so that the KL after it can be recorded
                local = local_fit(student, plan, train_w, cfg, progress=not args.quiet)
                local_s = time.perf_counter() - t
                kl_local = evaluate(student, held_w, teacher=original)["kl"]
                t = time.perf_counter() - local_s  # evaluation time not counted
            stage = cfg.model_copy(update={"local_steps": 0, "max_seconds": cfg.max_seconds - (time.perf_counter() - t)})
            summary = train_deltas(student, plan, train_w, stage, progress=not args.quiet, teacher=original)
            finalize(student)
            train_s = time.perf_counter() - t
            # the saved form must be the evaluated form: save, load back, compare logits
            save_dir = tmp_root / f"shared-{red}"
            save_shared(student, plan, save_dir, source_dir=model_dir)
            loaded, _ = load_shared(save_dir, device=dev)
            probe = held_w[:2].to(dev)
            with torch.no_grad():
                roundtrip = float((loaded(input_ids=probe).logits.float() - student(input_ids=probe).logits.float()).abs().max())
            disk_bytes = sum(f.stat().st_size for f in save_dir.iterdir())
            del loaded
            results.append(row("deltallm", red, student, held_w, original, tok, kept_items, items=items,
                               original_choice=original_choice, held_free=held_free_w, extra={
                "tokens": summary["tokens"], "calib_tokens": calib_tokens, "seconds": plan_s + train_s,
                "train_steps": summary["steps"], "disk_bytes": disk_bytes, "roundtrip_max_abs_logit_diff": roundtrip,
            }))
            target_params = results[-1]["params"]
            del student

            t = time.perf_counter()
            dropped, info = layer_drop_model(original, calib_w, target_params)
            results.append(row("layerdrop", red, dropped, held_w, original, tok, kept_items, items=items,
                               original_choice=original_choice, held_free=held_free_w, extra={"tokens": 0, "calib_tokens": calib_w.numel(), "seconds": time.perf_counter() - t,
                                "dropped_blocks": info["dropped"]}))
            if args.heal_lr > 0:
                results.append(healed_row(args, cfg, red, dropped, original, train_w, tok, held_w, held_free_w,
                                          kept_items, items, original_choice, info["dropped"], calib_w.numel()))
            del dropped
            # whole blocks overshoot the size: also the same baseline one block short (slightly larger than deltallm)
            fewer = drop_layers(copy.deepcopy(original), sorted(info["drop_order"][:-1]))
            one_fewer = row("layerdrop", red, fewer, held_w, original, tok, kept_items, items=items,
                            original_choice=original_choice, held_free=held_free_w, extra={"dropped_blocks": sorted(info["drop_order"][:-1])})
            if args.heal_lr > 0 and args.heal_one_fewer:
                one_fewer_healed = healed_row(args, cfg, red, fewer, original, train_w, tok, held_w, held_free_w,
                                              kept_items, items, original_choice, sorted(info["drop_order"][:-1]),
                                              calib_w.numel())
            del fewer
            details.append({
                "layerdrop_one_fewer": one_fewer,
                **({"layerdrop_healed_one_fewer": one_fewer_healed} if args.heal_lr > 0 and args.heal_one_fewer else {}),
                "reduction": red,
                "plan": {"blocks": [b.model_dump() for b in plan.blocks], "params": plan.params.model_dump(),
                         "criterion": plan.criterion, "pattern": plan.pattern, "modules": plan.modules,
                         "candidates": [c.model_dump() for c in plan.candidates]},
                "block_influence": info["block_influence"],
                "training": {k: summary[k] for k in ("steps", "total_steps", "tokens", "seconds", "finished", "last")},
                "local_fit": local, "kl_after_local_fit": kl_local,
                "training_curve": summary["history"],
            })
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    res = {
        "command": " ".join(["python", *sys.argv]),
        "device": device_name(dev),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": "pico random Llama (smoke)" if args.smoke and not args.model else str(args.model or "SmolLM2-135M-Instruct (embedded GGUF, dequantized)"),
        "smoke": bool(args.smoke),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "plot", "table", "quiet", "combine")},
        "data": {"source": args.data or "python-stdlib-docs", "self_chat_samples": len(chat), "self_text_samples": len(free), "train_windows": len(train_w), "heldout_windows": len(held_w),
                 "heldout_self_text_samples": len(free_held), "heldout_self_text_windows": 0 if held_free_w is None else len(held_free_w),
                 "seq_len": args.seq_len},
        "original": {"params": orig_params, "ppl": base["ppl"], "task_items": len(items), "task_items_kept": len(kept_items),
                     "task_accuracy_all_items": sum(ok) / len(ok),
                     "choice_accuracy": sum(original_choice) / len(original_choice) if original_choice else None,
                     "choice_items_right": sum(original_choice) if original_choice else 0,
                     "task_items_sha256": hashlib.sha256("\n".join(it["prompt"] for it in items).encode()).hexdigest()[:12]},
        "definitions": {
            "params": "unique parameters in memory (tied embeddings and shared anchors once), embeddings included",
            "reduction": "target fraction of parameters removed; the achieved one is 1 - params / original.params",
            "ppl": "perplexity on held-out windows (Python docs never trained on)",
            "kl": "mean token KL(original || model) on the same windows, nats",
            "kl_self_text": "mean token KL(original || model) on held-out texts the original wrote from other seeds "
                            "than the training self-text (data.heldout_self_text_windows windows), nats",
            "task_accuracy": "share of the seeded prompt/answer items the original answers correctly that this model also answers correctly",
            "kept": "task_accuracy relative to the original (which scores 1.0 on these items by construction)",
            "kept_by_task": "per task family: [items this model answers right, items the original answers right]",
            "choice_accuracy": "share of all task items whose right answer this model ranks first among the item's choices by "
                               "log-likelihood (the DeltaLLM paper's lm-eval-harness scoring)",
            "choice_kept": "choice_accuracy relative to the original's (the paper's 'retains X% of the performance')",
            "kept_interval": "95% Wilson interval of kept over the original's task_items_kept items",
            "choice_kept_interval": "95% Wilson interval of choice_accuracy over task_items, divided by the original's (unpaired)",
            "choice_kept_paired": "share of the items the original ranks right by likelihood (original.choice_items_right) "
                                  "that this model ranks right too",
            "choice_kept_paired_interval": "95% Wilson interval of choice_kept_paired",
            "tokens": "distillation tokens (calibration tokens for the criterion / Block Influence: calib_tokens)",
            "seconds": "compression wall time (plan, init, stage 0 and distillation; evaluation excluded)",
        },
        "results": results,
        "details": details,
        "seconds": {"load": load_s, "data": data_s, "total": time.perf_counter() - t_all},
    }
    for r in res["results"]:
        r.update({f"{k}_interval": v for k, v in tasks.result_intervals(res["original"], r).items()})
    return res


# settings that may differ between the parts of one combined results file
_PART_SETTINGS = ("reductions", "cache_dir")


def combine(paths: list[Path], command: str) -> dict:
    """One results file from runs of the same bench over different --reductions (a per-call time limit can make one
    run of every reduction impossible). The parts must agree on model, device, original, data sizes and every
    setting except the reductions; `command` names every part's command, then the combining one."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    if len(parts) < 2:
        raise InputError("--combine needs at least two results files")
    first = parts[0]
    for path, part in zip(paths[1:], parts[1:]):
        for key in ("model", "device", "smoke", "original", "data"):
            if part.get(key) != first.get(key):
                raise InputError(f"{path}: {key} differs from {paths[0]}: {part.get(key)!r} vs {first.get(key)!r}")
        a = {k: v for k, v in part["settings"].items() if k not in _PART_SETTINGS}
        b = {k: v for k, v in first["settings"].items() if k not in _PART_SETTINGS}
        if a != b:
            diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            raise InputError(f"{path}: settings {diff} differ from {paths[0]}")
    reds = [r for part in parts for r in part["settings"]["reductions"]]
    if len(set(reds)) != len(reds):
        raise InputError(f"the parts repeat a reduction: {reds}")
    order = {r: i for i, r in enumerate(sorted(reds))}
    return {
        **{k: first[k] for k in ("device", "model", "smoke", "data", "original", "definitions")},
        "command": " && ".join([p["command"] for p in parts] + [command]),
        "date": max(p["date"] for p in parts),
        "settings": {**first["settings"], "reductions": sorted(reds),
                     "cache_dir": [p["settings"].get("cache_dir") for p in parts]},
        "parts": [{"command": p["command"], "date": p["date"], "reductions": p["settings"]["reductions"],
                   "seconds": p["seconds"]} for p in parts],
        "results": sorted((r for p in parts for r in p["results"]), key=lambda r: order[r["reduction"]]),
        "details": sorted((d for p in parts for d in p["details"]), key=lambda d: order[d["reduction"]]),
        "seconds": {k: sum(p["seconds"][k] for p in parts) for k in ("load", "data", "total")},
    }


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in ("deltallm", "svd-init", "layerdrop", "layerdrop-healed") if any(r["method"] == m for r in res["results"])]
    colors = {"deltallm": "tab:blue", "svd-init": "tab:gray", "layerdrop": "tab:red", "layerdrop-healed": "tab:orange"}
    reds = sorted({r["reduction"] for r in res["results"]})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ("kl", "ppl", "kept"), ("KL to original (held-out)", "perplexity (held-out)", "task answers kept")):
        width = 0.8 / len(methods)
        for j, m in enumerate(methods):
            vals = [next((r[key] for r in res["results"] if r["method"] == m and r["reduction"] == x), None) for x in reds]
            xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(reds))]
            ax.bar(xs, [v if v is not None else 0 for v in vals], width, label=m, color=colors[m])
        if key == "ppl":
            ax.axhline(res["original"]["ppl"], color="k", ls="--", lw=1, label="original")
        if key == "kl":
            ax.set_yscale("log")
        if key == "kept":
            ax.set_ylim(0, 1.05)
        ax.set_xticks(range(len(reds)), [f"-{100 * x:g}% params" for x in reds])
        ax.set_title(label, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"DeltaLLM sharing vs layer drop vs SVD init — {res['model']} — {res['device']}", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)




def table(res: dict) -> str:
    lines = [
        f"Original: {res['original']['params']:,} parameters, held-out perplexity {res['original']['ppl']:.3f}, "
        f"{res['original']['task_items_kept']}/{res['original']['task_items']} task items answered right (kept set). "
        "Kept figures: value (95% interval).",
        "",
    ]
    free = any(r.get("kl_self_text") is not None for r in res["results"])  # files before the field: no column
    lines += [
        "| method | reduction | params | ppl | KL |" + (" KL, free text |" if free else "")
        + " task answers kept | kept, paper's scoring | training tokens | seconds |",
        "|---|---|---|---|---|" + ("---|" if free else "") + "---|---|---|---|",
    ]
    for r in res["results"]:
        ci = tasks.result_intervals(res["original"], r)
        kl_free = (f" {r['kl_self_text']:.4g} |" if r.get("kl_self_text") is not None else " n/a |") if free else ""
        lines.append(f"| {r['method']} | {100 * (1 - r['params'] / res['original']['params']):.2f}% (target {100 * r['reduction']:g}%) | "
                     f"{r['params']:,} | {r['ppl']:.3f} | {r['kl']:.4g} |{kl_free} {tasks.percent(r['kept'], ci['kept'])} | "
                     f"{tasks.percent(r.get('choice_kept'), ci['choice_kept'])} | {r['tokens']:,} | {r['seconds']:.0f} |")
    lines += targets_lines(res)
    lines.append("")
    lines.append(f"Device: {res['device']}; {res['date']}; command: `{res['command']}`")
    return "\n".join(lines)


def targets_lines(res: dict) -> list[str]:
    """Issue 7's targets against the results: at -12% keep >= 95% of the task answers, and beat layer dropping at
    equal size (layer dropping cannot hit a size exactly, so DeltaLLM must beat it at the sizes on both sides)."""
    orig = res["original"]["params"]
    out = []
    for red in sorted({r["reduction"] for r in res["results"]}):
        dl = next((r for r in res["results"] if r["method"] == "deltallm" and r["reduction"] == red), None)
        if dl is None or dl["kept"] is None:
            continue
        drops = [r for r in res["results"] if r["method"] == "layerdrop" and r["reduction"] == red]
        drops += [{**d["layerdrop_one_fewer"]} for d in res.get("details", [])
                  if d.get("reduction") == red and d.get("layerdrop_one_fewer")]
        beats = [f"{100 * d['kept']:.1f}% at {100 * (1 - d['params'] / orig):.1f}%" for d in drops if d.get("kept") is not None]
        won = all(dl["kept"] > d["kept"] for d in drops if d.get("kept") is not None) if drops else None
        goal = " (target ≥ 95%: " + ("met" if dl["kept"] >= 0.95 else f"missed by {100 * (0.95 - dl['kept']):.1f} points") + ")" \
            if abs(red - 0.12) < 1e-9 else ""
        line = (f"- −{100 * red:g}%: DeltaLLM keeps {100 * dl['kept']:.1f}% of the answers{goal}; layer dropping "
                f"keeps {', '.join(beats) or 'n/a'} of the parameters removed: "
                f"{'beaten' if won else 'not beaten' if won is not None else 'no comparison'}.")
        if dl.get("choice_kept") is not None:
            paper = [f"{100 * d['choice_kept']:.1f}%" for d in drops if d.get("choice_kept") is not None]
            line += (f" Scored as the paper scores (choice by likelihood, accuracy relative to the original's): "
                     f"{100 * dl['choice_kept']:.1f}%" + (f" (≥ 95%: {'met' if dl['choice_kept'] >= 0.95 else 'missed'})"
                                                          if goal else "")
                     + f", layer dropping {', '.join(paper) or 'n/a'}.")
            if dl.get("choice_kept_paired") is not None:
                ci = tasks.result_intervals(res["original"], dl)["choice_kept_paired"]
                line += (f" Paired (of the {res['original'].get('choice_items_right')} items the original ranks right, "
                         f"the share this model ranks right too): {tasks.percent(dl['choice_kept_paired'], ci)}.")
        healed = next((r for r in res["results"] if r["method"] == "layerdrop-healed" and r["reduction"] == red), None)
        if healed is not None and healed.get("kept") is not None:
            better = [name for name, key, lower in (("answers kept", "kept", False), ("paper's scoring", "choice_kept", False),
                                                     ("KL", "kl", True))
                      if dl.get(key) is not None and healed.get(key) is not None
                      and (dl[key] < healed[key] if lower else dl[key] > healed[key])]
            line += (f" Layer dropping healed by the same distillation ({100 * (1 - healed['params'] / orig):.1f}% removed, "
                     f"lr {healed.get('heal_lr', 'n/a')}): {100 * healed['kept']:.1f}% kept"
                     + (f", {100 * healed['choice_kept']:.1f}% paper-style" if healed.get("choice_kept") is not None else "")
                     + f", KL {healed['kl']:.3f}; DeltaLLM is better on "
                     + (", ".join(better) if better else "none of these") + ".")
        out.append(line)
    return ["", "**Targets** (issue 7):", ""] + out if out else []


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF checkpoint directory (default: the embedded SmolLM2; --smoke: pico)")
    ap.add_argument("--reductions", type=lambda s: [float(x) for x in s.split(",")], default=[0.12, 0.24])
    ap.add_argument("--tokens", type=int, default=None, help="training-token budget per reduction (default 8M; smoke 16k)")
    ap.add_argument("--train-seconds", type=float, default=None,
                    help="wall-time bound per training run, stage-0 local fit included (default 180; smoke 30)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--alpha", type=float, default=1.0, help="loss = (1-alpha)*LM + alpha*KL")
    ap.add_argument("--train-norms", action="store_true", help="also train the norms of dependent blocks")
    ap.add_argument("--block-lr", type=float, default=0.0, help="also train every other block weight at this learning rate "
                    "(beyond the paper; 0: deltas only)")
    ap.add_argument("--heal-lr", type=float, default=3e-4, help="learning rate of the layerdrop-healed baseline "
                    "(its blocks distilled like deltallm's deltas; 0: not run)")
    ap.add_argument("--heal-one-fewer", action="store_true", help="also heal the layer drop one block short "
                    "(slightly larger than deltallm; another training run per reduction)")
    ap.add_argument("--replace-frac", type=float, default=0.3, help="share of steps of progressive module replacement")
    ap.add_argument("--local-steps", type=int, default=200, help="stage-0 block-wise fit steps per dependent (0: off)")
    ap.add_argument("--modules", default="mlp", choices=["mlp", "attn", "all"])
    ap.add_argument("--pattern", default="sequential", choices=["sequential", "alternating"])
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--criterion", default="kl", choices=["kl", "residual"])
    ap.add_argument("--data", default=None, help="training/held-out text file (default: Python's own docs)")
    ap.add_argument("--self-chat", type=int, default=None, help="samples the original generates for training (default 2048; smoke 8; 0: off)")
    ap.add_argument("--self-text", type=int, default=None, help="texts the original writes freely from a random start "
                    "token (256 tokens each), added to the training mix (default 8192; smoke 8; 0: off)")
    ap.add_argument("--heldout-self-text", type=int, default=None, help="free texts from another seed for kl_self_text "
                    "(default 256; smoke 4; 0: off)")
    ap.add_argument("--cache-dir", default=None, help="keep the self-chat and self-text samples here and reuse them in later runs "
                    "with the same settings (saves minutes of GPU time per run)")
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--per-task", type=int, default=64, help="items per generated task family (add, larger; the "
                    "families with a fixed list hold at most that list)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (smoke on a busy machine: 1)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code path")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/share.json; smoke: share_smoke.json)")
    ap.add_argument("--plot", default=None, help="plot PNG (default: the JSON path with .png)")
    ap.add_argument("--table", nargs="?", const=str(RESULTS / "share.json"), default=None,
                    help="print the markdown table of a results file (of bench/results/share.json: also write "
                         "bench/results/share.md, the README's block; then run bench/update_readme.py)")
    ap.add_argument("--combine", nargs="+", default=None, metavar="PART",
                    help="write one results file (--out) from results files of runs over different --reductions")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.combine:
        if not args.out:
            ap.error("--combine needs --out")
        try:
            res = combine([Path(p) for p in args.combine], " ".join(["python", *(sys.argv if argv is None else ["bench/share/run.py", *argv])]))
        except (DeltapackError, OSError, KeyError, json.JSONDecodeError) as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        out = Path(args.out)
        write_json_atomic(out, res)
        plot(res, Path(args.plot) if args.plot else out.with_suffix(".png"))
        print(table(res))
        return
    if args.table:
        text = table(json.loads(Path(args.table).read_text()))
        print(text)
        if Path(args.table).resolve() == (RESULTS / "share.json").resolve():
            write_bytes_atomic(RESULTS / "share.md", (text + "\n").encode())
        return
    smoke = args.smoke
    defaults = {"tokens": 16_384 if smoke else 8_000_000, "train_seconds": 30.0 if smoke else 180.0,
                "batch_size": 8 if smoke else 32, "seq_len": 64 if smoke else 256, "lr": 5e-3 if smoke and not args.model else 5e-4,
                "eval_windows": 8 if smoke else 64, "self_chat": 8 if smoke else 2048,
                "self_text": 8 if smoke else 8192, "heldout_self_text": 4 if smoke else 256}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if smoke and args.model is None and args.data is None:
        args.per_task = min(args.per_task, 2)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out or RESULTS / ("share_smoke.json" if smoke else "share.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        res = run(args)
    except DeltapackError as e:  # bad arguments: a one-line reason and exit 2, as `deltapack share` does
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    write_json_atomic(out, res)
    plot(res, Path(args.plot) if args.plot else out.with_suffix(".png"))
    print(table(res))
    print(f"wrote {out} and {Path(args.plot) if args.plot else out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
