"""Compression time and peak GPU memory of every method on a Llama-2-7B-shaped base/fine-tune pair.

Path measured: the real one. A synthetic pair is written once as sharded bf16 safetensors checkpoints (HF layout,
config, a word-level tokenizer so calibration-based methods can tokenize text), then each method runs through
`deltapack.api.compress(base_dir, ft_dir, out, device="cuda")`: planning pass, fingerprint, budget, per-tensor
encode, atomic write, exactly as a user's run. Seconds are wall time of that call; peak GPU memory is
torch.cuda.max_memory_allocated over it. The delta directory is deleted after its size is read.

Synthetic weights (Llama-2-7B shapes: 32 layers of q,k,v,o 4096x4096, gate/up 11008x4096, down 4096x11008, embeddings
and lm_head 32000x4096, RMSNorm vectors): base ~ N(0, 0.02^2); each matrix delta = A diag(s) B with A, B Gaussian
(near-orthogonal columns), s_i ∝ i^-0.5 over the full rank (a long-tailed spectrum like real full fine-tunes), scaled
to an RMS of 1e-3 (5% of the weights' RMS), plus 10% i.i.d. noise; norm vectors get small dense deltas. Each tensor
is generated from its own seed on the compute device, so the pair is the same on every run.

Disk: two checkpoints of 13.5 GB (27 GB) in --workdir, kept there and reused while the machine stays warm (a marker
file records the shape); the one delta dir at a time is small except raw (13.5 GB, off by default).

Per method the record also holds where the time and memory went: `phases` (seconds per phase of compress: plan =
read + sha256 fingerprint + norms, prepare = budget + the method's prepare hook, e.g. prepare.calibration, encode
with sub-phases such as encode.svd / encode.quantize_a / encode.quantize_b / encode.wait_read, assemble = refine +
write; phase edges synchronise the GPU while recording), `phase_peak_rss_gb` (sampled every 50 ms), `peak_rss_gb`
(the kernel's high-water mark for this method alone: reset before it via /proc/self/clear_refs) and the RSS left
after it before and after malloc_trim (what the allocator keeps). `--gptq-check` first runs GPTQ on 7B-shaped
factors through the torch column loop and the Triton kernel and records whether they agree bit for bit, and both
times.

    python bench/quality/timing_7b.py --methods lowrank,bitdelta,dare --out bench/results/quality_parts/timing-7b-1.json
    python bench/quality/timing_7b.py --smoke --out /tmp/timing-smoke.json     # CPU, 2 layers of hidden 256
    python bench/quality/timing_7b.py --shape mid --device cpu --methods delta-come-optimal   # CPU profiling size

On one H100, in calls of at most 10 minutes (the pair is written by the first call, ~40-60 s, and reused while the
machine stays warm; each call checks the time budget before starting a method):
    1. --gptq-check --count-ops --methods delta-come-optimal,delta-come-paper
    2. --methods lowrank,bitdelta,dare,deltadq
    3. --methods bitdelta-distill            (two full models in memory and 200 training steps: alone, or --layers 8)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import inspect
import json
import logging
import math
import os
import resource
import shutil
import sys
import threading
import time
import traceback
import dataclasses
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ALIASES, RESULTS, Budget, command_line, device_name, now_iso, select_methods, write_json  # noqa: E402

from deltapack.scale.synthetic import LLAMA2_7B, LlamaShape, write_checkpoints  # noqa: E402

log = logging.getLogger("bench.timing7b")

DEFAULT_METHODS = "auto,auto+heal,lowrank,bitdelta,dare,delta-come,deltadq,bitdelta-distill"


MID = LlamaShape(hidden=1024, inter=2816, layers=4, vocab=8192, heads=16, kv_heads=16)  # CPU profiling (~1/100 of 7B)
SMOKE = LlamaShape(hidden=256, inter=688, layers=2, vocab=2048, heads=4, kv_heads=4)
SHAPES = {"7b": LLAMA2_7B, "mid": MID, "smoke": SMOKE}


# ---- memory -----------------------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0): the next peak_rss() is this process's peak from now."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """VmHWM (bytes) of this process; ru_maxrss when /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def malloc_trim() -> bool:
    """Give free heap memory back to the OS (glibc): RSS that drops here was allocator fragmentation, not data."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


class RssSampler:
    """Samples this process's RSS every `interval` seconds in a daemon thread; peak over any time span."""

    def __init__(self, interval: float = 0.05):
        self.samples: list[tuple[float, int]] = []  # (perf_counter, bytes); appends are atomic
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), rss_bytes()))
            time.sleep(interval)

    def peak(self, t0: float, t1: float) -> int:
        """Highest sample in [t0, t1], or the first one after it for a span shorter than the interval."""
        inside = [r for t, r in self.samples if t0 <= t <= t1]
        if inside:
            return max(inside)
        return next((r for t, r in self.samples if t > t1), 0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


def cache_tensor_bytes(cache: dict) -> dict[str, dict[str, float]]:
    """{key: {device: GB}} of the tensors each compress-cache entry holds (nested dicts/lists/objects' __dict__): what
    is still resident when healing starts."""
    def walk(x, out: dict, seen: set, depth: int = 0) -> None:
        if id(x) in seen or depth > 6:
            return
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            out[str(x.device)] = out.get(str(x.device), 0) + x.numel() * x.element_size()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v, out, seen, depth + 1)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v, out, seen, depth + 1)
        elif isinstance(x, torch.nn.Module):
            for t in list(x.parameters()) + list(x.buffers()):
                walk(t, out, seen, depth + 1)
        elif hasattr(x, "__dict__"):
            walk(vars(x), out, seen, depth + 1)

    res = {}
    for k, v in cache.items():
        out: dict[str, int] = {}
        walk(v, out, set())
        if out:
            res[str(k)] = {d: round(b / 1e9, 4) for d, b in out.items()}
    return res


