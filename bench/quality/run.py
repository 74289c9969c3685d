"""The real-model quality benchmark, end to end in one process (the GPU machine forgets everything between calls).

For each selected task: full fine-tune of SmolLM2-135M-Instruct (bench/quality/finetune.py), then for every method x
target ratio: `deltapack.api.compress` (timed), rebuild in memory (`deltapack.api.load_merged`), exact-match accuracy
on the task's test split and KL(fine-tune || rebuilt) per answer token on held-out prompts. Records go to a JSON part
file after every single run, so a run killed at the 10-minute limit still leaves everything it finished; --time-budget
stops earlier, cleanly, and notes what it skipped. `report.py` merges parts into bench/results/quality.{json,png,md}.

    # GPU, one task per invocation (see run_gpu.sh):
    python bench/quality/run.py --tasks arithmetic --out bench/results/parts/quality-arithmetic.json --time-budget 540
    # CPU smoke: pico model with SmolLM2's tokenizer, 1 task, 2 methods, 1 ratio, a few steps
    python bench/quality/run.py --smoke --out /tmp/quality-smoke.json

Methods (labels for --methods): raw, lowrank, bitdelta, bitdelta-distill, dare, delta-come-paper, delta-come-optimal,
deltadq ("delta-come" = both allocators, "all" = every one). A method whose module is not installed is skipped with a
note; a ratio a method cannot reach (BudgetError) is recorded as a note, not a failure; any other error is noted with
its message and the run goes on.
"""

from __future__ import annotations

import argparse
import gc
import logging
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (RESULTS, command_line, device_name, embedded_base_dir, items_to_hex, now_iso, smoke_base_dir,  # noqa: E402
                    write_json)

log = logging.getLogger("bench.quality")


@dataclass(frozen=True)
class MethodSpec:
    label: str
    method: str
    params: dict = field(default_factory=dict)
    allocator: str | None = None


METHOD_SPECS = [
    MethodSpec("raw", "raw"),
    MethodSpec("lowrank", "lowrank"),
    MethodSpec("bitdelta", "bitdelta", {"distill": False}),
    MethodSpec("bitdelta-distill", "bitdelta", {"distill": True}),
    MethodSpec("dare", "dare"),
    MethodSpec("delta-come-paper", "delta-come", {"allocator": "paper"}, "paper"),
    MethodSpec("delta-come-optimal", "delta-come", {"allocator": "optimal"}, "optimal"),
    MethodSpec("deltadq", "deltadq"),
]
ALIASES = {"delta-come": ["delta-come-paper", "delta-come-optimal"], "all": [s.label for s in METHOD_SPECS]}
DEFAULT_RATIOS = (16, 64, 8, 32, 128)  # run in this order: a cut-short run keeps the most telling ratios


def select_methods(text: str) -> list[MethodSpec]:
    by_label = {s.label: s for s in METHOD_SPECS}
    labels: list[str] = []
    for tok in (t.strip() for t in text.split(",") if t.strip()):
        for lab in ALIASES.get(tok, [tok]):
            if lab not in by_label:
                raise SystemExit(f"unknown method label {lab!r}; choose from {', '.join(by_label)} or {', '.join(ALIASES)}")
            if lab not in labels:
                labels.append(lab)
    return [by_label[lab] for lab in labels]


class Budget:
    """Wall-clock budget: predicts whether the next piece of work fits from what similar pieces took so far."""

    def __init__(self, seconds: float):
        self.start = time.perf_counter()
        self.seconds = seconds
        self.took: dict[str, list[float]] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def record(self, key: str, seconds: float) -> None:
        self.took.setdefault(key, []).append(seconds)

    def estimate(self, key: str, default: float) -> float:
        if key in self.took:
            return max(self.took[key])
        every = [x for v in self.took.values() for x in v]
        return max([default, *every]) if every else default

    def fits(self, key: str, default: float) -> bool:
        return self.left() > self.estimate(key, default)


