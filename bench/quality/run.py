"""The quality benchmark on one GPU: fine-tune every task family in parallel, then evaluate every method x ratio x
calibration in parallel, one process per task (a 135M model leaves an H100 mostly idle: eager Python and kernel
launches dominate, so six processes share it well). Device time is the scarce resource; every stage keeps inside a
time budget and writes its results as it goes.

    # GPU (see run_gpu.sh for the device calls): fine-tunes live in --workdir while the machine stays warm
    python bench/quality/run.py finetune --workdir /root/dpq --out-dir $OUT --time-budget 300
    python bench/quality/run.py eval --workdir /root/dpq --out-dir $OUT --time-budget 540 --tag e1
    python bench/quality/run.py eval --workdir /root/dpq --out-dir $OUT --time-budget 540 --tag e2   # resumes
    # CPU: the whole pipeline (2 tasks, pico random Llama with SmolLM2's tokenizer, report into the smoke dir)
    python bench/quality/run.py smoke --out-dir /tmp/quality-smoke

`finetune`: dequantizes the embedded GGUF once (the package's loader, cached), copies it as bf16 safetensors to
WORKDIR/base, and starts one finetune.py process per task at once (they import and generate their data while the
base is prepared); each saves WORKDIR/ft-TASK with its finetune.json (train loss history, dev score, seconds).
Writes OUT/finetune.json (every task's record) and OUT/finetune-log.txt.

`eval`: one eval_task.py process per task; each writes OUT/quality-TASK-TAG.json after every job and keeps a ledger
in the workdir, so a second `eval` call on the warm machine continues where the first stopped. OUT/eval-TAG-log.txt
holds the workers' logs. The files under OUT (at most 8 per device call) go to bench/results/quality_parts/, then
`python bench/quality/report.py --merge bench/results/quality_parts/*.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import REPO, command_line, now_iso, write_json  # noqa: E402
from tasks import TASKS  # noqa: E402

log = logging.getLogger("bench.quality")
SAVE_MARGIN_S = 35.0  # a fine-tune's dev scoring + bf16 save after its training deadline
GRACE_S = 15.0  # after the budget, before stragglers are killed


def per_task(text: str | None, cast, name: str) -> dict:
    """'400' (every task) or 'arithmetic=600,classify=300' (the others keep their default) -> {task: value}."""
    if not text:
        return {}
    if "=" not in text:
        return {t: cast(text) for t in TASKS}
    out = {}
    for item in text.split(","):
        task, _, value = item.partition("=")
        if task.strip() not in TASKS:
            raise SystemExit(f"--{name}: unknown task {task!r}")
        out[task.strip()] = cast(value)
    return out


def select_tasks(text: str) -> list[str]:
    tasks = list(TASKS) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    for t in tasks:
        if t not in TASKS:
            raise SystemExit(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    return tasks


def prepare_base(workdir: Path, source: Path | None) -> tuple[Path, float]:
    """WORKDIR/base: the base as bf16 safetensors, made once (the GGUF is dequantized by the package's loader, ~30 s
    on the GPU machine); every worker loads it from there."""
    from deltapack.io.writer import AtomicDir

    dest = workdir / "base"
    if (dest / "config.json").is_file():
        return dest, 0.0
    t0 = time.perf_counter()
    if source is None:
        from common import embedded_base_dir

        source = embedded_base_dir()
    if not (Path(source) / "config.json").is_file():
        raise SystemExit(f"--base {source}: not a checkpoint directory (no config.json)")
    with AtomicDir(dest, overwrite=True) as tmp:
        for f in Path(source).iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    return dest, time.perf_counter() - t0


class Workers:
    """Child processes, one per task, each with its own log file; killed at the hard limit, and when the parent
    leaves the `with` block early (an error): no worker outlives the call that started it."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, tuple[subprocess.Popen, Path, float]] = {}

    def start(self, name: str, argv: list[str], threads: int) -> None:
        # expandable segments: a dozen processes share the GPU's memory, so little of it should sit fragmented
        env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", **os.environ, "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        path = self.log_dir / f"{name}.log"
        f = open(path, "w")
        p = subprocess.Popen([sys.executable, *argv], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        f.close()
        self.procs[name] = (p, path, time.time())

    def wait(self, hard_deadline: float, on_exit=None) -> dict[str, dict]:
        """Wait for every worker (also those `on_exit(name, rc)` starts meanwhile); kill what runs past the limit."""
        status: dict[str, dict] = {}
        while len(status) < len(self.procs):
            for name, (p, path, t0) in list(self.procs.items()):
                if name in status:
                    continue
                rc = p.poll()
                if rc is None and time.time() > hard_deadline:
                    log.error("%s: still running at the hard limit: killed", name)
                    self._kill(p)
                    rc = p.wait()
                    status[name] = {"rc": rc, "killed": True, "seconds": round(time.time() - t0, 1)}
                elif rc is not None:
                    status[name] = {"rc": rc, "killed": False, "seconds": round(time.time() - t0, 1)}
                    (log.info if rc == 0 else log.error)("%s: exit %d after %.0f s", name, rc, time.time() - t0)
                    if rc != 0:
                        sys.stderr.write(f"--- end of {path}\n{path.read_text()[-3000:]}\n")
                    if on_exit is not None:
                        on_exit(name, rc)
            time.sleep(0.5)
        return status

    @staticmethod
    def _kill(p: subprocess.Popen) -> None:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> bool:
        for name, (p, _, _) in self.procs.items():
            if p.poll() is None:
                log.error("%s: still running as the parent stops: killed", name)
                self._kill(p)
        return False

    def collect_logs(self, path: Path) -> None:
        text = "".join(f"===== {name} ({lp})\n{lp.read_text()}\n" for name, (_, lp, _) in self.procs.items())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


# ---- finetune -------------------------------------------------------------------------------------------------------
def cmd_finetune(args: argparse.Namespace) -> int:
    from finetune import BATCH_SIZE, TRAIN_DEFAULTS
    from tasks import N_TRAIN, parse_knobs

    t_start = time.time()
    deadline = t_start + args.time_budget
    train_deadline = t_start + min(args.train_budget or args.time_budget, args.time_budget) - SAVE_MARGIN_S
    workdir, out_dir = args.workdir, args.out_dir
    workdir.mkdir(parents=True, exist_ok=True)
    tasks = select_tasks(args.tasks)
    steps, lrs = per_task(args.steps, int, "steps"), per_task(args.lr, float, "lr")
    batches = per_task(args.batch_size, int, "batch-size")
    knobs = parse_knobs(args.knob)  # validated here, before any process starts
    reused, started, evaluating = [], [], []
    with Workers(workdir / "logs" / f"finetune-{int(t_start)}") as workers:
        for task in tasks:
            want = {"n_train": args.n_train if args.n_train is not None else N_TRAIN[task], "n_dev": args.n_dev,
                    "n_test": args.n_test, "knobs": {k: v for k, v in knobs.items() if k == task}}
            s, lr = steps.get(task, TRAIN_DEFAULTS[task]["steps"]), lrs.get(task, TRAIN_DEFAULTS[task]["lr"])
            batch = batches.get(task, BATCH_SIZE)
            marker = workdir / f"ft-{task}" / "finetune.json"
            if args.reuse_finetunes and marker.is_file():
                prev = json.loads(marker.read_text())
                if (prev["data"] == want and prev["steps_planned"] == s and prev["lr"] == lr
                        and prev["batch_size"] == batch and not prev["stopped_early"]):
                    reused.append(task)
                    continue
                log.info("%s: the fine-tune in %s was made with other settings: made again", task, marker.parent)
            argv = [str(HERE / "finetune.py"), "--task", task, "--base", str(workdir / "base"),
                    "--out", str(workdir / f"ft-{task}"), "--steps", str(s), "--lr", str(lr),
                    "--batch-size", str(batch), "--n-train", str(want["n_train"]), "--n-dev", str(args.n_dev),
                    "--n-test", str(args.n_test), "--deadline", str(train_deadline),
                    "--workers", str(len(tasks)), "--eval-batch", str(args.eval_batch),
                    "--max-tokens", str(args.max_tokens)]
            argv += [f"--knob={k}" for k in args.knob if k.split(".", 1)[0] == task]
            if args.device:
                argv += ["--device", args.device]
            if args.smoke:
                argv.append("--smoke")
            workers.start(task, argv, threads=max(1, (os.cpu_count() or 1) // len(tasks)))
            started.append(task)
        base_dir, base_s = prepare_base(workdir, args.base)
        log.info("base ready in %s (%.1f s); training %s; reusing %s", base_dir, base_s, started, reused)

        def then_eval(name: str, rc: int) -> None:
            # a task's evaluation starts as soon as its fine-tune is saved, and uses the rest of this call
            if args.then_eval and rc == 0 and name in tasks and (workdir / f"ft-{name}" / "finetune.json").is_file():
                workers.start(f"eval-{name}", eval_argv(args, name, "ft", deadline, len(tasks)),
                              threads=max(1, (os.cpu_count() or 1) // len(tasks)))
                evaluating.append(name)

        for task in reused:
            then_eval(task, 0)
        status = workers.wait(deadline + GRACE_S, on_exit=then_eval)
    summary = {"command": command_line(), "date": now_iso(), "stage": "finetune", "workdir": str(workdir),
               "base_prepare_seconds": round(base_s, 1), "time_budget": args.time_budget,
               "workers": status, "reused": reused, "evaluated_in_this_call": evaluating, "finetunes": {}}
    for task in tasks:
        marker = workdir / f"ft-{task}" / "finetune.json"
        if marker.is_file():
            summary["finetunes"][task] = json.loads(marker.read_text())
    summary["elapsed_s"] = round(time.time() - t_start, 1)
    write_json(out_dir / "finetune.json", summary)
    workers.collect_logs(out_dir / "finetune-log.txt")
    print(finetune_table(summary))
    if evaluating:
        print(eval_table(out_dir, "ft", evaluating, {t: status.get(f"eval-{t}", {}) for t in evaluating}))
    missing = [t for t in tasks if t not in summary["finetunes"]]
    if missing:
        log.error("no fine-tune for %s", ", ".join(missing))
    return 1 if missing else 0


def finetune_table(summary: dict) -> str:
    lines = ["| task | steps (planned) | train s | steps/s | final loss | dev score | dev score by kind |",
             "|---|---|---|---|---|---|---|"]
    for task, f in summary["finetunes"].items():
        dev = f["dev"]
        kinds = ", ".join(f"{k} {right / n:.2f}" for k, (n, right) in dev.get("by_kind", {}).items())
        lines.append(f"| {task} | {f['steps']} ({f['steps_planned']}) | {f['train_seconds']:.0f} | {f['steps_per_s']} "
                     f"| {f['final_loss']} | {dev.get('accuracy', dev.get('fact_accuracy')):.3f} | {kinds} |")
    return "\n".join(lines)


# ---- eval -----------------------------------------------------------------------------------------------------------
def eval_argv(args: argparse.Namespace, task: str, tag: str, deadline: float, n_workers: int) -> list[str]:
    argv = [str(HERE / "eval_task.py"), "--task", task, "--workdir", str(args.workdir),
            "--part", str(args.out_dir / f"quality-{task}-{tag}.json"), "--methods", args.methods,
            "--ratios", args.ratios, "--calib", args.calib, "--kl-n", str(args.kl_n),
            "--deadline", str(deadline - args.job_margin), "--workers", str(n_workers),
            "--job-estimate", str(args.job_estimate)]
    for flag, value in (("--eval-n", args.eval_n), ("--device", args.device), ("--plan", args.plan)):
        if value:
            argv += [flag, str(value)]
    if args.redo:
        argv.append("--redo")
    return argv


def cmd_eval(args: argparse.Namespace) -> int:
    t_start = time.time()
    deadline = t_start + args.time_budget
    tasks = select_tasks(args.tasks)
    missing = [t for t in tasks if not (args.workdir / f"ft-{t}" / "finetune.json").is_file()]
    if missing:
        raise SystemExit(f"no fine-tune of {', '.join(missing)} in {args.workdir}: run `run.py finetune` first "
                         "(fine-tunes live only while the GPU machine stays warm)")
    tag = args.tag or time.strftime("%Y%m%dT%H%M%S", time.gmtime(t_start))
    with Workers(args.workdir / "logs" / f"eval-{tag}") as workers:
        for task in tasks:
            workers.start(task, eval_argv(args, task, tag, deadline, len(tasks)),
                          threads=max(1, (os.cpu_count() or 1) // len(tasks)))
        status = workers.wait(deadline + GRACE_S)
    workers.collect_logs(args.out_dir / f"eval-{tag}-log.txt")
    print(eval_table(args.out_dir, tag, tasks, status))
    return 0 if all(s["rc"] == 0 for s in status.values()) else 1


def eval_table(out_dir: Path, tag: str, tasks: list[str], status: dict) -> str:
    lines = ["| task | exit | s | records | notes | complete |", "|---|---|---|---|---|---|"]
    for task in tasks:
        p = out_dir / f"quality-{task}-{tag}.json"
        d = json.loads(p.read_text()) if p.is_file() else {}
        s = status.get(task, {})
        lines.append(f"| {task} | {s.get('rc')}{' (killed)' if s.get('killed') else ''} | {s.get('seconds')} | "
                     f"{len(d.get('results', []))} | {len(d.get('notes', []))} | {d.get('complete')} |")
    return "\n".join(lines)


# ---- smoke ----------------------------------------------------------------------------------------------------------
SMOKE_TASKS = "arithmetic,chat"  # one exact-match family and the self-graded one: both scoring paths


def cmd_smoke(args: argparse.Namespace) -> int:
    """The whole pipeline on CPU: pico base, 2 tasks fine-tuned in parallel, evaluated in parallel, reported into
    copies of docs/benchmarks.md and README.md under --out-dir (the committed files are not touched)."""
    from common import smoke_base_dir

    out_dir = args.out_dir
    workdir = out_dir / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    pico = smoke_base_dir(workdir)
    evals = dict(methods=args.methods, ratios="16", calib="default,task", kl_n=4, eval_n=8, job_margin=0.0,
                 job_estimate=5.0, device="cpu", plan=None)
    # fine-tune both tasks in parallel, each evaluated as soon as it is saved (finetune --then-eval) ...
    ft = argparse.Namespace(workdir=workdir, out_dir=out_dir, tasks=SMOKE_TASKS, steps="4", lr="3e-3", batch_size="4",
                            n_train=64, n_dev=4, n_test=8, knob=[], eval_batch=8, max_tokens=256,
                            time_budget=args.time_budget,
                            train_budget=None, then_eval=True, reuse_finetunes=False, base=pico, smoke=True,
                            redo=True, **evals)
    if cmd_finetune(ft) != 0:
        return 1
    # ... then a separate eval call, as a second device call would: it resumes from the ledger (nothing left to do
    # unless the first was cut short) and writes parts holding every record
    # (an explicit --plan: dare@16 is in the ledger already, dare@32 is new)
    ev = argparse.Namespace(workdir=workdir, out_dir=out_dir, tasks=SMOKE_TASKS, time_budget=args.time_budget,
                            tag="smoke", redo=False, **(evals | {"plan": "dare@16,dare@32"}))
    if cmd_eval(ev) != 0:
        return 1
    import report

    for src, name in ((REPO / "docs" / "benchmarks.md", "benchmarks.md"), (REPO / "README.md", "README.md")):
        shutil.copy2(src, out_dir / name)
    parts = sorted(str(p) for p in out_dir.glob("quality-*.json"))
    return report.main(["--merge", *parts, "--out", str(out_dir / "quality.json"), "--docs",
                        str(out_dir / "benchmarks.md"), "--readme", str(out_dir / "README.md")])


def add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default="all", help="labels: auto, auto+heal, dare, delta-come, deltadq, lowrank, "
                                                    "bitdelta")
    p.add_argument("--ratios", default="16,32,64,128", help="target true ratios, in run order")
    p.add_argument("--calib", default="default,task", help="calibrations in run order (headline: default)")
    p.add_argument("--plan", default=None,
                   help="LABEL@RATIO[:CALIB],... in run order, instead of --methods x --ratios x --calib "
                        "(e.g. dare@16,auto@16,delta-come@16:task)")
    p.add_argument("--kl-n", type=int, default=128)
    p.add_argument("--eval-n", type=int, default=None, help="first N test items only (default: all, 512)")
    p.add_argument("--job-margin", type=float, default=20.0,
                   help="no job starts later than this before the budget ends (jobs are estimated too)")
    p.add_argument("--job-estimate", type=float, default=30.0, help="seconds assumed for a job not yet timed")
    p.add_argument("--redo", action="store_true", help="ignore earlier calls' ledgers")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("finetune", help="fine-tune every task in parallel", formatter_class=ap.formatter_class)
    f.add_argument("--workdir", type=Path, required=True)
    f.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results" / "quality_parts")
    f.add_argument("--tasks", default="all")
    f.add_argument("--steps", default=None, help="N for every task or task=N,...; default finetune.TRAIN_DEFAULTS")
    f.add_argument("--lr", default=None, help="x for every task or task=x,...; default finetune.TRAIN_DEFAULTS")
    f.add_argument("--batch-size", default=None, help="N for every task or task=N,...; default 64")
    f.add_argument("--n-train", type=int, default=None, help="default: tasks.N_TRAIN per task")
    f.add_argument("--n-dev", type=int, default=128)
    f.add_argument("--n-test", type=int, default=512)
    f.add_argument("--knob", action="append", default=[], help="task.key=value (repeatable), see tasks.KNOBS")
    f.add_argument("--eval-batch", type=int, default=128, help="dev scoring batch")
    f.add_argument("--max-tokens", type=int, default=8192,
                   help="padded tokens per micro-batch: six fine-tunes share the GPU's memory (~5 GB of activations "
                        "each at 8192; the gradient is the full batch's)")
    f.add_argument("--time-budget", type=float, default=300.0, help="seconds for the whole call")
    f.add_argument("--train-budget", type=float, default=None,
                   help="seconds (from the call's start) by which every fine-tune is saved; default --time-budget")
    f.add_argument("--then-eval", action="store_true",
                   help="evaluate each task as soon as its fine-tune is saved, until --time-budget (parts tagged "
                        "'ft'; the eval options below apply)")
    f.add_argument("--reuse-finetunes", action="store_true",
                   help="keep a task's finished fine-tune in --workdir made with the same settings")
    f.add_argument("--base", type=Path, default=None, help="base checkpoint dir (default: the embedded SmolLM2)")
    f.add_argument("--device", default=None)
    f.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    e = sub.add_parser("eval", help="evaluate every task's fine-tune in parallel", formatter_class=ap.formatter_class)
    e.add_argument("--workdir", type=Path, required=True)
    e.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results" / "quality_parts")
    e.add_argument("--tasks", default="all")
    e.add_argument("--time-budget", type=float, default=540.0, help="seconds for the whole call")
    e.add_argument("--tag", default=None, help="part file suffix (default: a UTC time stamp)")
    e.add_argument("--device", default=None)
    for p in (f, e):
        add_eval_options(p)
    s = sub.add_parser("smoke", help="everything on CPU with a pico model", formatter_class=ap.formatter_class)
    s.add_argument("--out-dir", type=Path, required=True)
    s.add_argument("--methods", default="auto,dare,lowrank,deltadq",
                   help="labels (auto is skipped with a note where it is not registered)")
    s.add_argument("--time-budget", type=float, default=900.0)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--smoke"]:  # the spelling of the earlier run.py: `run.py --smoke [--out-dir DIR]`
        argv = ["smoke", *argv[1:]] + ([] if "--out-dir" in argv else ["--out-dir", "/tmp/quality-smoke"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return {"finetune": cmd_finetune, "eval": cmd_eval, "smoke": cmd_smoke}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