class HealProbe:
    """Wraps deltapack.calib.heal.heal (assemble imports it at call time) to record what healing itself costs: RSS on
    entry, the kernel's RSS high-water mark over the call alone (reset on entry), and on CUDA the allocated bytes on
    entry and torch.cuda.max_memory_allocated over the call. `--heal-steps` bounds the steps (the peak comes in the
    first step; later steps repeat it)."""

    def __init__(self, steps: int | None):
        self.steps = steps
        self.records: list[dict] = []

    def __enter__(self) -> "HealProbe":
        import deltapack.calib.heal as heal_mod

        self._mod, self._orig = heal_mod, heal_mod.heal

        def probed(encoded, ctx, cfg, fit=None):
            if self.steps is not None:
                cfg = dataclasses.replace(cfg, steps=self.steps)
            cuda = ctx.device.type == "cuda"
            gc.collect()
            malloc_trim()
            rss0, reset = rss_bytes(), reset_peak_rss()
            if cuda:
                torch.cuda.synchronize()
                gpu0 = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            out, error = (encoded, {}), None
            try:
                out = self._orig(encoded, ctx, cfg, fit=fit)
            except BaseException as e:  # an OOM inside healing: its peak is the point of the probe
                error = f"{e.__class__.__name__}: {e}"[:300]
                raise
            finally:
                rec = {"rss_entry_gb": round(rss0 / 1e9, 3), "heal_steps": out[1].get("steps_done"),
                       "heal_seconds": out[1].get("seconds"), "mask_memo": out[1].get("mask_memo"),
                       "fit_reused": fit is not None,
                       "ctx_cache_gb": cache_tensor_bytes(ctx.cache)}
                if error:
                    rec["error"] = error
                if reset:
                    hwm = peak_rss()
                    rec |= {"rss_peak_gb": round(hwm / 1e9, 3), "rss_heal_extra_gb": round((hwm - rss0) / 1e9, 3)}
                if cuda:
                    torch.cuda.synchronize()
                    peak = torch.cuda.max_memory_allocated()
                    rec |= {"gpu_entry_gb": round(gpu0 / 1e9, 3), "gpu_peak_gb": round(peak / 1e9, 3),
                            "gpu_heal_extra_gb": round((peak - gpu0) / 1e9, 3)}
                rec |= {k: out[1][k] for k in ("micro_batch", "layers", "trainable", "applied", "kl_before", "kl_after")
                        if k in out[1]}
                self.records.append(rec)
                log.info("heal probe: %s", rec)
            return out

        heal_mod.heal = probed
        return self

    def __exit__(self, *exc) -> None:
        self._mod.heal = self._orig


