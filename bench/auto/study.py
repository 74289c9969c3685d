"""Which per-tensor error measure predicts what a compressed delta costs end to end? (design study for `auto`)

For one task: a full fine-tune of SmolLM2-135M-Instruct (bench/quality's recipe and tasks), then at each ratio every
candidate method compresses it (default calibration unless the label says task), the decoded per-tensor deltas are
kept in memory, and:
  - each method alone is scored (exact match, KL to the fine-tune, teacher-forced on the reference answers);
  - every tensor's error E = Δ − Δ̂ of every method is measured by four proxies: ‖E‖², the output error tr(E H Eᵀ)
    (H: input second moment on the default calibration text), and the K-FAC loss increase ½tr(G E H Eᵀ)
    (deltapack.calib.fisher) with statistics from three calibration sources: `docs` (the default text), `self` (the
    fine-tune's own sampled replies to generic prompts: data-free), `task` (the task's training split: what a user
    with data has; this study's tasks are tuning tasks, never the benchmark's held-out families);
  - "auto" mixes pick per tensor the method with the smallest proxy, and are scored like the single methods.
The per-method sum of predicted loss increases is stored beside its measured KL. One JSON, rewritten after every
measurement (a killed command keeps what it finished).

    python bench/auto/study.py --task arithmetic --workdir /root/dpa --out $OUT/study-arithmetic.json
    python bench/auto/study.py --smoke --out /tmp/study-smoke.json      # CPU, pico model, minutes
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "quality"))

from common import command_line, device_name, embedded_base_dir, items_to_hex, now_iso, smoke_base_dir, write_json  # noqa: E402

log = logging.getLogger("bench.auto")

METHOD_LABELS = {  # label -> (method, params, calibration)
    "dare": ("dare", {}, "default"),
    "delta-come": ("delta-come", {}, "default"),
    "delta-come-task": ("delta-come", {}, "task"),
    "deltadq": ("deltadq", {}, "default"),
    "lowrank": ("lowrank", {}, "default"),
    "auto": ("auto", {}, "default"),
    "auto-docs": ("auto", {"calib_source": "text"}, "default"),
}
AUTO_POOL = ("dare", "delta-come", "deltadq", "lowrank")
PROXIES = ("frob", "out_docs", "kfac_docs", "kfac_self", "kfac_task")


def chat_texts(tok, pairs: list[tuple[str, str]]) -> list[str]:
    return [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": a}], tokenize=False)
            for p, a in pairs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dp-auto-study"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--base", default=None)
    ap.add_argument("--ratios", default="16,64")
    ap.add_argument("--methods", default=",".join(METHOD_LABELS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-n", type=int, default=512)
    ap.add_argument("--kl-n", type=int, default=256)
    ap.add_argument("--calib-seqs", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--time-budget", type=float, default=560)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "transformers", "deltapack.compress", "deltapack.methods"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t_start = time.perf_counter()

    from deltapack import api
    from deltapack.calib.data import default_calibration_texts, self_calibration_texts, token_batches
    from deltapack.calib.fisher import collect_kfac, tensor_loss_increase
    from deltapack.compress import resolve_device
    from deltapack.errors import BudgetError
    from deltapack.eval import Example, exact_match, kl_to_reference, load_checkpoint
    from deltapack.eval.tasks import write_jsonl
    from deltapack.format.directory import DeltaDir
    from finetune import Trainer
    from tasks import make_splits

    device = resolve_device("auto")
    if args.smoke:
        args.steps, args.eval_n, args.kl_n, args.calib_seqs, args.calib_len = 4, 8, 8, 4, 64
        args.ratios = "16"
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    base_dir = Path(args.base) if args.base else (smoke_base_dir(workdir) if args.smoke else embedded_base_dir())
    res: dict = {"command": command_line(), "device": device_name(device), "date": now_iso(), "task": args.task,
                 "settings": {k: str(v) for k, v in vars(args).items()}, "finetune": {}, "methods": [], "mixes": [],
                 "tensors": {}, "notes": []}

    def save():
        res["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        write_json(args.out, res)

    splits = make_splits(args.task, 8000 if not args.smoke else 64, 16, max(args.eval_n, args.kl_n))
    test = [Example(r.prompt, r.answer) for r in splits["test"]]
    ft_dir = workdir / f"ft-{args.task}"
    if not (ft_dir / "config.json").is_file():
        tr = Trainer(base_dir, device=device, lr=2e-4)
        rec = tr.train(tr.encode(splits["train"]), args.steps, batch_size=64 if not args.smoke else 4,
                       log_every=max(1, args.steps // 4))
        tr.save(ft_dir)
        res["finetune"]["train"] = rec
        del tr
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ref = load_checkpoint(ft_dir, device=device, dtype=dtype)
    tok = ref.tokenizer
    bs = 256 if device.type == "cuda" else 8
    em_ft = exact_match(ref.model, tok, test[: args.eval_n], batch_size=bs)
    base = load_checkpoint(base_dir, device=device, dtype=dtype)
    em_base = exact_match(base.model, tok, test[: args.eval_n], batch_size=bs)
    res["finetune"].update({"accuracy": em_ft.accuracy, "base_accuracy": em_base.accuracy,
                            "correct_items": items_to_hex(em_ft.per_item)})
    log.info("fine-tune %.3f, base %.3f", em_ft.accuracy, em_base.accuracy)
    save()

    # ---- calibration statistics from three sources, on the fine-tune in fp32 -------------------------------------
    ft32 = load_checkpoint(ft_dir, device=device, dtype=torch.float32).model
    sources = {
        "docs": token_batches(tok, default_calibration_texts(), args.calib_len, args.calib_seqs),
        "self": token_batches(tok, self_calibration_texts(ft32, tok, n_tokens=args.calib_len * args.calib_seqs,
                                                          max_new_tokens=160 if not args.smoke else 16),
                              args.calib_len, args.calib_seqs),
        "task": token_batches(tok, chat_texts(tok, [(r.prompt, r.answer) for r in splits["train"][:4000]]),
                              args.calib_len, args.calib_seqs),
    }
    res["calibration"] = {k: list(v.shape) for k, v in sources.items()}
    kfac = {}
    for k, ids in sources.items():
        t0 = time.perf_counter()
        kfac[k] = {n: s for n, s in collect_kfac(ft32, ids, batch_seqs=8 if device.type == "cuda" else 2).items()}
        res["calibration"][k + "_seconds"] = round(time.perf_counter() - t0, 2)
    del ft32
    gc.collect()

    # clones: on a float32 model .to() would alias the parameters that set_weights overwrites
    base_sd = {k: v.to(device, torch.float32, copy=True) for k, v in base.model.state_dict().items()}
    ft_sd = {k: v.to(device, torch.float32, copy=True) for k, v in ref.model.state_dict().items()}
    model = base.model  # reused: weights overwritten in place for every configuration

    def set_weights(deltas: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n, p in params.items():
                w = base_sd[n] + deltas[n].to(device) if n in deltas else base_sd[n]
                p.copy_(w.to(p.dtype))

    def score(label: str, deltas: dict[str, torch.Tensor]) -> dict:
        set_weights(deltas)
        t0 = time.perf_counter()
        em = exact_match(model, tok, test[: args.eval_n], batch_size=bs)
        kl = kl_to_reference(model, ref.model, tok, test[: args.kl_n], batch_size=64 if device.type == "cuda" else 4)
        return {"label": label, "accuracy": em.accuracy, "kept": em.accuracy / em_ft.accuracy if em_ft.accuracy else None,
                "kl": kl.kl, "eval_seconds": round(time.perf_counter() - t0, 2), "correct_items": items_to_hex(em.per_item)}

    def proxies(name: str, E: torch.Tensor) -> dict:
        out = {"frob": float((E * E).sum())}
        H = kfac["docs"].get(name)
        if H is not None and H.H is not None:
            out["out_docs"] = float(((E @ H.H) * E).sum()) / max(1, H.n_tokens)
        else:
            out["out_docs"] = out["frob"]  # embeddings: no input second moment (one-hot input)
        for src in ("docs", "self", "task"):
            out[f"kfac_{src}"] = tensor_loss_increase(kfac[src], name, E)
        return out

    # parameters, not state-dict keys: a tied lm_head is the embedding's alias and is stored once
    names = [n for n, _ in model.named_parameters() if not torch.equal(ft_sd[n], base_sd[n])]
    true_delta = {n: ft_sd[n] - base_sd[n] for n in names}
    res["tensors"]["names"] = names
    res["tensors"]["dense_bytes"] = {n: 2 * true_delta[n].numel() for n in names}
    labels = [m for m in args.methods.split(",") if m]
    for ratio in [float(r) for r in args.ratios.split(",")]:
        decoded: dict[str, dict[str, torch.Tensor]] = {}
        per_tensor: dict[str, dict[str, dict]] = {}
        for label in labels:
            if time.perf_counter() - t_start > args.time_budget:
                res["notes"].append(f"time budget: stopped before {label} at {ratio}x")
                save()
                return 0
            method, params, calib_kind = METHOD_LABELS[label]
            calib = None
            if calib_kind == "task":
                calib = str(write_jsonl(workdir / f"calib-{args.task}.jsonl", [r.as_dict() for r in splits["train"][:4000]]))
            out = workdir / f"d-{label}-{ratio:g}"
            t0 = time.perf_counter()
            try:
                api.compress(base_dir, ft_dir, out, method=method, ratio=ratio, params=params, calib=calib,
                             device=str(device), overwrite=True, progress=False)
            except BudgetError as e:
                res["notes"].append(f"{label} {ratio:g}x: {e}")
                continue
            secs = time.perf_counter() - t0
            d = DeltaDir.open(out)
            dec = {n: d.decode(n, device).float().reshape(true_delta[n].shape) for n in names if n in d.manifest.tensors}
            entry_bytes = {n: d.manifest.tensors[n].payload_bytes + d.manifest.tensors[n].side_bytes for n in dec}
            decoded[label] = dec
            rec = score(label, dec)
            rec.update({"ratio": ratio, "true_ratio": d.true_ratio(), "compress_seconds": round(secs, 2),
                        "calibration": calib_kind})
            pt = per_tensor[label] = {}
            for n in names:
                E = true_delta[n] - dec[n] if n in dec else true_delta[n]
                pt[n] = dict(proxies(n, E), bytes=entry_bytes.get(n, 0))
            rec["predicted"] = {p: sum(v[p] for v in pt.values()) for p in PROXIES if p.startswith("kfac")}
            rec["predicted_by_kind"] = {}
            for n, v in pt.items():
                kind = "embedding" if "embed" in n else n.split(".")[-2] if "layers" in n else "other"
                rec["predicted_by_kind"][kind] = rec["predicted_by_kind"].get(kind, 0.0) + v["kfac_docs"]
            res["methods"].append(rec)
            res["tensors"][f"{label}@{ratio:g}"] = pt
            log.info("%s %gx: kept %.3f KL %.4f (pred docs %.4f self %.4f task %.4f)", label, ratio, rec["kept"] or 0,
                     rec["kl"], rec["predicted"]["kfac_docs"], rec["predicted"]["kfac_self"], rec["predicted"]["kfac_task"])
            save()
        pool = [m for m in AUTO_POOL if m in decoded]
        if len(pool) < 2:
            continue
        for proxy in PROXIES:
            if time.perf_counter() - t_start > args.time_budget:
                res["notes"].append(f"time budget: stopped before mix {proxy} at {ratio}x")
                save()
                return 0
            choice = {n: min(pool, key=lambda m: per_tensor[m][n][proxy]) for n in names}
            mix = {n: decoded[choice[n]][n] for n in names if n in decoded[choice[n]]}
            rec = score(f"auto[{proxy}]", mix)
            counts: dict[str, int] = {}
            for m in choice.values():
                counts[m] = counts.get(m, 0) + 1
            rec.update({"ratio": ratio, "proxy": proxy, "pool": pool, "choices": counts,
                        "bytes": sum(per_tensor[choice[n]][n]["bytes"] for n in names),
                        "choice_by_tensor": choice})
            res["mixes"].append(rec)
            log.info("auto[%s] %gx: kept %.3f KL %.4f  %s", proxy, ratio, rec["kept"] or 0, rec["kl"], counts)
            save()
        del decoded
        gc.collect()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