class Part:
    """The JSON part file, rewritten atomically after every change."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.data = {**header, "finetunes": {}, "results": [], "notes": [], "complete": False}
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)

    def note(self, **kw) -> None:
        log.warning("note: %s", kw)
        self.data["notes"].append(kw)
        self.save()

    def add(self, rec: dict) -> None:
        self.data["results"].append(rec)
        self.save()


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="deltapack real-model quality benchmark", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--tasks", default="arithmetic,python,json", help="comma-separated: arithmetic, python, json")
    ap.add_argument("--methods", default="all", help="comma-separated method labels (see module docstring)")
    ap.add_argument("--ratios", default=",".join(map(str, DEFAULT_RATIOS)), help="target true ratios, in run order")
    ap.add_argument("--out", type=Path, default=RESULTS / "parts" / "quality-part.json")
    ap.add_argument("--workdir", type=Path, default=None, help="fine-tunes and deltas (default: a temp dir)")
    ap.add_argument("--base", default=None, help="base checkpoint dir (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--time-budget", type=float, default=540.0, help="seconds; stop cleanly before this")
    ap.add_argument("--eval-n", type=int, default=256, help="test examples per task for accuracy")
    ap.add_argument("--kl-n", type=int, default=64, help="test examples per task for KL")
    ap.add_argument("--batch-size", type=int, default=128, help="generation batch")
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--target-gain", type=float, default=0.5, help="fine-tune must beat base by this on dev")
    ap.add_argument("--extra-rounds", type=int, default=2, help="extra training rounds (steps/2 each) if not reached")
    ap.add_argument("--calib", choices=("task", "default"), default="task",
                    help="calibration text: the task's train split, or deltapack's default corpus")
    ap.add_argument("--n-calib", type=int, default=None,
                    help="train records written as calibration data (default: the whole train split; the committed "
                         "runs used 1024, which packs into only ~20 of the 128 sequences of 2048 tokens Delta-CoMe's "
                         "GPTQ asks for)")
    ap.add_argument("--reuse-finetunes", action="store_true", help="reuse a finished fine-tune in --workdir")
    ap.add_argument("--report", type=Path, default=None,
                    help="also merge this part alone into a final JSON (+ .png, .md), e.g. bench/results/quality.json")
    ap.add_argument("--keep-deltas", action="store_true", help="keep delta dirs (default: deleted after scoring)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, pico model with SmolLM2's tokenizer, 1 task, lowrank+dare at 16x, a few steps")
    args = ap.parse_args(argv)
    if args.smoke:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--"))
        defaults = {"--tasks": ("tasks", "arithmetic"), "--methods": ("methods", "lowrank,dare"),
                    "--ratios": ("ratios", "16"), "--device": ("device", "cpu"), "--eval-n": ("eval_n", 8),
                    "--kl-n": ("kl_n", 4), "--steps": ("steps", 6), "--lr": ("lr", 3e-3), "--train-batch": ("train_batch", 4),
                    "--n-train": ("n_train", 64), "--extra-rounds": ("extra_rounds", 1), "--n-calib": ("n_calib", 32),
                    "--batch-size": ("batch_size", 8), "--target-gain": ("target_gain", 0.5)}
        for flag, (dest, val) in defaults.items():
            if flag not in given:
                setattr(args, dest, val)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "transformers", "deltapack.compress"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    budget = Budget(args.time_budget)

    from deltapack.compress import resolve_device
    from deltapack.eval import Example, exact_match, load_checkpoint, resolve_dtype
    from deltapack.methods import METHODS
    from finetune import Trainer
    from tasks import TASKS, make_splits, write_jsonl

    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", device)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in TASKS:
            raise SystemExit(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    specs = select_methods(args.methods)
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    workdir = args.workdir or Path(__import__("tempfile").mkdtemp(prefix="dp-quality-"))
    workdir.mkdir(parents=True, exist_ok=True)

    base_dir = Path(args.base) if args.base else (smoke_base_dir(workdir) if args.smoke else embedded_base_dir())
    part = Part(args.out, {
        "command": command_line(),
        "device": device_name(device),
        "date": now_iso(),
        "base": "pico Llama (SmolLM2 tokenizer, random weights)" if args.smoke and not args.base else
                (str(args.base) if args.base else "SmolLM2-135M-Instruct (embedded GGUF Q4_1, dequantized to bf16)"),
        "smoke": bool(args.smoke),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
    })
    log.info("base %s, device %s, workdir %s", base_dir, part.data["device"], workdir)

    splits = {t: make_splits(t, args.n_train, 128 if not args.smoke else 8, args.eval_n) for t in tasks}
    test = {t: [Example(r.prompt, r.answer) for r in splits[t]["test"][: args.eval_n]] for t in tasks}
    dev = {t: [Example(r.prompt, r.answer) for r in splits[t]["dev"]] for t in tasks}

    # ---- base accuracy (test and dev), once ---------------------------------------------------------------------
    base = load_checkpoint(base_dir, device=device, dtype=dtype)
    base_acc, base_dev = {}, {}
    for t in tasks:
        base_acc[t] = exact_match(base.model, base.tokenizer, test[t], batch_size=args.batch_size).accuracy
        base_dev[t] = exact_match(base.model, base.tokenizer, dev[t], batch_size=args.batch_size).accuracy
        log.info("base %s: test %.3f dev %.3f", t, base_acc[t], base_dev[t])
    del base
    release()

    stopped = False
    for task in tasks:
        ft_dir = workdir / f"ft-{task}"
        ft_info: dict = {"base_accuracy": base_acc[task], "base_dev_accuracy": base_dev[task]}
        marker = ft_dir / "finetune.json"
        if args.reuse_finetunes and marker.is_file():
            import json

            ft_info.update(json.loads(marker.read_text()))
            ft_info["reused"] = True
            log.info("reusing fine-tune %s", ft_dir)
        else:
            est = args.steps / (5.0 if device.type == "cuda" else 0.5) + 30
            if not budget.fits("finetune", est):
                part.note(task=task, note=f"time budget: no time left to fine-tune ({budget.left():.0f} s left)")
                stopped = True
                break
            t0 = time.perf_counter()
            tr = Trainer(base_dir, device=device, lr=args.lr)
            data = tr.encode(splits[task]["train"])
            rounds = [tr.train(data, args.steps, batch_size=args.train_batch, log_every=max(1, args.steps // 6))]
            dev_acc = exact_match(tr.model, tr.tok, dev[task], batch_size=args.batch_size).accuracy
            rounds[-1]["dev_accuracy"] = dev_acc
            log.info("%s fine-tune: dev accuracy %.3f (base %.3f)", task, dev_acc, base_dev[task])
            extra = max(1, args.steps // 2)
            while (dev_acc - base_dev[task] < args.target_gain and len(rounds) <= args.extra_rounds
                   and budget.left() > extra / max(rounds[-1]["steps_per_s"], 1e-3) + 300):
                rounds.append(tr.train(data, extra, batch_size=args.train_batch, lr=args.lr * 0.5, warmup=1,
                                       log_every=max(1, extra // 3)))
                dev_acc = exact_match(tr.model, tr.tok, dev[task], batch_size=args.batch_size).accuracy
                rounds[-1]["dev_accuracy"] = dev_acc
                log.info("%s fine-tune, extra round: dev accuracy %.3f", task, dev_acc)
            tr.save(ft_dir)
            ft_info.update({"steps": tr.steps_done, "rounds": rounds, "train_seconds": round(tr.train_seconds, 2),
                            "dev_accuracy": dev_acc, "n_train": len(data), "lr": args.lr,
                            "train_batch": args.train_batch})
            del tr
            release()
            budget.record("finetune", time.perf_counter() - t0)
            write_json(marker, ft_info)

        ref = load_checkpoint(ft_dir, device=device, dtype=dtype)
        ft_em = exact_match(ref.model, ref.tokenizer, test[task], batch_size=args.batch_size)
        ft_acc = ft_em.accuracy
        ft_info["finetuned_accuracy"] = ft_acc
        ft_info["correct_items"] = items_to_hex(ft_em.per_item)  # for paired intervals of accuracy kept
        ft_info["gain"] = ft_acc - base_acc[task]
        ft_info["meets_target_gain"] = ft_acc - base_acc[task] >= args.target_gain
        part.data["finetunes"][task] = ft_info
        part.save()
        log.info("%s: base %.3f fine-tune %.3f", task, base_acc[task], ft_acc)
        if not ft_info["meets_target_gain"]:
            part.note(task=task, note=f"fine-tune beats base by {ft_acc - base_acc[task]:.3f} < {args.target_gain} on test")

        calib = None
        if args.calib == "task":
            calib = write_jsonl(workdir / f"calib-{task}.jsonl", splits[task]["train"][: args.n_calib or None])
        kl_examples = test[task][: args.kl_n]

        # jobs ratio-major in the order --ratios gives them (its first ratio = the headline comparison), so a run cut
        # short by the time budget still has every method at the ratios it reached; a lossless method runs once
        from deltapack.methods import get_method

        usable = []
        for spec in specs:
            if spec.method not in METHODS:
                part.note(task=task, method=spec.label, note=f"method {spec.method!r} not available in this build")
                continue
            try:
                usable.append((spec, get_method(spec.method, spec.params)))
            except Exception as e:  # MethodError: e.g. a knob this version does not have
                part.note(task=task, method=spec.label, note=f"cannot configure: {e}")
        jobs = [(spec, None) for spec, m in usable if m.lossless]
        jobs += [(spec, r) for r in ratios for spec, m in usable if not m.lossless]
        for spec, ratio in jobs:
            if not budget.fits(spec.label, 30.0):
                part.note(task=task, method=spec.label, target_ratio=ratio,
                          note=f"time budget: skipped (est. {budget.estimate(spec.label, 30.0):.0f} s, {budget.left():.0f} s left)")
                stopped = True
                continue
            run_one(part, budget, spec, ratio, task, base_dir, ft_dir, ref, calib, device, dtype, test[task],
                    kl_examples, base_acc[task], ft_acc, workdir, args)
        del ref
        release()
    part.data["complete"] = not stopped
    part.data["elapsed_s"] = round(budget.elapsed(), 1)
    part.save()
    log.info("wrote %s (%d results, %d notes) in %.0f s", args.out, len(part.data["results"]), len(part.data["notes"]),
             budget.elapsed())
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.report:
        import report

        report.main([str(args.out), "--out", str(args.report)])
    return 0


def run_one(part: Part, budget: Budget, spec: MethodSpec, ratio, task, base_dir, ft_dir, ref, calib, device, dtype,
            examples, kl_examples, base_acc, ft_acc, workdir: Path, args) -> None:
    from deltapack import api
    from deltapack.errors import BudgetError
    from deltapack.eval import exact_match, kl_to_reference

    slug = f"{task}-{spec.label}-{'lossless' if ratio is None else f'{ratio:g}x'}"
    out = workdir / "deltas" / slug
    t_all = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        api.compress(base_dir, ft_dir, out, method=spec.method, ratio=ratio, params=spec.params,
                     calib=str(calib) if calib else None, device=str(device), overwrite=True, progress=False)
    except BudgetError as e:
        part.note(task=task, method=spec.label, target_ratio=ratio, note=f"cannot reach: {e}")
        budget.record(spec.label, time.perf_counter() - t_all)
        return
    except Exception as e:  # a broken method must not sink the other 30 runs of this invocation
        log.error("%s failed:\n%s", slug, traceback.format_exc())
        part.note(task=task, method=spec.label, target_ratio=ratio, note=f"error: {e.__class__.__name__}: {e}"[:500])
        budget.record(spec.label, time.perf_counter() - t_all)
        shutil.rmtree(out, ignore_errors=True)
        return
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    try:
        info = api.inspect(out)
        t1 = time.perf_counter()
        model, tok = api.load_merged(base_dir, out, device=device, dtype=dtype)
        em = exact_match(model, tok, examples, batch_size=args.batch_size)
        kl = kl_to_reference(model, ref.model, tok, kl_examples, batch_size=32)
        eval_seconds = time.perf_counter() - t1
        del model
    except Exception as e:
        log.error("%s evaluation failed:\n%s", slug, traceback.format_exc())
        part.note(task=task, method=spec.label, target_ratio=ratio, note=f"evaluation error: {e.__class__.__name__}: {e}"[:500])
        budget.record(spec.label, time.perf_counter() - t_all)
        return
    finally:
        release()
        if not args.keep_deltas:
            shutil.rmtree(out, ignore_errors=True)
    rec = {
        "method": spec.method, "label": spec.label, "allocator": spec.allocator, "params": spec.params,
        "target_ratio": ratio, "true_ratio": info["true_ratio"], "nominal_ratio": info["nominal_ratio"],
        "bytes": info["total_bytes"], "task": task, "accuracy": em.accuracy, "finetuned_accuracy": ft_acc,
        "base_accuracy": base_acc, "kept": em.accuracy / ft_acc if ft_acc > 0 else None, "kl": kl.kl,
        "seconds": round(seconds, 3), "eval_seconds": round(eval_seconds, 3), "n_eval": len(examples),
        "n_kl_tokens": kl.tokens, "correct_items": items_to_hex(em.per_item),
    }
    part.add(rec)
    budget.record(spec.label, time.perf_counter() - t_all)
    log.info("%s: true %.1fx acc %.3f (ft %.3f) kept %s KL %.4g  [%.1f s + %.1f s eval]", slug, rec["true_ratio"],
             em.accuracy, ft_acc, f"{rec['kept']:.3f}" if rec["kept"] is not None else "n/a", kl.kl, seconds, eval_seconds)


if __name__ == "__main__":
    sys.exit(main())
