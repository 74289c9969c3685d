"""compress-many: several fine-tunes of one base, compressed in parallel on a local process pool or a Ray cluster.

The work is the one `deltapack compress` does (deltapack.compress: plan -> per-unit encode -> assemble), cut into
tasks:

  plan      one task: reads every base tensor once for all fine-tunes still to do   -> .work/<ft>/plan.pkl
  prepare   per fine-tune: budgets + the method's prepare hook (calibration)        -> .work/<ft>/prepared.pkl
  encode    per unit key (a decoder layer, an embedding, ...): the unit of every fine-tune that has it, each base
            tensor read once for all of them                                         -> .work/<ft>/unit-XXXX.*
  assemble  per fine-tune, once its units are done: refine, shards, manifest         -> DIR/<ft>/ (atomic rename)

Every result is written atomically and checked before work is scheduled, so a run that is interrupted (crash,
SIGKILL, Ctrl-C, a lost Ray node) resumes when re-run with the same arguments: finished fine-tunes and units are not
redone. `.work/run.json` records the settings and input files; a re-run with other settings is refused.

Each DIR/<ft>/ holds the same files, byte for byte, as `deltapack compress BASE FT -o DIR/<ft>` (same method,
ratio, knobs, device type and torch thread count) writes, except the manifest's `created` time (set
SOURCE_DATE_EPOCH to make it equal too).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import json
import logging
import multiprocessing
import os
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from deltapack.errors import DeltapackError

log = logging.getLogger(__name__)

WORK = ".work"
FAIL_AFTER_ENV = "DELTAPACK_FAIL_AFTER_UNITS"  # test hook: the driver stops after this many encoded units


class RunInterrupted(DeltapackError):
    """The run stopped before finishing (test hook); re-running resumes it."""


# ---- fine-tune names ---------------------------------------------------------------------------------------------------
_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*$")


def parse_finetunes(items: list[str] | dict[str, str]) -> dict[str, str]:
    """`NAME=PATH` or `PATH` (name: the directory name, or the hub repo name) -> {name: path}."""
    if isinstance(items, dict):
        pairs = list(items.items())
    else:
        pairs = []
        for it in items:
            if "=" in it and not Path(it).exists():
                name, path = it.split("=", 1)
            else:
                path = it
                name = Path(str(it).split("@", 1)[0].rstrip("/")).name
            pairs.append((name.strip(), path.strip()))
    out: dict[str, str] = {}
    for name, path in pairs:
        if not _NAME_RE.match(name):
            raise DeltapackError(f"fine-tune name {name!r} is not usable as a directory name (use NAME=PATH)")
        if name in out:
            raise DeltapackError(f"two fine-tunes are named {name!r}: name them with NAME=PATH")
        out[name] = path
    if not out:
        raise DeltapackError("no fine-tunes given")
    return out


# ---- tasks (top-level functions: they run in pool processes and Ray workers) --------------------------------------------
def _atomic_pickle(path: Path, obj) -> None:
    from deltapack.io.writer import write_bytes_atomic

    write_bytes_atomic(path, pickle.dumps(obj, protocol=5))


_PREP_CACHE: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
PREP_CACHE_SIZE = 8  # prepared plans kept per worker process (a task usually needs every fine-tune's)


def _load_prepared(work_ft: Path):
    p = Path(work_ft) / "prepared.pkl"
    st = p.stat()
    key = (str(p), st.st_mtime_ns, st.st_size, st.st_ino)
    if key in _PREP_CACHE:
        _PREP_CACHE.move_to_end(key)
    else:
        _PREP_CACHE[key] = pickle.loads(p.read_bytes())
        while len(_PREP_CACHE) > PREP_CACHE_SIZE:
            _PREP_CACHE.popitem(last=False)
    return _PREP_CACHE[key]


def _unit_cache(work_ft: Path, prep, index: int) -> bytes:
    blob = prep.unit_caches[index]
    return blob if blob is not None else (Path(work_ft) / f"state-{index:04d}.pkl").read_bytes()


def task_plan(base, fts: list[tuple[str, Any, str]], device: str, threads: int) -> list[str]:
    """Plan pass for [(name, source, work dir)]: one read of the base for all of them."""
    from deltapack.compress import pinned_threads, plan_pass, resolve_device

    with pinned_threads(threads):
        plans = plan_pass(base, [s for _, s, _ in fts], resolve_device(device), False)
    for (name, _, work), plan in zip(fts, plans):
        Path(work).mkdir(parents=True, exist_ok=True)
        _atomic_pickle(Path(work) / "plan.pkl", plan)
    return [n for n, _, _ in fts]


def task_prepare(name: str, base, ft, work: str, settings: dict, device: str, threads: int, log_path: str) -> tuple[str, int]:
    from deltapack.compress import append_line, check_settings, pinned_threads, prepare_finetune, resolve_device

    work_p = Path(work)
    plan = pickle.loads((work_p / "plan.pkl").read_bytes())
    m, ratio = check_settings(settings["method"], settings["ratio"], settings["params"], settings["calib"])
    from deltapack.io.writer import write_bytes_atomic

    def spill(index: int, blob: bytes) -> None:  # calibration state of a unit: to disk, not into prepared.pkl
        write_bytes_atomic(work_p / f"state-{index:04d}.pkl", blob)

    with pinned_threads(threads):
        prep = prepare_finetune(m, settings["method"], ratio, settings["calib"], base, ft, plan,
                                resolve_device(device), False, spill=spill)
    _atomic_pickle(work_p / "prepared.pkl", prep)  # last: marks the fine-tune prepared
    append_line(Path(log_path), f"prepare {name} units={len(prep.units)}")
    return name, len(prep.units)


def task_encode(base, items: list[tuple[str, Any, str, int]], device: str, threads: int, log_path: str) -> list[tuple[str, int]]:
    """Encode one unit key for several fine-tunes: items = [(name, source, work dir, unit index)]."""
    from deltapack.compress import encode_units, pinned_threads, resolve_device, unit_done, unit_job

    jobs = []
    for name, ft, work, index in items:
        if unit_done(Path(work), index):  # finished by an earlier attempt (Ray retry, overlapping run)
            continue
        prep = _load_prepared(Path(work))
        jobs.append(unit_job(prep, index, ft, Path(work), _unit_cache(Path(work), prep, index), label=name))
    if not jobs:
        return []
    with pinned_threads(threads):
        return encode_units(jobs, base, resolve_device(device), log_path=Path(log_path))


def task_assemble(name: str, base, ft, work: str, out: str, device: str, threads: int, max_shard_bytes: int,
                  created: str | None, log_path: str) -> tuple[str, float]:
    from deltapack.compress import append_line, assemble, pinned_threads, resolve_device
    from deltapack.io.writer import AtomicDir

    prep = _load_prepared(Path(work))
    with pinned_threads(threads), AtomicDir(out, overwrite=True) as tmp:
        ratio = assemble(prep, base, ft, Path(work), tmp, device=resolve_device(device), max_shard_bytes=max_shard_bytes,
                         progress=False, created=created, out_label=out)
    shutil.rmtree(work, ignore_errors=True)
    append_line(Path(log_path), f"assemble {name} ratio={ratio:.3f}")
    return name, ratio


# ---- backends ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Job:
    kind: str  # plan | prepare | encode | assemble
    fn: Callable
    args: tuple
    info: Any = None


def _die_with_parent(parent_pid: int) -> None:
    """A pool process whose driver is killed (SIGKILL) would wait on its task queue forever: have the kernel end it
    with the driver (Linux), and end now if the driver is already gone."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _pool_init(counter, gpus: list[str], parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    # each pool process takes the next GPU, round robin, before CUDA is initialised in it
    with counter.get_lock():
        idx = counter.value
        counter.value += 1
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[idx % len(gpus)]


