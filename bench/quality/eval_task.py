"""Evaluate one task's fine-tune under every method x ratio x calibration: one process per task (run.py starts them
side by side on one GPU).

Per job: `deltapack.api.compress` (timed; `heal=True` for the `auto+heal` label), `api.inspect` (true and nominal
ratio), rebuild in memory (`api.load_merged`), greedy answers to every test item (batched, left-padded, KV cache:
`deltapack.eval.greedy_generate`), scoring, and KL(fine-tune || rebuilt) per answer token on the first `--kl-n` test
items, teacher-forced. Scoring per family (tasks.SCORING):

- exact: the stripped greedy answer equals the reference answer (deltapack.eval.tasks.answer_matches);
- self (`chat`): the whitespace-normalised greedy answer (at most 64 new tokens) equals the fine-tune's own, so the
  fine-tune scores 1.0 by definition; also the token agreement up to the first divergence (common prefix of the two
  token sequences / the longer one, mean over items) and the fact accuracy (the answer names the asked-for value).

accuracy kept = accuracy of the rebuilt model / the fine-tune's, with a 95% paired bootstrap interval over test
items; the per-item results of both are stored (hex bit strings) so the interval can be recomputed.

Resumable: every finished job is appended to WORKDIR/ledger-TASK.jsonl; a later call on the still-warm machine
skips what the ledger holds and writes a part with all of it. The fine-tune's and the base's answers are cached in
WORKDIR/ref-TASK.json. Jobs run in priority order (default calibration first, then the task's own data; ratios in
the order given; every method at a ratio before the next ratio), and --deadline stops starting jobs whose measured
duration says they would not finish in time.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import logging
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (CALIBRATIONS, INTERVAL_TEXT, Budget, MethodSpec, command_line, device_name, hex_to_items,  # noqa: E402
                    items_to_hex, normalise_ws, now_iso, paired_interval, select_methods, set_worker_threads,
                    write_json)

log = logging.getLogger("bench.quality.evaluate")
DEFAULT_EVAL_BATCH = {"classify": 128}  # ~300-token prompts; every other task decodes its 512 items in 2 batches
EVAL_BATCH = 256
# Seconds one job took on the H100 with six tasks sharing it (2026-12-07 GPU runs, compress + evaluation, rounded up),
# for labels not timed yet in this call or an earlier one of the same fine-tune (those use their own measurement):
# without them a job far longer than the ones timed so far (auto after dare) would start in the last minute and be
# killed at the deadline, wasting the GPU for the others.
PRIOR_JOB_SECONDS = {"auto": 170.0, "auto-min-gain-3pct": 170.0, "auto-flips": 170.0, "auto+heal": 260.0,
                     "delta-come": 75.0, "deltadq": 45.0, "dare": 25.0, "lowrank": 25.0, "bitdelta": 25.0}


# ---- answering and scoring ------------------------------------------------------------------------------------------
def max_new_tokens_for(task: str, tok, records: Sequence) -> int:
    from deltapack.eval.metrics import auto_max_new_tokens
    from deltapack.eval.tasks import Example
    from tasks import CHAT_MAX_NEW_TOKENS, SCORING

    if SCORING[task] == "self":
        return CHAT_MAX_NEW_TOKENS
    return auto_max_new_tokens(tok, [Example(r.prompt, r.answer) for r in records])


@torch.no_grad()
def answer(model, tok, records: Sequence, *, max_new_tokens: int, batch_size: int) -> tuple[list[list[int]], list[str]]:
    """Greedy completions (token ids without the stop token, and decoded text) of every record's prompt."""
    from deltapack.eval.metrics import greedy_generate
    from deltapack.eval.tasks import prompt_ids, use_chat

    chat = use_chat(tok, None)
    prompts = [prompt_ids(tok, r.prompt, chat) for r in records]
    ids = greedy_generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return ids, [tok.decode(g, skip_special_tokens=True) for g in ids]


def exact_items(texts: Sequence[str], records: Sequence) -> list[bool]:
    from deltapack.eval.tasks import answer_matches

    return [bool(answer_matches(t, r.answer)) for t, r in zip(texts, records)]


def self_items(texts: Sequence[str], reference: Sequence[str]) -> list[bool]:
    return [normalise_ws(t) == normalise_ws(r) for t, r in zip(texts, reference)]


