"""compress: fine-tune − base → a delta directory at a target TRUE ratio.

The pipeline is the package: `plan.py` (1), `encode.py` (2), `assemble.py` (3); `context.py` holds what a run
shares (device, threads, phase timing, the method's view `CompressContext`).

Three steps, shared by `deltapack compress` (one fine-tune, in this process) and `deltapack compress-many` (many
fine-tunes, units spread over a process pool or a Ray cluster), so both write the same bytes by construction:

  1. plan (global, per fine-tune): open the checkpoints lazily, check they belong together; one pass reads each
     base tensor once and, for every fine-tune, the matching tensor: equal tensors are dropped, per-tensor
     statistics gathered, the base fingerprint hashed from the bytes read. Then the budget: (dense bf16 bytes of the
     changed tensors) / ratio, less the metadata the directory will need, split over tensors by the method's
     allocator (an unreachable ratio fails here, before any work), and the method's `prepare` hook (e.g.
     calibration statistics). The result, `Prepared`, is split into a common part and one slice per unit.
  2. encode, unit by unit (a unit = one decoder layer's tensors, or one embedding/head, or the small rest): a pure
     function of the plan and the unit's tensors. Each unit starts from a fresh copy of the plan's state (method
     object, budgets, calibration cache), so no state flows between units and their order or placement cannot
     change the bytes. Results go to `WORK/unit-XXXX.safetensors` + `unit-XXXX.json` (the JSON, written last and
     atomically, marks the unit finished: an interrupted run resumes from there).
  3. assemble: the optional whole-model `refine` pass, then every tensor's parts streamed into bounded shards of a
     temp directory (hashed as written), manifest + card last, the true ratio measured on disk, rename into place.

Memory: a few tensors (plus the method's own state: calibration statistics, which `prepare` collects layer by layer,
and, for methods with `refine`, the encoded tensors it needs at once — BitDelta's scale distillation holds every
sign plane, 1/16 of the model in bf16). Tensors are read by byte range (`io.safetensors_file`), never whole shards.

Determinism: CPU reductions depend on the torch thread count, so the plan and every unit run with the same fixed
number of torch threads: 1, or `DELTAPACK_THREADS` if set. `threads` (`compress --threads N`) encodes N units at once
in worker processes (on a CPU run), each with that same torch thread count: the bytes written do not depend on N.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from deltapack.compress.assemble import UnitResults, assemble
from deltapack.compress.context import (
    CompressContext, PhaseTimes, add_phase, created_stamp, encode_threads, phase, pinned_threads, record_phases,
    resolve_device,
)
from deltapack.compress.encode import UNIT_FILE, UnitJob, append_line, encode_units, unit_done, unit_job
from deltapack.compress.plan import (
    Plan, Prepared, Unit, base_fingerprint, check_pair, check_settings, combine_fingerprint, make_units, plan_one, plan_pass,
    prepare_finetune, tensor_digest, tensor_kind,
)
from deltapack.errors import DeltapackError
from deltapack.io.sources import open_model
from deltapack.io.writer import AtomicDir, guard_output

log = logging.getLogger("deltapack.compress")

__all__ = [
    "CompressContext", "PhaseTimes", "Plan", "Prepared", "UNIT_FILE", "Unit", "UnitJob", "UnitResults", "add_phase",
    "append_line", "assemble", "base_fingerprint", "check_pair", "check_settings", "combine_fingerprint", "compress",
    "created_stamp", "encode_threads", "encode_units", "make_units", "phase", "pinned_threads", "plan_pass",
    "prepare_finetune", "record_phases", "resolve_device", "tensor_digest", "tensor_kind", "unit_done", "unit_job",
]


# ---- the one-fine-tune driver ---------------------------------------------------------------------------------------
def compress(
    base: str | os.PathLike,
    finetuned: str | os.PathLike,
    out: str | os.PathLike,
    *,
    method: str = "auto",
    ratio: float | None = None,
    params: dict | None = None,
    calib: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    max_shard_bytes: int = 1 << 30,
    trust_remote_code: bool = False,
    progress: bool = True,
    heal: bool | dict | None = None,
    threads: int | None = None,
) -> Path:
    """Compress `finetuned` against `base` into the delta directory `out`. Returns the directory path.
    `heal`: True (or a dict of calib.heal.HealConfig settings) trains the delta's float parts against the fine-tune
    after encoding. `threads`: units encoded at once, in worker processes on a CPU run (default 1: in this process);
    the output bytes are the same for any value."""
    from deltapack.calib.heal import HealConfig

    if threads is not None and threads < 1:
        raise DeltapackError(f"--threads must be at least 1 (got {threads})")

    m, ratio = check_settings(method, ratio, params, calib)
    heal_cfg = HealConfig.from_value(heal)
    if heal_cfg is not None and m.lossless:
        raise DeltapackError(f"{method} is lossless: there is nothing to heal")
    out = Path(out)
    guard_output(out, base, finetuned, calib)
    if out.exists() and not overwrite:
        raise DeltapackError(f"output {out} already exists (pass --overwrite to replace it)")

    dev = resolve_device(device)
    bsrc = open_model(base, trust_remote_code=trust_remote_code)
    fsrc = open_model(finetuned, trust_remote_code=trust_remote_code)
    with pinned_threads(encode_threads()):
        with phase("plan", dev):
            plan = plan_one(bsrc, fsrc, dev, progress)
        with phase("prepare", dev):
            prep = prepare_finetune(m, method, ratio, calib, bsrc, fsrc, plan, dev, progress, keep_live=True,
                                    heal=heal_cfg)
        created = created_stamp()
        with AtomicDir(out, overwrite=overwrite, inputs=(base, finetuned, calib, bsrc.path, fsrc.path)) as tmp:
            work = tmp / ".work"
            pbar = tqdm(total=len(prep.todo), desc=f"compress [{method}]", disable=not progress)
            t0 = time.perf_counter()
            with phase("encode", dev):
                workers = min(threads or 1, len(prep.units)) if dev.type == "cpu" else 1
                if workers > 1:
                    _encode_in_processes(prep, fsrc, bsrc, work, workers, lambda n: pbar.update(n))
                else:
                    for u in prep.units:
                        encode_units([unit_job(prep, u.index, fsrc, work)], bsrc, dev, on_tensor=lambda: pbar.update(1))
            pbar.close()
            log.debug("encoded %d units in %.1f s", len(prep.units), time.perf_counter() - t0)
            with phase("assemble", dev):
                assemble(prep, bsrc, fsrc, work, tmp, device=dev, max_shard_bytes=max_shard_bytes,
                         progress=progress, created=created, out_label=out)
    return Path(out)



# ---- units in worker processes (compress --threads N on a CPU) -------------------------------------------------------
_WORKER: dict = {}


def _worker_init(prep: Prepared, fsrc, bsrc, work: Path, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    _WORKER.update(prep=prep, fsrc=fsrc, bsrc=bsrc, work=work)


def _worker_encode(index: int) -> int:
    import torch

    w = _WORKER
    encode_units([unit_job(w["prep"], index, w["fsrc"], w["work"])], w["bsrc"], torch.device("cpu"))
    return len(w["prep"].units[index].names)


def _encode_in_processes(prep: Prepared, fsrc, bsrc, work: Path, workers: int, on_done) -> None:
    """Encode every unit of `prep` in `workers` spawned processes; each unit is a pure function of the plan and its
    tensors, written to its own files, so the order and placement change nothing in the output."""
    import concurrent.futures as cf
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                initargs=(prep, fsrc, bsrc, work, encode_threads())) as ex:
        futs = [ex.submit(_worker_encode, u.index) for u in prep.units]
        try:
            for f in cf.as_completed(futs):
                on_done(f.result())
        except BaseException:
            for f in futs:
                f.cancel()
            raise