class InlineBackend:
    """The same tasks run one after another in this process (workers=0): for debugging and small runs."""

    name = "inline"

    def submit(self, job: _Job):
        f: cf.Future = cf.Future()
        try:
            f.set_result(job.fn(*job.args))
        except BaseException as e:  # noqa: BLE001 - surfaced by result()
            f.set_exception(e)
        return f

    def wait(self, handles: list) -> list:
        return list(handles)

    def result(self, h):
        return h.result()

    def drain(self, handles: list, interrupted: bool) -> None:
        pass

    def close(self, interrupted: bool = False) -> None:
        pass


class PoolBackend:
    """Local processes (spawn: no forked CUDA or torch thread pools)."""

    name = "pool"

    def __init__(self, workers: int, gpus: list[str]):
        ctx = multiprocessing.get_context("spawn")
        self.workers = workers
        self.ex = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_pool_init,
                                         initargs=(ctx.Value("i", 0), gpus, os.getpid()))

    def submit(self, job: _Job):
        return self.ex.submit(job.fn, *job.args)

    def wait(self, handles: list) -> list:
        done, _ = cf.wait(handles, return_when=cf.FIRST_COMPLETED)
        return list(done)

    def result(self, h):
        return h.result()

    def drain(self, handles: list, interrupted: bool) -> None:
        for h in handles:
            h.cancel()  # not yet started: dropped; running: finishes (its result is written atomically)
        if not interrupted:
            cf.wait(handles)

    def close(self, interrupted: bool = False) -> None:
        self.ex.shutdown(wait=not interrupted, cancel_futures=True)