def fact_items(texts: Sequence[str], records: Sequence) -> list[bool]:
    return [all(f.lower() in t.lower() for f in r.facts) for t, r in zip(texts, records)]


def token_agreement(ids: Sequence[list[int]], reference: Sequence[list[int]]) -> float:
    """Mean over items of (common prefix length) / (longer of the two lengths); 1.0 for two empty answers."""
    total = 0.0
    for a, b in zip(ids, reference):
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        total += n / max(len(a), len(b)) if (a or b) else 1.0
    return total / max(1, len(ids))


def by_kind(records: Sequence, items: Sequence[bool]) -> dict[str, list[int]]:
    """kind -> [items, right]: which sub-type of a family a model gets wrong (tasks.Record.kind)."""
    out: dict[str, list[int]] = {}
    for r, ok in zip(records, items):
        n = out.setdefault(r.kind or "-", [0, 0])
        n[0] += 1
        n[1] += int(ok)
    return dict(sorted(out.items()))


def score_model(model, tok, task: str, records: Sequence, *, batch_size: int) -> dict:
    """A model's score on records without a reference model: exact-match accuracy, or (chat) the fact accuracy."""
    from tasks import SCORING

    mnt = max_new_tokens_for(task, tok, records)
    _, texts = answer(model, tok, records, max_new_tokens=mnt, batch_size=batch_size)
    if SCORING[task] == "self":
        items = fact_items(texts, records)
        return {"fact_accuracy": sum(items) / len(items), "n": len(items), "by_kind": by_kind(records, items)}
    items = exact_items(texts, records)
    return {"accuracy": sum(items) / len(items), "n": len(items), "by_kind": by_kind(records, items)}