# ---- GPTQ backends on 7B-shaped factors ----------------------------------------------------------------------------------
def gptq_check(device: torch.device, small: bool) -> dict:
    """GPTQ of delta-come-like factors through the torch column loop and the Triton kernel: equal codes, scales and
    dequantized values (bit for bit), and the seconds of each. 7B shapes on CUDA; tiny ones under --smoke (the
    Triton side then needs TRITON_INTERPRET=1, else it is reported as unavailable)."""
    from deltapack.quant import gptq_triton
    from deltapack.quant.gptq import gptq_quantize, output_error

    out = []
    reason = gptq_triton.unavailable_reason(device)
    # whether torch's addcmul / addr_ round a*b+c once on this device (the kernel copies it)
    fused_deq, fused_update = gptq_triton.torch_rounding(str(device))
    # (label, rows, cols, grid, group size, act-order): A of q (800 pairs x 4096 inputs), A of down (1500 x 11008),
    # B of q (4096 outputs x 800 pairs, one grid per column), per-128 groups, dynamic grids (no act-order)
    cases = [("A q_proj", 800, 4096, "row", None, True), ("A down_proj", 1500, 11008, "row", None, True),
             ("B q_proj", 4096, 800, "col", None, False), ("A q_proj g128", 800, 4096, "row", 128, True),
             ("A q_proj g128 no act-order", 800, 4096, "row", 128, False)]
    if small:
        cases = [("A", 40, 256, "row", None, True), ("B", 256, 40, "col", None, False),
                 ("A g64 no act-order", 40, 256, "row", 64, False)]
    for label, rows, cols, grid, gs, act in cases:
        g = torch.Generator(device=device).manual_seed(rows * 7 + cols)
        W = torch.randn(rows, cols, generator=g, device=device) * 0.01
        X = torch.randn(4 * cols, cols, generator=g, device=device) * torch.rand(cols, generator=g, device=device)
        H = X.T @ X / X.shape[0]
        del X
        n_units = rows if grid == "row" else cols
        widths = torch.tensor([8, 4, 3, 2, 1], device=device)
        bits = widths[torch.randint(0, 5, (n_units,), generator=g, device=device)]
        order = torch.argsort(bits, stable=True) if grid == "col" else None
        kw = dict(group_size=gs, grid=grid, order=order, act_order=act)
        rec = {"case": label, "shape": [rows, cols], "grid": grid, "group_size": gs, "act_order": act}

        def timed(backend: str):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = gptq_quantize(W, H, bits, backend=backend, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return r, time.perf_counter() - t0

        ref, rec["torch_s"] = timed("torch")
        rec["output_error_torch"] = output_error(W, ref.dequantized, H)
        if reason:
            rec["triton"] = f"unavailable: {reason}"
            out.append(rec)
            continue
        try:
            _, rec["triton_first_s"] = timed("triton")  # includes compiling the kernel
            tri, rec["triton_s"] = timed("triton")
        except Exception as e:
            rec["triton"] = f"error: {e.__class__.__name__}: {e}"[:400]
            out.append(rec)
            continue
        rec["output_error_triton"] = output_error(W, tri.dequantized, H)
        rec["codes_equal"] = bool(torch.equal(ref.codes, tri.codes))
        rec["codes_differing"] = int((ref.codes != tri.codes).sum())
        rec["scales_equal"] = bool(torch.equal(ref.scale, tri.scale) and torch.equal(ref.zero, tri.zero))
        rec["dequantized_equal"] = bool(torch.equal(ref.dequantized, tri.dequantized))
        rec["max_abs_diff"] = float((ref.dequantized - tri.dequantized).abs().max())
        out.append(rec)
        log.info("gptq check %s: torch %.2f s, triton %.3f s, identical %s", label, rec["torch_s"], rec["triton_s"],
                 rec["dequantized_equal"] and rec["codes_equal"])
    return {"torch_fused_addcmul": fused_deq, "torch_fused_addr": fused_update, "cases": out}


def _seed(i: int, salt: int) -> int:
    return 1_000_003 * salt + i


def make_tensor_pair(name: str, shape: tuple[int, ...], idx: int, device: torch.device, delta_rms: float = 1e-3,
                     noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, fine-tune) bf16 CPU tensors for one parameter; deterministic from idx."""
    g = torch.Generator(device=device).manual_seed(_seed(idx, 7))
    if len(shape) == 1:
        base = 1.0 + 0.05 * torch.randn(shape, generator=g, device=device)
        ft = base + delta_rms * 5 * torch.randn(shape, generator=g, device=device)
        return base.to(torch.bfloat16).cpu(), ft.to(torch.bfloat16).cpu()
    m, n = shape
    r = min(m, n)
    base = 0.02 * torch.randn((m, n), generator=g, device=device)
    a = torch.randn((m, r), generator=g, device=device) / math.sqrt(m)
    s = torch.arange(1, r + 1, device=device, dtype=torch.float32).pow(-0.5)
    b = torch.randn((r, n), generator=g, device=device) / math.sqrt(n)
    delta = (a * s) @ b
    del a, b
    delta *= delta_rms / delta.pow(2).mean().sqrt()
    delta += noise * delta_rms * torch.randn((m, n), generator=g, device=device)
    ft = base + delta
    return base.to(torch.bfloat16).cpu(), ft.to(torch.bfloat16).cpu()


def _tokenizer(vocab: int):
    """Word-level tokenizer over the words of deltapack's default calibration corpus, padded to `vocab` entries."""
    import re
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from deltapack.calib.data import default_calibration_texts

    special = ["<unk>", "<s>", "</s>"]
    counts = Counter(w for t in default_calibration_texts() for w in re.findall(r"\w+|[^\w\s]+", t))
    words = [w for w, _ in counts.most_common(vocab - len(special))]
    words += [f"<extra_{i}>" for i in range(vocab - len(special) - len(words))]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(special + words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")


def write_pair(workdir: Path, shape: LlamaShape, device: torch.device, shard_bytes: int = 2 << 30) -> tuple[Path, Path, float]:
    """Write (or reuse) base/ and ft/ checkpoints under workdir. Returns (base, ft, seconds spent writing)."""

    marker = workdir / "pair.json"
    want = {"shape": dataclasses.asdict(shape), "version": 2}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        log.info("reusing the synthetic pair in %s", workdir)
        return workdir / "base", workdir / "ft", 0.0
    t0 = time.perf_counter()
    shutil.rmtree(workdir / "base", ignore_errors=True)
    shutil.rmtree(workdir / "ft", ignore_errors=True)
    marker.unlink(missing_ok=True)
    tmp = {w: workdir / f".{w}.tmp" for w in ("base", "ft")}
    for d in tmp.values():
        shutil.rmtree(d, ignore_errors=True)
    write_checkpoints([tmp["base"], tmp["ft"]], shape, lambda name, s, i: list(make_tensor_pair(name, s, i, device)),
                      shard_bytes=shard_bytes, log=lambda m: log.info("%s (%.1f s)", m, time.perf_counter() - t0))
    tok = _tokenizer(shape.vocab)
    for w in ("base", "ft"):
        tok.save_pretrained(tmp[w])
        os.replace(tmp[w], workdir / w)
    marker.write_text(json.dumps(want))
    return workdir / "base", workdir / "ft", time.perf_counter() - t0


VIEW_OPS = {"view", "_unsafe_view", "slice", "select", "t", "transpose", "as_strided", "expand", "unsqueeze", "squeeze",
            "diagonal", "alias", "permute", "_reshape_alias", "detach", "lift_fresh", "unbind", "split", "narrow"}
SYNC_OPS = {"_local_scalar_dense", "nonzero", "equal", "unique_consecutive", "_unique2", "is_nonzero"}


def count_ops(device: torch.device, small: bool) -> list[dict]:
    """Torch ops dispatched (kernels launched on CUDA, views, host syncs) and Triton launches per delta-come encode of
    one q_proj- and one down_proj-shaped matrix at 16x, GPTQ column loop in torch and with the default backend."""
    import types

    from torch.utils._python_dispatch import TorchDispatchMode

    from deltapack.methods import TensorJob, get_method
    from deltapack.quant import gptq_triton

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: dict[str, int] = {}

        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.ops[name] = self.ops.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    launches = [0]
    real_block = gptq_triton.block_columns

    def counted_block(*a):
        launches[0] += 1
        return real_block(*a)

    shapes = [(256, 256), (256, 688)] if small else [(4096, 4096), (4096, 11008)]
    out = []
    gptq_triton.block_columns = counted_block
    old_env = os.environ.get("DELTAPACK_GPTQ_BACKEND")
    try:
        for m, n in shapes:
            g = torch.Generator(device=device).manual_seed(m + n)
            r = min(m, n)
            spec = torch.arange(1, r + 1, device=device, dtype=torch.float32).pow(-0.5)
            delta = (torch.randn(m, r, generator=g, device=device) * spec) @ torch.randn(r, n, generator=g, device=device)
            delta *= 1e-3 / delta.pow(2).mean().sqrt()
            X = torch.randn(2 * n, n, generator=g, device=device) * (torch.rand(n, generator=g, device=device) + 0.1)
            H = X.T @ X
            del X
            for backend in ("torch", "auto"):
                os.environ["DELTAPACK_GPTQ_BACKEND"] = backend
                method = get_method("delta-come", {"allocator": "optimal"})
                ctx = types.SimpleNamespace(device=device, cache={})
                job = lambda: TensorJob("w", (m, n), delta.clone(), m * n * 2 // 16, "linear", extras={"hessian": H})  # noqa: E731
                method.encode(job(), ctx)  # warm: ε(b) measured, kernel compiled
                launches[0] = 0
                with Counter() as c:
                    t0 = time.perf_counter()
                    method.encode(job(), ctx)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                total = sum(c.ops.values())
                views = sum(v for k, v in c.ops.items() if k in VIEW_OPS)
                rec = {"shape": [m, n], "gptq_backend": backend, "torch_ops": total, "view_ops": views,
                       "kernel_ops": total - views, "host_syncs": sum(v for k, v in c.ops.items() if k in SYNC_OPS),
                       "triton_launches": launches[0], "seconds_counted": round(dt, 3)}
                out.append(rec)
                log.info("ops per encode %s: %s", [m, n], rec)
    finally:
        gptq_triton.block_columns = real_block
        if old_env is None:
            os.environ.pop("DELTAPACK_GPTQ_BACKEND", None)
        else:
            os.environ["DELTAPACK_GPTQ_BACKEND"] = old_env
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"labels of common.METHOD_SPECS and EXTRA_SPECS (aliases: {', '.join(ALIASES)})")
    ap.add_argument("--ratio", type=float, default=None, help="target true ratio (default 16; --smoke: 8, since the "
                    "tiny shapes' norm vectors and metadata keep 1-bit methods just under 16x)")
    ap.add_argument("--out", type=Path, default=RESULTS / "quality_parts" / "timing-7b.json")
    ap.add_argument("--workdir", type=Path, default=Path("/root/dp7b") if Path("/root").is_dir() else Path("dp7b"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--time-budget", type=float, default=540.0, help="seconds; no method starts after budget - --reserve")
    ap.add_argument("--reserve", type=float, default=60.0, help="seconds a method is assumed to need at least")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (scaled-down runs)")
    ap.add_argument("--smoke", action="store_true", help="CPU, hidden 256, 2 layers: the same code path in seconds")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="7b (default), mid (hidden 1024, 4 layers: CPU profiling), smoke (= --smoke's shape)")
    ap.add_argument("--gptq-check", action="store_true",
                    help="first compare GPTQ's torch loop and Triton kernel on 7B-shaped factors (~1 min on a GPU)")
    ap.add_argument("--count-ops", action="store_true",
                    help="first count torch ops / syncs / Triton launches per delta-come encode of a q_proj- and a "
                         "down_proj-shaped matrix, torch column loop vs default backend (~1 min on a GPU)")
    ap.add_argument("--heal-steps", type=int, default=None,
                    help="healing steps for +heal methods (default: heal's own); each record gets `heal_probe`: "
                         "healing's own peak RSS (and GPU memory) over the call")
    ap.add_argument("--no-mask-memo", action="store_true",
                    help="healing regenerates seeded masks at every decode, as before they were kept (a comparison)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.no_mask_memo:
        import deltapack.calib.heal as heal_mod

        heal_mod.MASK_MEMO_CPU_BYTES, heal_mod.MASK_MEMO_FRACTION = 0, 0.0
    logging.getLogger("deltapack.compress").setLevel(logging.WARNING)
    budget = Budget(time.time() + args.time_budget)

    from deltapack import api
    from deltapack.compress import resolve_device
    from deltapack.errors import BudgetError
    from deltapack.methods import METHODS, get_method

    device = resolve_device("cpu" if args.smoke and args.device == "auto" else args.device)
    if args.ratio is None:
        args.ratio = 8.0 if args.smoke else 16.0
    shape_key = args.shape or ("smoke" if args.smoke else "7b")
    shape = SHAPES[shape_key]
    if args.layers:
        shape = dataclasses.replace(shape, layers=args.layers)
    workdir = args.workdir / {"smoke": "smoke", "mid": "mid", "7b": "llama2-7b"}[shape_key]
    workdir.mkdir(parents=True, exist_ok=True)
    specs = select_methods(args.methods, extra=True)

    doc = {"command": command_line(), "device": device_name(device), "date": now_iso(), "smoke": bool(args.smoke),
           "shape": shape.label(), "params": shape.params(), "timing": [], "notes": [], "complete": False,
           "path": "deltapack.api.compress on sharded bf16 safetensors checkpoints (real code path)",
           "heal_mask_memo": not args.no_mask_memo}
    write_json(args.out, doc)
    if args.gptq_check:
        doc["gptq_check"] = gptq_check(device, small=args.smoke)
        write_json(args.out, doc)
    if args.count_ops:
        doc["ops_per_encode"] = count_ops(device, small=args.smoke)
        write_json(args.out, doc)
    base_dir, ft_dir, write_s = write_pair(workdir, shape, device, shard_bytes=(2 << 30) if shape_key == "7b" else (64 << 20))
    doc["checkpoint_write_seconds"] = round(write_s, 1)
    write_json(args.out, doc)
    log.info("pair ready (%s, %.1fM params) in %.0f s", shape.label(), shape.params() / 1e6, write_s)

    from deltapack.compress import record_phases

    sampler = RssSampler()
    skipped = False
    for spec in specs:
        ratio = None if spec.method == "raw" else args.ratio
        if spec.method not in METHODS:
            doc["notes"].append({"method": spec.label, "note": f"method {spec.method!r} not available in this build"})
            write_json(args.out, doc)
            continue
        if budget.left() < args.reserve:
            doc["notes"].append({"method": spec.label, "note": f"time budget: not started ({budget.left():.0f} s left)"})
            write_json(args.out, doc)
            skipped = True
            continue
        try:
            get_method(spec.method, spec.params)
        except Exception as e:
            doc["notes"].append({"method": spec.label, "note": f"cannot configure: {e}"})
            continue
        heal = {"heal": True} if spec.heal else {}
        if heal and "heal" not in inspect.signature(api.compress).parameters:
            doc["notes"].append({"method": spec.label, "note": "deltapack.api.compress has no `heal` parameter"})
            continue
        out = workdir / "delta"
        shutil.rmtree(out, ignore_errors=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        hwm_reset = reset_peak_rss()
        t0 = time.perf_counter()
        probe = HealProbe(args.heal_steps)
        try:
            with record_phases() as phases, probe:
                api.compress(base_dir, ft_dir, out, method=spec.method, ratio=ratio, params=spec.params,
                             device=str(device), overwrite=True, progress=False, **heal)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            info = api.inspect(out)
        except BudgetError as e:
            doc["notes"].append({"method": spec.label, "target_ratio": ratio, "note": f"cannot reach: {e}"})
            write_json(args.out, doc)
            continue
        except Exception as e:
            log.error("%s failed:\n%s", spec.label, traceback.format_exc())
            note = {"method": spec.label, "target_ratio": ratio, "note": f"error: {e.__class__.__name__}: {e}"[:500]}
            if probe.records:  # healing finished (or failed) before the error: what it cost is still worth keeping
                note["heal_probe"] = probe.records[-1]
            doc["notes"].append(note)
            write_json(args.out, doc)
            continue
        finally:
            shutil.rmtree(out, ignore_errors=True)
            gc.collect()
        rss_left = rss_bytes()
        malloc_trim()
        rec = {
            "method": spec.method, "label": spec.label, "allocator": spec.allocator, "params": spec.params,
            "heal": spec.heal,
            "target_ratio": ratio, "seconds": round(seconds, 2),
            "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.type == "cuda" else None,
            # this method's own peak when the high-water mark could be reset, else the process peak so far
            "peak_rss_gb": round(peak_rss() / 1e9, 2), "peak_rss_scope": "method" if hwm_reset else "process",
            "rss_after_gb": round(rss_left / 1e9, 2), "rss_after_trim_gb": round(rss_bytes() / 1e9, 2),
            "phases": {k: round(v, 2) for k, v in sorted(phases.items())},
            "phase_peak_rss_gb": {name: round(sampler.peak(a, b) / 1e9, 2) for name, a, b in phases.spans},
            "true_ratio": info["true_ratio"], "nominal_ratio": info["nominal_ratio"], "shape": shape.label(),
        }
        if probe.records:
            rec["heal_probe"] = probe.records[-1]
        doc["timing"].append(rec)
        write_json(args.out, doc)
        log.info("%s @ %s: %.1f s, peak GPU %s GB, peak RSS %.1f GB, true ratio %.2fx", spec.label,
                 "lossless" if ratio is None else f"{ratio:g}x", seconds, rec["peak_gpu_gb"], rec["peak_rss_gb"],
                 rec["true_ratio"])
        top = {k: v for k, v in rec["phases"].items() if "." not in k}
        log.info("%s phases: %s", spec.label, ", ".join(f"{k} {v:.1f} s" for k, v in top.items()))
        log.info("%s sub-phases: %s", spec.label, ", ".join(f"{k} {v:.1f}" for k, v in rec["phases"].items() if "." in k))
    sampler.stop()
    doc["complete"] = not skipped
    doc["elapsed_s"] = round(budget.elapsed(), 1)
    write_json(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