class RayBackend:
    """Ray tasks with CPU/GPU resources; system failures (a lost worker or node) are retried by Ray."""

    name = "ray"

    def __init__(self, cpus: float, gpus: float, retries: int):
        import ray

        self.ray = ray
        self.opts = {"num_cpus": cpus, "num_gpus": gpus, "max_retries": retries, "retry_exceptions": False}
        self._remote: dict[Callable, Any] = {}

    def submit(self, job: _Job):
        r = self._remote.get(job.fn)
        if r is None:
            r = self._remote[job.fn] = self.ray.remote(job.fn)
        opts = dict(self.opts)
        if job.kind == "plan":
            opts["num_gpus"] = min(opts["num_gpus"], 1) if opts["num_gpus"] else 0
        return r.options(**opts).remote(*job.args)

    def wait(self, handles: list) -> list:
        ready, _ = self.ray.wait(handles, num_returns=1)
        return ready

    def result(self, h):
        try:
            return self.ray.get(h)
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from None
            raise

    def drain(self, handles: list, interrupted: bool) -> None:
        if interrupted:
            for h in handles:
                self.ray.cancel(h, force=True)
            return
        self.ray.wait(handles, num_returns=len(handles))  # let running tasks finish writing their results

    def close(self, interrupted: bool = False) -> None:
        pass


def _drive(backend, queue: collections.deque, window: int, on_done: Callable[[_Job, Any], None]) -> None:
    """Keep up to `window` jobs in flight; `on_done` may queue more. On any error, jobs in flight are allowed to
    finish (their results are atomic and count on resume) before the error propagates."""
    inflight: dict[Any, _Job] = {}
    try:
        while queue or inflight:
            while queue and len(inflight) < window:
                job = queue.popleft()
                inflight[backend.submit(job)] = job
            for h in backend.wait(list(inflight)):
                job = inflight.pop(h)
                on_done(job, backend.result(h))
    except KeyboardInterrupt:
        backend.drain(list(inflight), interrupted=True)
        raise
    except BaseException:
        try:
            backend.drain(list(inflight), interrupted=False)
        except Exception as e:  # the first error is the one to report
            log.debug("while draining after an error: %s", e)
        raise


# ---- the driver -------------------------------------------------------------------------------------------------------
def _input_identity(src) -> list:
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in src.weight_files]


def _check_run_file(path: Path, record: dict) -> None:
    """Resume only what these settings and inputs started; write the record for a new run."""
    if path.is_file():
        old = json.loads(path.read_text())
        if old == record:
            return
        if any(path.parent.glob("*/prepared.pkl")):
            diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
            raise DeltapackError(
                f"{path.parent} holds an unfinished run with other settings or inputs ({', '.join(diff)}); "
                "re-run with the same arguments to resume it, or pass --restart to discard it"
            )
        # nothing settings-dependent was made yet (e.g. the last run stopped at an unreachable ratio): start over
        shutil.rmtree(path.parent)
    from deltapack.io.writer import write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)


def _finished(out: Path, settings: dict, ft_id: str) -> bool:
    """True when out/ holds a finished delta made with these settings; an unrelated directory is an error."""
    from deltapack.format.manifest import MANIFEST_NAME, Manifest

    if not out.exists():
        return False
    if not (out / MANIFEST_NAME).is_file():
        raise DeltapackError(f"{out} exists and is not a delta directory (pass --overwrite to replace it)")
    man = Manifest.load(out / MANIFEST_NAME)
    same = man.method == settings["method"] and man.target_ratio == settings["target_ratio"] and man.finetuned.id == ft_id
    if same and settings["method_params"] is not None:
        same = man.method_params == settings["method_params"]
    if not same:
        raise DeltapackError(f"{out} holds a delta made with other settings or from another model (pass --overwrite to replace it)")
    return True