# ---- the reference answers of the fine-tune and the base --------------------------------------------------------------
def reference_answers(workdir: Path, task: str, base_dir: Path, ft_dir: Path, test: Sequence, device, dtype,
                      batch_size: int, finetune_id: str) -> dict:
    """The fine-tune's and the base's greedy answers to the test items and their scores; cached per fine-tune."""
    from deltapack.eval import load_checkpoint
    from tasks import SCORING

    cache = workdir / f"ref-{task}.json"
    if cache.is_file():
        ref = json.loads(cache.read_text())
        if ref.get("finetune_id") == finetune_id and ref.get("n_eval") == len(test):
            return ref
    t0 = time.perf_counter()
    out: dict = {"finetune_id": finetune_id, "n_eval": len(test)}
    for who, path in (("finetuned", ft_dir), ("base", base_dir)):
        m = load_checkpoint(path, device=device, dtype=dtype)
        mnt = out.setdefault("max_new_tokens", max_new_tokens_for(task, m.tokenizer, test))
        ids, texts = answer(m.model, m.tokenizer, test, max_new_tokens=mnt, batch_size=batch_size)
        if SCORING[task] == "self":
            if who == "finetuned":
                out["finetuned_ids"], out["finetuned_texts"] = ids, texts
            items = self_items(texts, out["finetuned_texts"])
            facts = fact_items(texts, test)
            out[f"{who}_fact_accuracy"] = sum(facts) / len(facts)
            out[f"{who}_fact_items"] = items_to_hex(facts)
            out[f"{who}_fact_by_kind"] = by_kind(test, facts)
        else:
            items = exact_items(texts, test)
            out[f"{who}_by_kind"] = by_kind(test, items)
        out[f"{who}_accuracy"] = sum(items) / len(items)
        out[f"{who}_items"] = items_to_hex(items)
        out[f"{who}_examples"] = [{"prompt": r.prompt[-300:], "answer": r.answer, "got": t}
                                  for r, t in list(zip(test, texts))[:3]]
        del m
        release()
    out["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(cache, out)
    return out


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- the job list ---------------------------------------------------------------------------------------------------
def job_key(label: str, ratio: float, calibration: str, n_eval: int) -> str:
    return f"{label}|{ratio:g}|{calibration}|{n_eval}"


def heal_supported() -> bool:
    from deltapack import api

    return "heal" in inspect.signature(api.compress).parameters


def uses_calibration(spec: MethodSpec) -> bool:
    """Whether a task-calibrated run can differ from the default one (data-free methods ignore --calib)."""
    from deltapack.methods import get_method

    m = get_method(spec.method, spec.params)
    now = getattr(m, "uses_calibration_now", None)
    return bool(spec.heal or (now if now is not None else (m.uses_calibration or m.needs_calibration)))


def plan_jobs(specs: list[MethodSpec], ratios: list[float], calibrations: list[str], note) -> list[tuple]:
    """(spec, ratio, calibration) in run order; labels that cannot run here become one note each."""
    from deltapack.methods import METHODS, get_method

    usable, calibrated = [], set()
    for spec in specs:
        if spec.method not in METHODS:
            note(method=spec.label, note=f"method {spec.method!r} is not registered in this build: not run")
            continue
        if spec.heal and not heal_supported():
            note(method=spec.label, note="deltapack.api.compress has no `heal` parameter in this build: not run")
            continue
        try:
            get_method(spec.method, spec.params)
        except Exception as e:  # a knob this version does not have
            note(method=spec.label, note=f"cannot configure: {e}")
            continue
        usable.append(spec)
        if uses_calibration(spec):
            calibrated.add(spec.label)
        elif "task" in calibrations:
            note(method=spec.label, calibration="task",
                 note="uses no calibration data: a task-calibrated run would repeat the default one, not run")
    jobs = []
    for cal in calibrations:
        for r in ratios:
            for spec in usable:
                if cal == "default" or spec.label in calibrated:
                    jobs.append((spec, r, cal))
    return jobs


def parse_plan(text: str) -> list[tuple[str, float, str]]:
    """"LABEL@RATIO[:CALIB],..." -> [(label, ratio, calibration)] in the order given (calibration default: default).
    Lets one device call spend its minutes on the cells that matter most instead of a methods x ratios product."""
    out = []
    for tok in (t.strip() for t in text.split(",") if t.strip()):
        label, sep, rest = tok.partition("@")
        ratio_text, _, cal = rest.partition(":")
        cal = cal or "default"
        try:
            ratio = float(ratio_text)
        except ValueError:
            raise SystemExit(f"--plan entry {tok!r}: want LABEL@RATIO[:CALIB], e.g. auto@32 or delta-come@16:task")
        if not sep or not label or ratio <= 1:
            raise SystemExit(f"--plan entry {tok!r}: want LABEL@RATIO[:CALIB] with RATIO > 1")
        if cal not in CALIBRATIONS:
            raise SystemExit(f"--plan entry {tok!r}: unknown calibration {cal!r}; choose from {', '.join(CALIBRATIONS)}")
        out.append((label, ratio, cal))
    if not out:
        raise SystemExit("--plan is empty")
    return out


def plan_from_text(text: str, note) -> list[tuple]:
    """parse_plan's entries as plan_jobs' (spec, ratio, calibration); unusable ones become notes, as there."""
    entries = parse_plan(text)
    labels = ",".join(dict.fromkeys(label for label, _, _ in entries))
    by_label = {}
    for cal in dict.fromkeys(c for _, _, c in entries):
        ratios = sorted({r for _, r, c in entries if c == cal})
        for spec, r, c in plan_jobs(select_methods(labels, extra=True), ratios, [cal], note):
            by_label[(spec.label, r, c)] = spec
    return [(by_label[e], e[1], e[2]) for e in entries if e in by_label]


# ---- one job --------------------------------------------------------------------------------------------------------
def run_job(spec: MethodSpec, ratio: float, calibration: str, ctx: dict) -> dict:
    """Compress, rebuild, score; returns the record, or {"note": ...} for a ratio the method cannot reach or an
    error (the job is not retried by a resumed call only when the note is `final`)."""
    from deltapack import api
    from deltapack.errors import BudgetError
    from deltapack.eval import kl_to_reference
    from deltapack.eval.tasks import Example
    from tasks import SCORING

    task, workdir, device, dtype = ctx["task"], ctx["workdir"], ctx["device"], ctx["dtype"]
    slug = f"{task}-{spec.label.replace('+', '-')}-{ratio:g}x-{calibration}"
    out = workdir / "deltas" / slug
    kwargs = {"method": spec.method, "ratio": ratio, "params": dict(spec.params), "device": str(device),
              "calib": str(ctx["calib_file"]) if calibration == "task" else None, "overwrite": True,
              "progress": False}
    if spec.heal:
        kwargs["heal"] = True
    if device.type == "cuda":
        torch.cuda.synchronize()
    from deltapack.compress import record_phases

    t0 = time.perf_counter()
    try:
        with record_phases() as phases:  # seconds per phase: where auto spends its time on the GPU
            api.compress(ctx["base_dir"], ctx["ft_dir"], out, **kwargs)
    except BudgetError as e:
        shutil.rmtree(out, ignore_errors=True)
        return {"note": f"cannot reach: {e}", "final": True}
    except Exception as e:  # a broken method must not sink the other jobs of this task
        log.error("%s failed:\n%s", slug, traceback.format_exc())
        shutil.rmtree(out, ignore_errors=True)
        release()  # e.g. after a CUDA out-of-memory error: the next job starts clean
        return {"note": f"error: {e.__class__.__name__}: {e}"[:500], "final": False}
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    ref, test = ctx["ref"], ctx["test"]
    try:
        info = api.inspect(out)
        from deltapack.format.manifest import MANIFEST_NAME

        # what the method chose and why (auto: per-candidate KL, group switches; healing's record): kept with the
        # score, because the delta itself is deleted after the job
        choice = json.loads((out / MANIFEST_NAME).read_text()).get("calibration")
        t1 = time.perf_counter()
        model, tok = api.load_merged(ctx["base_dir"], out, device=device, dtype=dtype)
        ids, texts = answer(model, tok, test, max_new_tokens=ref["max_new_tokens"], batch_size=ctx["batch_size"])
        extra: dict = {}
        if SCORING[task] == "self":
            items = self_items(texts, ref["finetuned_texts"])
            facts = fact_items(texts, test)
            extra = {"token_agreement": token_agreement(ids, ref["finetuned_ids"]),
                     "fact_accuracy": sum(facts) / len(facts), "fact_items": items_to_hex(facts)}
            kl_ex = [Example(r.prompt, t) for r, t in zip(test, ref["finetuned_texts"])][: ctx["kl_n"]]
        else:
            items = exact_items(texts, test)
            kl_ex = [Example(r.prompt, r.answer) for r in test][: ctx["kl_n"]]
        kl = kl_to_reference(model, ctx["ft_model"], tok, kl_ex, batch_size=ctx["kl_batch"])
        eval_seconds = time.perf_counter() - t1
        del model
    except Exception as e:
        log.error("%s evaluation failed:\n%s", slug, traceback.format_exc())
        return {"note": f"evaluation error: {e.__class__.__name__}: {e}"[:500], "final": False}
    finally:
        release()
        if not ctx["keep_deltas"]:
            shutil.rmtree(out, ignore_errors=True)
    ft_items = hex_to_items(ref["finetuned_items"], len(test))
    acc, ft_acc = sum(items) / len(items), ref["finetuned_accuracy"]
    lo, hi = paired_interval(items, ft_items) if ft_acc > 0 else (None, None)
    return {
        "task": task, "heldout": ctx["heldout"], "scoring": SCORING[task], "method": spec.method,
        "label": spec.label, "params": spec.params, "heal": spec.heal, "allocator": None,
        "calibration": calibration, "target_ratio": ratio, "true_ratio": info["true_ratio"],
        "nominal_ratio": info["nominal_ratio"], "bytes": info["total_bytes"], "accuracy": acc,
        "finetuned_accuracy": ft_acc, "base_accuracy": ref["base_accuracy"],
        "kept": acc / ft_acc if ft_acc > 0 else None, "kept_interval": [lo, hi], "interval": INTERVAL_TEXT,
        "kl": kl.kl, "kl_max_token": kl.max_token_kl, "n_kl": len(kl_ex), "n_kl_tokens": kl.tokens,
        "calibration_record": choice, "seconds": round(seconds, 3), "phases": {k: round(v, 2) for k, v in sorted(phases.items())},
        "eval_seconds": round(eval_seconds, 3), "n_eval": len(test),
        "correct_items": items_to_hex(items), "finetune_id": ctx["finetune_id"], "measured": now_iso(),
        **extra,
    }


# ---- the worker -----------------------------------------------------------------------------------------------------
class Part:
    """This call's JSON part for one task, rewritten atomically after every change; the ledger (JSONL in the
    workdir) keeps every finished job across calls on one warm machine."""

    def __init__(self, path: Path, ledger: Path, header: dict, finetune_id: str, n_eval: int):
        self.path, self.ledger, self.finetune_id = path, ledger, finetune_id
        self.data = {**header, "finetunes": {}, "results": [], "notes": [], "complete": False}
        self.done: dict[str, dict] = {}
        if ledger.is_file():
            for line in ledger.read_text().splitlines():
                e = json.loads(line) if line.strip() else {}
                # jobs of an earlier fine-tune in this workdir, or on another number of test items, do not count
                if e.get("finetune_id") == finetune_id and e["key"].endswith(f"|{n_eval}"):
                    self.done[e["key"]] = e
        for e in self.done.values():
            if "record" in e:
                self.data["results"].append(e["record"])
            else:
                self.data["notes"].append(e["note"])
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)

    def note(self, **kw) -> None:
        log.warning("note: %s", kw)
        self.data["notes"].append(kw)
        self.save()

    def finish_job(self, key: str, entry: dict) -> None:
        self.done[key] = {"key": key, "finetune_id": self.finetune_id, **entry}
        with open(self.ledger, "a") as f:
            f.write(json.dumps(self.done[key]) + "\n")
        if "record" in entry:
            self.data["results"].append(entry["record"])
        else:
            self.data["notes"].append(entry["note"])
        self.save()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="evaluate one task's fine-tune under methods x ratios x calibrations")
    ap.add_argument("--task", required=True)
    ap.add_argument("--workdir", type=Path, required=True, help="holds base/, ft-TASK/ (run.py finetune)")
    ap.add_argument("--part", type=Path, required=True, help="this call's JSON part")
    ap.add_argument("--methods", default="all")
    ap.add_argument("--ratios", default="16,32,64,128", help="target true ratios, in run order")
    ap.add_argument("--calib", default="default,task", help="calibrations, in run order: default, task")
    ap.add_argument("--plan", default=None,
                    help="LABEL@RATIO[:CALIB],... jobs in this order instead of --methods x --ratios x --calib")
    ap.add_argument("--kl-n", type=int, default=128, help="test items for KL")
    ap.add_argument("--eval-n", type=int, default=None, help="score the first N test items only (smoke)")
    ap.add_argument("--batch-size", type=int, default=None, help="generation batch (default 256; classify 128)")
    ap.add_argument("--deadline", type=float, required=True, help="time.time() after which no job starts")
    ap.add_argument("--job-estimate", type=float, default=30.0, help="assumed seconds of a job not yet timed")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--keep-deltas", action="store_true")
    ap.add_argument("--redo", action="store_true", help="ignore the ledger: run every job again")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.task} %(name)s: %(message)s")
    for noisy in ("httpx", "transformers", "deltapack.compress"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    set_worker_threads(args.workers)

    from deltapack.compress import resolve_device
    from deltapack.eval import load_checkpoint, resolve_dtype
    from tasks import make_splits, write_jsonl

    budget = Budget(args.deadline)
    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", device)
    workdir = args.workdir
    base_dir, ft_dir = workdir / "base", workdir / f"ft-{args.task}"
    marker = ft_dir / "finetune.json"
    if not marker.is_file():
        raise SystemExit(f"no fine-tune of {args.task} in {workdir} (run `run.py finetune` first)")
    ft_info = json.loads(marker.read_text())
    data = ft_info["data"]
    splits = make_splits(args.task, data["n_train"], data["n_dev"], data["n_test"], data["knobs"])
    test = splits["test"][: args.eval_n] if args.eval_n else splits["test"]
    plan = parse_plan(args.plan) if args.plan else None  # checked before the fine-tune is loaded
    calibrations = [c for c in args.calib.split(",") if c] if plan is None else list(dict.fromkeys(c for *_, c in plan))
    for c in calibrations:
        if c not in CALIBRATIONS:
            raise SystemExit(f"unknown calibration {c!r}; choose from {', '.join(CALIBRATIONS)}")
    ledger = workdir / f"ledger-{args.task}.jsonl"
    if args.redo and ledger.exists():
        ledger.unlink()
    finetune_id = ft_info["finetune_id"]
    part = Part(args.part, ledger, {
        "command": command_line(), "device": device_name(device), "date": now_iso(), "task": args.task,
        "smoke": bool(ft_info.get("smoke")), "torch": torch.__version__, "settings": vars(args) | {
            "workdir": str(workdir), "part": str(args.part)},
    }, finetune_id, len(test))
    batch = args.batch_size or DEFAULT_EVAL_BATCH.get(args.task, EVAL_BATCH)
    ref = reference_answers(workdir, args.task, base_dir, ft_dir, test, device, dtype, batch, finetune_id)
    ft_summary = {k: v for k, v in ref.items() if not k.endswith(("_ids", "_texts"))}
    part.data["finetunes"][args.task] = {**ft_info, **ft_summary, "finetune_id": finetune_id,
                                         "gain": ref["finetuned_accuracy"] - ref["base_accuracy"]}
    part.save()
    log.info("%s: base %.3f fine-tune %.3f on %d test items", args.task, ref["base_accuracy"],
             ref["finetuned_accuracy"], len(test))

    calib_file = workdir / f"calib-{args.task}.jsonl"
    if "task" in calibrations and not calib_file.is_file():
        write_jsonl(calib_file, splits["train"])
    from tasks import HELDOUT

    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    note = lambda **kw: part.note(task=args.task, **kw)  # noqa: E731
    jobs = (plan_from_text(args.plan, note) if args.plan
            else plan_jobs(select_methods(args.methods, extra=True), ratios, calibrations, note))
    jobs = [j for j in jobs if job_key(j[0].label, j[1], j[2], len(test)) not in part.done]
    ft_model = load_checkpoint(ft_dir, device=device, dtype=dtype).model if jobs else None
    ctx = {"task": args.task, "workdir": workdir, "device": device, "dtype": dtype, "base_dir": base_dir,
           "ft_dir": ft_dir, "ft_model": ft_model, "calib_file": calib_file, "ref": ref, "test": test,
           "kl_n": args.kl_n, "kl_batch": 8 if args.task == "classify" else 16, "batch_size": batch,
           "keep_deltas": args.keep_deltas, "heldout": args.task in HELDOUT, "finetune_id": finetune_id}
    for entry in part.done.values():  # what this fine-tune's earlier calls measured predicts this call's jobs
        rec = entry.get("record")
        if rec and rec.get("seconds") is not None:
            budget.record(f"{rec['label']}|{rec['calibration']}", rec["seconds"] + (rec.get("eval_seconds") or 0.0))
    skipped = 0
    for spec, ratio, cal in jobs:
        key = job_key(spec.label, ratio, cal, len(test))
        est_key = f"{spec.label}|{cal}"
        prior = max(args.job_estimate, PRIOR_JOB_SECONDS.get(spec.label, 0.0) if device.type == "cuda" else 0.0)
        if not budget.fits(est_key, prior):
            skipped += 1
            part.note(task=args.task, method=spec.label, target_ratio=ratio, calibration=cal,
                      note=f"time budget: not started (est. {budget.estimate(est_key, prior):.0f} s, "
                           f"{budget.left():.0f} s left)")
            continue
        t0 = time.perf_counter()
        res = run_job(spec, ratio, cal, ctx)
        budget.record(est_key, time.perf_counter() - t0)
        if "note" in res:
            entry = {"task": args.task, "method": spec.label, "target_ratio": ratio, "calibration": cal,
                     "note": res["note"]}
            if res["final"]:
                part.finish_job(key, {"note": entry})
            else:
                part.note(**entry)
            continue
        part.finish_job(key, {"record": res})
        log.info("%s %s %gx %s: true %.1fx acc %.3f kept %s [%s] KL %.4g (%.1f s + %.1f s)", args.task, spec.label,
                 ratio, cal, res["true_ratio"], res["accuracy"], f"{res['kept']:.3f}" if res["kept"] is not None
                 else "n/a", ", ".join(f"{x:.3f}" for x in res["kept_interval"] if x is not None), res["kl"],
                 res["seconds"], res["eval_seconds"])
    part.data["complete"] = skipped == 0
    part.data["elapsed_s"] = round(budget.elapsed(), 1)
    part.save()
    log.info("wrote %s: %d results, %d notes, %d jobs not started", args.part, len(part.data["results"]),
             len(part.data["notes"]), skipped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