def compress_many(
    base: str | os.PathLike,
    finetunes: list[str] | dict[str, str],
    out_dir: str | os.PathLike,
    *,
    method: str = "lowrank",
    ratio: float | None = None,
    params: dict | None = None,
    calib: str | None = None,
    device: str = "auto",
    max_shard_bytes: int = 1 << 30,
    trust_remote_code: bool = False,
    ray: str | bool | None = None,
    workers: int | None = None,
    threads: int | None = None,
    gpus_per_task: float | None = None,
    fts_per_task: int | None = None,
    retries: int = 2,
    overwrite: bool = False,
    restart: bool = False,
    progress: bool = True,
) -> dict:
    """Compress every fine-tune against `base` into `out_dir/<name>/`. `ray`: None/False = local process pool,
    True = the current Ray session (or a new local one), "auto" or an address = `ray.init(address=...)`.
    `workers`: tasks in flight (local pool: processes; 0 = run the tasks in this process, one after another).
    Returns a summary: outputs, units encoded / skipped (finished earlier), seconds."""
    from tqdm.auto import tqdm

    from deltapack.compress import check_settings, created_stamp, encode_threads, resolve_device, unit_done
    from deltapack.io.sources import open_model

    t_start = time.perf_counter()
    names = parse_finetunes(finetunes)
    m, ratio = check_settings(method, ratio, params, calib)
    out_dir = Path(out_dir).resolve()
    from deltapack.io.writer import guard_output

    inputs = (base, calib, *names.values())
    guard_output(out_dir, *inputs)  # before anything is removed: --overwrite/--restart must never delete an input
    for n in names:
        guard_output(out_dir / n, *inputs)
    work_root = out_dir / WORK
    if (restart or overwrite) and work_root.exists():
        shutil.rmtree(work_root)
    bsrc = open_model(base, trust_remote_code=trust_remote_code)
    fsrcs = {n: open_model(p, trust_remote_code=trust_remote_code) for n, p in names.items()}
    threads = int(threads or encode_threads())
    settings = {"method": method, "ratio": ratio, "params": params or {}, "calib": calib}
    check = {"method": method, "target_ratio": ratio, "method_params": m.describe_params()}

    todo = []
    for n, src in fsrcs.items():
        if overwrite or not _finished(out_dir / n, check, src.model_id):
            todo.append(n)
    summary: dict[str, Any] = {
        "outputs": {n: str(out_dir / n) for n in names},
        "finished_before": [n for n in names if n not in todo],
        "encoded_units": [],
        "skipped_units": [],
        "backend": None,
        "threads": threads,
    }
    if not todo:
        summary["seconds"] = time.perf_counter() - t_start
        return summary

    work_root.mkdir(parents=True, exist_ok=True)
    record = {
        "deltapack": __import__("deltapack").__version__,
        "settings": settings,
        "threads": threads,
        "device": device,
        "max_shard_bytes": max_shard_bytes,
        "base": _input_identity(bsrc),
        "finetunes": {n: _input_identity(fsrcs[n]) for n in todo},
    }
    _check_run_file(work_root / "run.json", record)
    log_path = str(work_root / "units.log")
    work = {n: work_root / n for n in todo}

    # ---- backend and resources ----
    if ray:
        try:
            import ray as _ray
        except ImportError as e:
            raise DeltapackError('--ray needs Ray: pip install "ray[default]" (or deltapack[ray])') from e

        if not _ray.is_initialized():
            if ray is True:  # a local cluster for this run only: no dashboard (it slows the start)
                _ray.init(include_dashboard=False, log_to_driver=False)
            else:
                _ray.init(address=str(ray), log_to_driver=False)
        res = _ray.cluster_resources()
        has_gpu = res.get("GPU", 0) > 0
        if device == "auto":
            device = "cuda" if has_gpu else "cpu"
        if device.startswith("cuda") and not has_gpu:
            raise DeltapackError("--device cuda asked for, but the Ray cluster has no GPU")
        gpt = (gpus_per_task or 1.0) if device.startswith("cuda") else 0.0
        cpt = 1.0 if gpt else float(min(threads, max(1, int(res.get("CPU", 1)))))
        slots = int(res.get("GPU", 0) // gpt) if gpt else int(res.get("CPU", 1) // cpt)
        window = workers or max(1, slots)
        backend = RayBackend(cpt, gpt, retries)
        device = "cuda" if device.startswith("cuda") else device  # a Ray task sees its own GPUs from index 0
    else:
        dev = resolve_device(device)
        device = str(dev)
        gpus: list[str] = []
        if dev.type == "cuda":
            import torch

            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = [g.strip() for g in visible.split(",")] if visible else [str(i) for i in range(torch.cuda.device_count())]
            if dev.index is None and len(ids) > 1:
                gpus, device = ids, "cuda"
        if workers is None:
            workers = max(1, 2 * max(1, len(gpus))) if dev.type == "cuda" else max(1, (os.cpu_count() or 1) // threads)
        window = max(1, workers)
        backend = PoolBackend(workers, gpus) if workers > 0 else InlineBackend()
    summary["backend"] = backend.name
    summary["workers"] = window
    log.info("compress-many: %d fine-tunes on %s (%d in flight, %d threads each, device %s)", len(todo), backend.name, window, threads, device)

    fail_after = int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)
    created = created_stamp()
    pbar = tqdm(desc=f"compress-many [{method}]", unit="unit", disable=not progress)
    state = {"prepared": set(), "units_left": {}, "encoded": 0}

    def queue_encodes(q: collections.deque) -> None:
        """Once every fine-tune is prepared: one encode job per (unit key, chunk of fine-tunes), skipping finished
        units; fine-tunes with nothing left go straight to assembly."""
        by_key: dict[str, list] = {}
        total = 0
        for n in todo:
            prep = _load_prepared(work[n])
            left = set()
            for u in prep.units:
                if unit_done(work[n], u.index):
                    summary["skipped_units"].append((n, u.index))
                    continue
                left.add(u.index)
                by_key.setdefault(u.key, []).append((n, fsrcs[n], str(work[n]), u.index))
            state["units_left"][n] = left
            total += len(prep.units)
        pbar.reset(total=total)
        pbar.update(len(summary["skipped_units"]))
        chunk = fts_per_task or len(todo)
        for key, items in by_key.items():
            for i in range(0, len(items), chunk):
                part = items[i:i + chunk]
                q.append(_Job("encode", task_encode, (bsrc, part, device, threads, log_path), key))
        for n in todo:
            if not state["units_left"][n]:
                q.append(assemble_job(n))

    def assemble_job(n: str) -> _Job:
        return _Job("assemble", task_assemble, (n, bsrc, fsrcs[n], str(work[n]), str(out_dir / n), device, threads,
                                                max_shard_bytes, created, log_path), n)

    def on_done(job: _Job, result) -> None:
        if job.kind == "plan":
            queue.extend(_Job("prepare", task_prepare, (n, bsrc, fsrcs[n], str(work[n]), settings, device, threads, log_path), n)
                         for n in todo if not (work[n] / "prepared.pkl").is_file())
            if all((work[n] / "prepared.pkl").is_file() for n in todo):
                queue_encodes(queue)
        elif job.kind == "prepare":
            state["prepared"].add(result[0])
            if all((work[n] / "prepared.pkl").is_file() for n in todo):
                queue_encodes(queue)
        elif job.kind == "encode":
            for n, idx in result:
                summary["encoded_units"].append((n, idx))
                state["units_left"][n].discard(idx)
                pbar.update(1)
                state["encoded"] += 1
                if not state["units_left"][n]:
                    queue.append(assemble_job(n))
            if fail_after and state["encoded"] >= fail_after:
                raise RunInterrupted(f"stopped after {state['encoded']} units ({FAIL_AFTER_ENV}); re-run to resume")
        elif job.kind == "assemble":
            summary.setdefault("true_ratio", {})[result[0]] = result[1]

    queue: collections.deque = collections.deque()
    need_plan = [n for n in todo if not (work[n] / "prepared.pkl").is_file() and not (work[n] / "plan.pkl").is_file()]
    if need_plan:
        queue.append(_Job("plan", task_plan, (bsrc, [(n, fsrcs[n], str(work[n])) for n in need_plan], device, threads), None))
    else:
        on_done(_Job("plan", task_plan, ()), None)
    interrupted = False
    try:
        _drive(backend, queue, window, on_done)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        pbar.close()
        backend.close(interrupted)
    shutil.rmtree(work_root, ignore_errors=True)
    summary["seconds"] = time.perf_counter() - t_start
    return summary
