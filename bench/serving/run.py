"""Serving benchmark of the Triton delta kernels: kernel bandwidth, end-to-end decode, a multi-tenant trace, and how
many compressed tenants stay resident. Writes bench/results/serving.json (+ serving.png).

    PYTHONPATH=src python bench/serving/run.py --parts kernels          # GPU, ~3 min
    PYTHONPATH=src python bench/serving/run.py --parts decode,trace     # GPU, ~6 min (trace reuses decode's model)
    PYTHONPATH=src python bench/serving/run.py --parts resident         # GPU, ~2 min
    PYTHONPATH=src python bench/serving/run.py --parts profile          # GPU, ~3 min (notes.profile)
    PYTHONPATH=src python bench/serving/run.py --smoke                  # CPU, Triton interpreter, tiny shapes, ~1 min

A run updates only the parts it ran (the others are kept from the existing file); `notes.runs` says when and with
which command each part was measured. A part that fails records its error in `notes.errors` and the next part runs.

Parts (records as the issue asks):
  kernels   {codec, shape, k, gbps, copy_gbps, efficiency}: one `kernels.linear` call for a batch of 64 tokens
            spread round-robin over k tenants (64/k tokens each), at the 7B decode shapes (shape = "in x out":
            q/k/v/o 4096x4096, gate/up 4096x11008, down 11008x4096), replayed from a CUDA graph over enough distinct
            tenant sets to exceed the L2 cache; gbps = (tenants' packed bytes + activations read and written) / time;
            copy_gbps = a 1 GiB device-to-device copy (bytes read + written); every config is first checked against
            the layout's definition on fresh random inputs.
  decode    {codec, ratio, k, batch, tokens_per_s, base_tokens_per_s, bound, of_bound}: the real wrapped model
            (transformers Llama of 7B shape, random bf16 weights, every linear and lm_head carrying each tenant's
            delta; deltapack.serve.fastpath.StaticDecoder: static KV cache, one CUDA graph per decode step), batch 64
            with k tenants round-robin, against the base alone at the same batch; bound = 1 / (1 + k/R) with R = the
            base's linear-weight bytes / one tenant's packed bytes; of_bound = (tokens_per_s / base_tokens_per_s) /
            bound. The KV cache is short (see notes) so the comparison is about weights.
  trace     {system, throughput, ttft_p50, ttft_p99, itl_p50, itl_p99}: a SIMULATION with per-step costs measured on
            this GPU (bench/serving/trace_sim.py): 64 tenants, Zipf(1) popularity, Poisson arrivals, 128-token prompts
            and outputs; deltapack (all tenants resident, continuous batching) against swapping merged full models
            from pinned CPU memory (swap time measured here).
  profile   notes.profile only: torch.profiler breakdown (device time by kernel, wall vs busy) of one eager decode
            step at the trace's batch with k = 0 (base), and each of the trace's k, and of one prefill with a delta:
            where the step time goes, for the kernel work.
  resident  {codec, ratio, tenants, gpu_gb}: allocate the base's bytes and a KV cache of stated size, then whole-model
            16x tenants (every linear, lm_head and the embedding, packed) until the next would exceed the budget;
            gpu_gb = torch.cuda.memory_allocated() / 1e9 at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import random
import shlex
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))
RESULTS = ROOT / "bench" / "results"
PARTS = ("kernels", "decode", "trace", "profile", "resident")
RECORD_PARTS = ("kernels", "decode", "trace", "resident")  # the record lists; profile writes notes only


def kernels_sha() -> str:
    """Identity of the kernel code measured (the GPU machine gets a copy of the tree without git history)."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted((ROOT / "src" / "deltapack" / "kernels" / "triton").glob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def log(msg: str) -> None:
    print(f"[serving {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- settings per mode ------------------------------------------------------------------------------------------------
def settings(smoke: bool) -> dict:
    if smoke:
        return {  # the same code paths, sized for the Triton CPU interpreter (a few minutes)
            "model": {"hidden": 64, "inter": 128, "layers": 1, "heads": 4, "vocab": 128},
            "kernel_shapes": [(64, 64), (64, 96)], "ks": [1, 4], "batch": 4, "kernel_ratio": 4.0,
            "kernel_codecs": ["delta-come", "lowrank", "bitdelta", "dare"], "l2_bytes": 0, "reps": 1,
            "decode_ratios": [8.0], "decode_ks": [1, 4], "decode_codecs": ["delta-come"], "prompt": 4,
            "steps": 2, "copy_bytes": 1 << 22, "prefill_batches": [1],
            "trace": {"tenants": 4, "requests": 60, "prompt": 8, "out": 8, "batch": 4, "base_batches": [1, 4],
                      "ks": [1, 4], "ratio": 8.0},
            "resident": {"codecs": ["delta-come", "lowrank", "bitdelta", "dare"], "ratio": 4.0, "budget": 24 << 20,
                         "kv_bytes": 1 << 20, "max_tenants": 50},
        }
    return {
        "model": {"hidden": 4096, "inter": 11008, "layers": 32, "heads": 32, "vocab": 32000},
        "kernel_shapes": [(4096, 4096), (4096, 11008), (11008, 4096)], "ks": [1, 8, 32, 64], "batch": 64,
        "kernel_ratio": 16.0, "kernel_codecs": ["delta-come", "lowrank", "bitdelta", "dare"], "l2_bytes": 50 << 20,
        "reps": 20, "decode_ratios": [16.0, 32.0], "decode_ks": [1, 8, 32, 64], "decode_codecs": ["delta-come"],
        "prompt": 16, "steps": 32, "copy_bytes": 1 << 30, "prefill_batches": [1, 8],
        "trace": {"tenants": 64, "requests": 1000, "prompt": 128, "out": 128, "batch": 64,
                  "base_batches": [1, 8, 16, 32, 64], "ks": [1, 8, 32, 64], "ratio": 16.0},
        "resident": {"codecs": ["delta-come", "lowrank", "bitdelta", "dare"], "ratio": 16.0, "budget": 80_000_000_000,
                     "kv_bytes": 16 << 30, "max_tenants": 400},
    }


# ---- shared state of one run ------------------------------------------------------------------------------------------
class World:
    """Device, kernel backend, templates, and (lazily) the wrapped 7B-shaped model, shared by the parts of a run."""

    def __init__(self, smoke: bool):
        import torch

        from deltapack.kernels.triton import TritonKernels

        self.torch = torch
        self.smoke = smoke
        self.cfg = settings(smoke)
        self.device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
        self.dtype = torch.bfloat16
        self.kernels = TritonKernels()
        self.templates: dict = {}
        self.template_stats: dict = {}
        self.model = self.state = None
        self.decoders: dict = {}
        self.decode_records: list[dict] = []
        self.base_step: dict[int, float] = {}

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def name(self) -> str:
        if self.cuda:
            return self.torch.cuda.get_device_name(self.device)
        return f"cpu ({platform.processor() or platform.machine()}), Triton interpreter"

    def template(self, codec: str, shape: tuple[int, int], ratio: float):
        import synth

        key = (codec, shape, ratio)
        if key not in self.templates:
            t0 = time.perf_counter()
            p = self.templates[key] = synth.template(self.kernels, codec, shape, ratio, self.dtype, self.device,
                                                     seed=len(self.templates))
            dense = shape[0] * shape[1] * 2
            stats = {"codec": codec, "shape_out_in": list(shape), "ratio": ratio, "layout": p.kind,
                     "stored_ratio": round(dense / p.meta["stored_bytes"], 3), "resident_ratio": round(dense / p.nbytes(), 3)}
            if p.kind == "ell":
                stats["ell_padding"] = round(p.meta["entries"] / max(1, p.meta["nnz"]) - 1, 4)
                stats["resident_bytes_per_nonzero"] = round(p.nbytes() / max(1, p.meta["nnz"]), 3)
            if p.kind == "qfactors":
                stats["groups"] = [(g["rows"], g["bits"]) for g in p.meta["groups"]]
            self.template_stats[f"{codec} {shape[1]}x{shape[0]} {ratio:g}x"] = stats
            log(f"template {codec} {shape} {ratio:g}x: {p.nbytes() / 1e6:.2f} MB packed, resident ratio "
                f"{stats['resident_ratio']:.2f} ({time.perf_counter() - t0:.1f}s)")
        return self.templates[key]

    def tenant(self, codec: str, ratio: float, shapes: dict[str, tuple[int, int]], seed: int) -> dict:
        import synth

        return {k: synth.clone(self.template(codec, s, ratio), seed * 7919 + i) for i, (k, s) in enumerate(shapes.items())}

    # -- the model --
    def build_model(self):
        if self.model is not None:
            return
        torch = self.torch
        from transformers import AutoModelForCausalLM, LlamaConfig

        from deltapack.serve.model import DeltaState, wrap_model

        m = self.cfg["model"]
        cfg = LlamaConfig(hidden_size=m["hidden"], intermediate_size=m["inter"], num_hidden_layers=m["layers"],
                          num_attention_heads=m["heads"], num_key_value_heads=m["heads"], vocab_size=m["vocab"],
                          max_position_embeddings=4096)
        t0 = time.perf_counter()
        torch.manual_seed(0)
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=self.dtype)
        self.model = model.eval()
        self.state = DeltaState(self.kernels)
        self.sites = wrap_model(self.model, self.state)
        self.base_linear_bytes = sum(
            mod.weight.numel() * mod.weight.element_size() for mod in self.model.modules() if isinstance(mod, torch.nn.Linear)
        )
        log(f"model built in {time.perf_counter() - t0:.1f}s: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B "
            f"params, linear weights {self.base_linear_bytes / 1e9:.2f} GB")

    def model_shapes(self, embedding: bool = False) -> dict[str, tuple[int, int]]:
        import synth

        return synth.model_shapes(self.shape(), embedding=embedding)

    def shape(self):
        from deltapack.scale.synthetic import LlamaShape

        m = self.cfg["model"]
        return LlamaShape(hidden=m["hidden"], inter=m["inter"], layers=m["layers"], vocab=m["vocab"], heads=m["heads"],
                          kv_heads=m["heads"])

    def install(self, tenants: list[dict]) -> None:
        """Put tenants in slots 0..n-1 of every site they cover; clear the other slots."""
        from deltapack.kernels import LayerDeltas

        keys = set().union(*[t.keys() for t in tenants]) if tenants else set()
        for key in keys | set(self.state.layers):
            lay = self.state.layers.get(key)
            if lay is None:
                lay = self.state.layers[key] = LayerDeltas(key)
            for s, t in enumerate(tenants):
                lay.set(s, t.get(key))
            for s in range(len(tenants), len(lay.slots)):
                if lay.slots[s] is not None:
                    lay.set(s, None)

    def decoder(self, batch: int, max_len: int):
        from deltapack.serve.fastpath import StaticDecoder

        key = (batch, max_len)
        if key not in self.decoders:
            self.decoders[key] = StaticDecoder(self.model, self.state, batch=batch, max_len=max_len, graph=self.cuda)
        return self.decoders[key]

    def decode_step_s(self, row_slots: list[int], prompt_len: int, steps: int) -> float:
        """Seconds per decode step of a batch of len(row_slots) rows (graph replays on CUDA, eager on the CPU)."""
        B = len(row_slots)
        dec = self.decoder(B, prompt_len + steps + 4)
        vocab = self.cfg["model"]["vocab"]
        rnd = random.Random(B * 1000 + len(set(row_slots)))
        dec.prefill([[rnd.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(B)], row_slots)
        if self.cuda:
            dec.capture()
            self.sync()
        return timed(self, dec.step, steps)

    def free_model(self) -> None:
        self.decoders.clear()
        self.model = self.state = None
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


# ---- timing -------------------------------------------------------------------------------------------------------------
def timed(world: World, fn, reps: int) -> float:
    """Seconds per fn() call over `reps` calls: CUDA events on the GPU, wall clock on the CPU."""
    if not world.cuda:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps
    torch = world.torch
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    world.sync()
    return start.elapsed_time(end) / 1000 / reps


def command_line() -> str:
    """This process's command, as run from the repository root."""
    script = os.path.relpath(Path(sys.argv[0]).resolve(), ROOT)
    return "PYTHONPATH=src python " + " ".join(shlex.quote(a) for a in [script] + sys.argv[1:])


def time_call(world: World, fn, reps: int) -> float:
    """Seconds per fn() call: on CUDA from replays of a captured graph (falls back to timed eager calls)."""
    torch = world.torch
    fn()
    world.sync()
    if not world.cuda:
        return timed(world, fn, reps)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        world.sync()
        return timed(world, g.replay, reps)
    except RuntimeError as e:  # capture refused: time eager calls (launch overhead included)
        log(f"graph capture failed ({e}); timing eager calls")
        return timed(world, fn, reps)


def copy_gbps(world: World) -> float:
    torch = world.torch
    n = world.cfg["copy_bytes"] // 2
    src = torch.randn(n, device=world.device).to(world.dtype)
    dst = torch.empty_like(src)
    reps = 20 if world.cuda else 3
    t = time_call(world, lambda: dst.copy_(src), reps)
    return 2 * n * 2 / t / 1e9


# ---- parts --------------------------------------------------------------------------------------------------------------
def kernel_sets(world: World, tenant_bytes: int, k: int) -> int:
    """How many distinct sets of k tenants a timing cycles through so that together they exceed the L2 cache."""
    l2 = world.cfg["l2_bytes"]
    return min(64, max(1, -(-l2 * 4 // (k * tenant_bytes)))) if l2 else 1


def kernel_case(world: World, codec: str, shape: tuple[int, int], k: int, sets: int = 1, batch: int | None = None):
    """`sets` layers of k distinct tenants of `codec` at the kernel ratio (weight `shape` = (out, in)), `batch`
    (default the decode batch) rows round-robin over the k slots, their TokenSlots and hidden states x:
    (layers, rows, tokens, x)."""
    from deltapack.kernels import LayerDeltas, TokenSlots

    layers = []
    for s in range(sets):
        lay = LayerDeltas(f"bench.{s}")
        for t in range(k):
            lay.set(t, world.tenant(codec, world.cfg["kernel_ratio"], {"w": shape}, s * 1000 + t)["w"])
        layers.append(lay)
    rows = [t % k for t in range(batch or world.cfg["batch"])]
    tokens = TokenSlots.from_rows(rows, 1, world.device)
    x = world.torch.randn(len(rows), shape[1], device=world.device).to(world.dtype)
    return layers, rows, tokens, x


def layout_rel_err(world: World, y, x, rows: list[int], layer, tenants) -> float:
    """Worst relative error, over `tenants`' tokens, of a kernel output y against x @ the layout's definitionᵀ."""
    from deltapack.kernels.triton.layouts import dequant_layout

    worst = 0.0
    for t in tenants:
        d = dequant_layout(layer.slots[t]).to(world.device)
        idx = [i for i, r in enumerate(rows) if r == t]
        want = x[idx].float() @ d.T
        worst = max(worst, float((y[idx].float() - want).norm() / want.norm().clamp_min(1e-30)))
        del d
    return worst


def part_kernels(world: World, notes: dict) -> list[dict]:
    torch = world.torch
    cfg = world.cfg
    cg = copy_gbps(world)
    log(f"device-to-device copy: {cg:.0f} GB/s")
    B = cfg["batch"]
    ratio = cfg["kernel_ratio"]
    records, checks, errors = [], [], {}
    for codec in cfg["kernel_codecs"]:
        for n_in, n_out in cfg["kernel_shapes"]:
            shape = (n_out, n_in)  # weight (out, in)
            tb = world.template(codec, shape, ratio).nbytes()
            for k in cfg["ks"]:
                name = f"{codec} {n_in}x{n_out} k={k}"
                try:
                    sets = kernel_sets(world, tb, k)
                    layers, rows, tokens, x = kernel_case(world, codec, shape, k, sets)
                    # correctness on fresh inputs: every token of two tenants against the layout's definition
                    y = world.kernels.linear(x, tokens, layers[0]).float()
                    worst = layout_rel_err(world, y, x, rows, layers[0], sorted({0, k - 1}))
                    checks.append({"config": name, "rel_err": worst})
                    if not worst < 2e-2:
                        raise AssertionError(f"kernel output differs from the layout's definition: rel err {worst:.3g}")
                    sec = time_call(world, lambda: [world.kernels.linear(x, tokens, lay) for lay in layers], cfg["reps"]) / sets
                    moved = k * tb + B * n_in * 2 + B * n_out * 2
                    if codec in ("delta-come", "lowrank"):  # z written and read back, fp32
                        moved += 2 * B * layers[0].slots[0].meta["rank"] * 4
                    gbps = moved / sec / 1e9
                    records.append({"codec": codec, "shape": f"{n_in}x{n_out}", "k": k, "gbps": round(gbps, 1),
                                    "copy_gbps": round(cg, 1), "efficiency": round(gbps / cg, 3)})
                    log(f"{name}: {sec * 1e6:.1f} us, {gbps:.0f} GB/s = {gbps / cg:.0%} of copy (rel err {worst:.1e})")
                    del layers
                except Exception as e:
                    errors[name] = f"{type(e).__name__}: {e}"
                    log(f"{name} FAILED: {errors[name]}")
                    traceback.print_exc()
            if world.cuda:
                torch.cuda.empty_cache()
    # a run of some codecs only (--codecs) keeps the other codecs' checks, as their records
    earlier = [c for c in notes.get("kernels", {}).get("checks", []) if c["config"].split()[0] not in cfg["kernel_codecs"]]
    notes["kernels"] = {"batch": B, "ratio": ratio, "shape": "in x out", "checks": earlier + checks, "errors": errors,
                        "l2_sets_bytes": cfg["l2_bytes"] * 4,
                        "bytes": "k tenants' packed bytes + x read + output written (+ z written and read, fp32)"}
    return records


def part_decode(world: World, notes: dict) -> list[dict]:
    cfg = world.cfg
    world.build_model()
    B, P, steps = cfg["batch"], cfg["prompt"], cfg["steps"]
    shapes = world.model_shapes()
    world.install([])
    base_s = world.decode_step_s([-1] * B, P, steps)
    world.base_step[B] = base_s
    base_tps = B / base_s
    log(f"base: {base_s * 1e3:.2f} ms/step, {base_tps:.0f} tok/s at batch {B}")
    records = []
    kmax = max(cfg["decode_ks"])
    eff_ratio = {}
    for codec in cfg["decode_codecs"]:
        for ratio in sorted(cfg["decode_ratios"], reverse=True):  # 32x first: fewer bytes resident
            t0 = time.perf_counter()
            tenants = [world.tenant(codec, ratio, shapes, i) for i in range(kmax)]
            tbytes = sum(p.nbytes() for p in tenants[0].values())
            R = world.base_linear_bytes / tbytes
            eff_ratio[f"{codec} {ratio:g}x"] = round(R, 2)
            log(f"{codec} {ratio:g}x: {kmax} tenants of {tbytes / 1e9:.3f} GB ({time.perf_counter() - t0:.1f}s), R = {R:.2f}")
            for k in cfg["decode_ks"]:
                world.install(tenants[:k])
                sec = world.decode_step_s([b % k for b in range(B)], P, steps)
                tps = B / sec
                bound = 1 / (1 + k / R)
                rec = {"codec": codec, "ratio": ratio, "k": k, "batch": B, "tokens_per_s": round(tps, 1),
                       "base_tokens_per_s": round(base_tps, 1), "bound": round(bound, 4),
                       "of_bound": round(tps / base_tps / bound, 3)}
                if ratio == cfg["trace"]["ratio"] and codec == "delta-come":
                    world.decode_records.append({"k": k, "batch": B, "step_s": sec})
                records.append(rec)
                log(f"  k={k}: {sec * 1e3:.2f} ms/step, {tps:.0f} tok/s = {tps / base_tps:.2f} of base, bound {bound:.3f} "
                    f"-> {rec['of_bound']:.0%} of bound")
            world.install([])
            del tenants
            gc.collect()
            if world.cuda:
                world.torch.cuda.empty_cache()
    max_len = P + steps + 4
    m = cfg["model"]
    notes["decode"] = {
        "path": "transformers LlamaForCausalLM (random bf16 weights) wrapped by deltapack.serve.model, "
                "deltapack.serve.fastpath.StaticDecoder (static KV cache, CUDA graph per step), kernels=triton",
        "model": m, "batch": B, "prompt_tokens": P, "timed_steps": steps, "kv_positions": max_len,
        "kv_gb_per_step": round(2 * m["layers"] * B * max_len * m["hidden"] * 2 / 1e9, 3),
        "base_linear_gb": round(world.base_linear_bytes / 1e9, 3), "effective_ratio": eff_ratio,
        "deltas_on": "every linear of every layer and lm_head (the embedding's rows are a gather, left out)",
    }
    return records


def part_trace(world: World, notes: dict) -> list[dict]:
    import trace_sim as ts

    torch = world.torch
    cfg = world.cfg
    tc = cfg["trace"]
    world.build_model()
    shapes = world.model_shapes()
    B = tc["batch"]
    steps = max(2, cfg["steps"] // 2)
    P = cfg["prompt"]
    # decode step of the base by batch size
    world.install([])
    base = {}
    for b in tc["base_batches"]:
        base[b] = world.base_step.get(b) or world.decode_step_s([-1] * b, P, steps)
        log(f"trace costs: base step at batch {b}: {base[b] * 1e3:.2f} ms")
    # extra time of a step with k distinct tenants (at batch B), from the decode part when it ran in this process
    extra = {0: 0.0}
    have = {r["k"]: r["step_s"] for r in world.decode_records if r["batch"] == B}
    tenants = None
    for k in tc["ks"]:
        if k not in have:
            if tenants is None:
                tenants = [world.tenant("delta-come", tc["ratio"], shapes, i) for i in range(max(tc["ks"]))]
            world.install(tenants[:k])
            have[k] = world.decode_step_s([b % k for b in range(B)], P, steps)
        extra[k] = max(0.0, have[k] - base[B])
        log(f"trace costs: {k} tenants at batch {B}: +{extra[k] * 1e3:.2f} ms")
    # prefill of prompts with deltas (eager, as the engine prefills), by number of prompts
    if tenants is None:
        tenants = [world.tenant("delta-come", tc["ratio"], shapes, i) for i in range(max(tc["ks"]))]
    vocab = cfg["model"]["vocab"]

    def prefill_s(n: int, rows: list[int]) -> float:
        dec = world.decoder(n, tc["prompt"] + 4)
        prompts = [[random.randrange(3, vocab) for _ in range(tc["prompt"])] for _ in range(n)]
        dec.prefill(prompts, rows)  # warm
        world.sync()
        t0 = time.perf_counter()
        for _ in range(3):
            dec.prefill(prompts, rows)
        world.sync()
        del world.decoders[(n, tc["prompt"] + 4)]
        return (time.perf_counter() - t0) / 3

    # deltapack prefills with each prompt's delta; a swapped-in merged model prefills as the plain base does
    world.install(tenants[: max(tc["ks"])])
    prefill = {n: prefill_s(n, list(range(n))) for n in cfg["prefill_batches"]}
    world.install([])
    prefill_base = {n: prefill_s(n, [-1] * n) for n in cfg["prefill_batches"]}
    for n in cfg["prefill_batches"]:
        log(f"trace costs: prefill of {n} x {tc['prompt']} tokens: {prefill[n] * 1e3:.1f} ms with deltas, "
            f"{prefill_base[n] * 1e3:.1f} ms base")
    del tenants
    gc.collect()
    # swapping one merged full model in from pinned CPU memory
    nbytes = sum(p.numel() * p.element_size() for p in world.model.parameters())
    if world.cuda:
        torch.cuda.empty_cache()
        host = torch.empty(nbytes // 2, dtype=torch.bfloat16, pin_memory=True)
        dev = torch.empty_like(host, device=world.device)
        dev.copy_(host, non_blocking=True)
        world.sync()
        t0 = time.perf_counter()
        for _ in range(2):
            dev.copy_(host, non_blocking=True)
        world.sync()
        swap = (time.perf_counter() - t0) / 2
        del host, dev
        torch.cuda.empty_cache()
    else:
        swap = 0.26 * nbytes / 13.5e9  # the GPU figure (GPU.md), scaled to the smoke model's bytes
    log(f"trace costs: swap of {nbytes / 1e9:.2f} GB: {swap * 1e3:.1f} ms")
    costs = {"decode_base_s": base, "decode_extra_s": extra, "prefill_s": prefill, "prefill_base_s": prefill_base,
             "swap_s": swap}
    return simulate_trace(costs, tc, notes)


TRACE_LOADS = (0.25, 0.5, 0.8, 1.0, 1.5, 2.0, 4.0, 8.0)  # offered load as a fraction of deltapack's decode-bound capacity
RECORD_LOAD = 0.8  # the load of the `trace` records (one of TRACE_LOADS)


def effective_ratio(notes: dict, ratio: float) -> float:
    """The delta-come tenants' measured compression of the linear weights (notes.decode.effective_ratio), else the
    nominal ratio."""
    return float((notes.get("decode", {}).get("effective_ratio") or {}).get(f"delta-come {ratio:g}x", ratio))


def simulate_trace(costs_s: dict, tc: dict, notes: dict) -> list[dict]:
    """The trace at 0.8 of deltapack's capacity (the records), plus a sweep of offered loads (notes.trace.sweep):
    under an open-loop trace both systems serve the same arrivals, so below the slower one's capacity throughput
    only says whether it kept up; the saturated end of the sweep compares capacities."""
    import trace_sim as ts

    costs = ts.Costs.from_json(costs_s)
    B = tc["batch"]
    distinct = ts.expected_distinct(tc["tenants"], B)
    capacity = ts.capacity_rps(costs, B, round(distinct), tc["out"])

    # what the same engine would do if every decode step ran at the bound (trace_sim.Costs.at_bound)
    ratio = effective_ratio(notes, tc["ratio"])
    b_full = costs.decode(B, 0)
    at_bound = costs.at_bound(ratio, B)

    def run(load: float) -> tuple[dict, dict, dict]:
        trace = ts.make_trace(tc["requests"], tc["tenants"], load * capacity, tc["out"], seed=0)
        recs = [ts.metrics("deltapack", ts.simulate_deltapack(trace, costs, B)),
                ts.metrics("swap", ts.simulate_swap(trace, costs, B)),
                ts.metrics("deltapack_at_bound", ts.simulate_deltapack(trace, at_bound, B))]
        return tuple({k: (v if k == "system" else round(v, 4)) for k, v in r.items()} for r in recs)

    records, sweep = None, []
    for load in TRACE_LOADS:
        d, w, bd = run(load)
        if load == RECORD_LOAD:  # the records: the measured systems at this load
            records = [d, w]
        sweep.append({"load": load, "rate_rps": round(load * capacity, 3), "deltapack": d, "swap": w,
                      "throughput_ratio": round(d["throughput"] / max(1e-12, w["throughput"]), 3),
                      "deltapack_at_bound": bd,
                      "throughput_ratio_at_bound": round(bd["throughput"] / max(1e-12, w["throughput"]), 3)})
        log(f"trace sweep load {load:g}: deltapack {d['throughput']:.0f} tok/s vs swap {w['throughput']:.0f} tok/s "
            f"(deltapack at the bound: {bd['throughput']:.0f}); TTFT p99 {d['ttft_p99']:.2f}s vs {w['ttft_p99']:.2f}s")
    for r in records:
        log(f"trace {r['system']}: {r['throughput']:.0f} tok/s, TTFT p50 {r['ttft_p50']:.3f}s p99 {r['ttft_p99']:.3f}s, "
            f"ITL p50 {r['itl_p50'] * 1e3:.1f} ms p99 {r['itl_p99'] * 1e3:.1f} ms")
    notes["trace"] = {
        "kind": "simulation with per-step costs measured on this device (bench/serving/trace_sim.py)",
        "tenants": tc["tenants"], "zipf_s": 1.0, "requests": tc["requests"], "rate_rps": round(RECORD_LOAD * capacity, 3),
        "rate_rule": f"{RECORD_LOAD:g} x deltapack's decode-bound capacity at full batches", "prompt_tokens": tc["prompt"],
        "output_tokens": tc["out"], "max_batch": B, "expected_distinct_tenants_per_full_batch": round(distinct, 1),
        "costs": costs_s,
        "swap_policy": "oldest waiting request's tenant next, all its waiting requests as one static batch",
        "swap_prefill": ("the base's prefill, measured (prefill_base_s)" if costs.prefill_base else
                         "the prefill WITH deltas (no base prefill was measured in this run): this overstates the swap "
                         "system's prefill, so its throughput and TTFT here are pessimistic"),
        "sweep": sweep,
        "step_costs_at_full_batch": {
            "base_step_s": round(b_full, 5),
            "delta_extra_s_at_expected_distinct": round(costs._interp(costs.decode_extra, distinct), 5),
            "delta_extra_s_at_bound": round(b_full * distinct / ratio, 5),
            "prefill_s_one_prompt": round(costs.prefill_s(1), 4), "swap_s": round(costs.swap_s, 4)},
        "load_rule": "offered load = arrival rate / deltapack's decode-bound capacity (measured costs); the same "
                     "arrivals (seed 0) for every system at a load",
        "deltapack_at_bound": f"the same simulation with each decode step's extra cost set to base step x k/R, R = "
                              f"{ratio:.2f} (the decode part's measured compression of the linear weights): what the "
                              "engine would do with kernels at the issue's bound; a model, not a measurement",
    }
    return records


def _profile(world: World, fn, reps: int) -> dict:
    """Run fn() `reps` times under torch.profiler: wall seconds per call, device-busy seconds per call (the kernels'
    own time: an op's device time is its kernels', so summing both would count them twice), the kernels (or, on the
    CPU, the ops) that take the time, by self time, and the Python functions that take the host's time (cProfile,
    a separate run: its hooks slow the host path down, so its wall time is not the one reported)."""
    import cProfile
    import pstats

    torch = world.torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm: Triton compiles, caches fill
    world.sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if world.cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        world.sync()
        wall = (time.perf_counter() - t0) / reps
    rows = []
    for e in prof.key_averages():
        on_device = getattr(e, "device_type", None) == DeviceType.CUDA
        if world.cuda and not on_device:
            continue
        dev = getattr(e, "self_device_time_total", None)
        if dev is None:
            dev = getattr(e, "self_cuda_time_total", 0)
        t = (dev if world.cuda else e.self_cpu_time_total) / 1e6 / reps  # profiler totals are microseconds
        if t > 0:
            rows.append({"name": e.key[:120], "calls": e.count // reps, "seconds": round(t, 6)})
    rows.sort(key=lambda r: -r["seconds"])
    busy = sum(r["seconds"] for r in rows)
    py = cProfile.Profile()
    py.enable()
    for _ in range(reps):
        fn()
    world.sync()
    py.disable()
    host = []
    for (path, line, func), (_, calls, tottime, cumtime, _) in pstats.Stats(py).stats.items():
        host.append({"function": f"{Path(path).name}:{line}({func})", "calls": calls // reps,
                     "self_s": round(tottime / reps, 6), "total_s": round(cumtime / reps, 6)})
    host.sort(key=lambda r: -r["self_s"])
    return {"wall_s": round(wall, 6), "busy_s": round(busy, 6), "busy_share": round(busy / wall, 3) if wall else None,
            "top": rows[:20], "host_top": host[:25]}


def part_profile(world: World, notes: dict) -> list[dict]:
    """Where a decode step with deltas and a prefill with deltas spend their time: eager (no CUDA graph, so each
    kernel shows), batch of the trace with k tenants round-robin, against the base. Goes to notes.profile (not one of
    the issue's record lists): the breakdown the kernel work starts from."""
    cfg = world.cfg
    tc = cfg["trace"]
    world.build_model()
    shapes = world.model_shapes()
    B, P = tc["batch"], cfg["prompt"]
    reps = 3 if world.cuda else 1
    vocab = cfg["model"]["vocab"]
    out: dict = {"batch": B, "kernels": "triton", "graph": False, "steps": {}}
    tenants = [world.tenant("delta-come", tc["ratio"], shapes, i) for i in range(max(tc["ks"]))]
    from deltapack.serve.fastpath import StaticDecoder

    for k in [0] + list(tc["ks"]):
        world.install(tenants[:k])
        rows = [-1] * B if k == 0 else [b % k for b in range(B)]
        dec = StaticDecoder(world.model, world.state, batch=B, max_len=P + reps + 8, graph=False)
        dec.prefill([[random.randrange(3, vocab) for _ in range(P)] for _ in range(B)], rows)
        out["steps"][f"decode k={k}"] = prof = _profile(world, dec.step, reps)
        log(f"profile decode k={k}: {prof['wall_s'] * 1e3:.1f} ms per step, device busy {prof['busy_s'] * 1e3:.1f} ms; "
            f"top: {', '.join(r['name'][:40] for r in prof['top'][:3])}")
        del dec
    world.install(tenants[:1])
    dec = StaticDecoder(world.model, world.state, batch=1, max_len=tc["prompt"] + 8, graph=False)
    prompt = [[random.randrange(3, vocab) for _ in range(tc["prompt"])]]
    out["steps"][f"prefill 1x{tc['prompt']} k=1"] = prof = _profile(world, lambda: dec.prefill(prompt, [0]), reps)
    log(f"profile prefill: {prof['wall_s'] * 1e3:.1f} ms, device busy {prof['busy_s'] * 1e3:.1f} ms")
    world.install([])
    notes["profile"] = out
    return []


def part_resident(world: World, notes: dict) -> list[dict]:
    torch = world.torch
    rc = world.cfg["resident"]
    world.free_model()
    world.templates.clear()
    m = world.cfg["model"]
    base_params = world.shape().params()
    shapes = world.model_shapes(embedding=True)
    budget = rc["budget"]
    if world.cuda:
        budget = min(budget, torch.cuda.get_device_properties(world.device).total_memory)
    reserve = 2 * 2**30 if world.cuda else 0  # activations, graph pools, allocator slack
    records = []
    for codec in rc["codecs"]:
        gc.collect()
        if world.cuda:
            torch.cuda.empty_cache()
        base = torch.empty(base_params, dtype=torch.bfloat16, device=world.device)
        kv = torch.empty(rc["kv_bytes"] // 2, dtype=torch.bfloat16, device=world.device)
        held = []
        for s in set(shapes.values()):
            world.template(codec, s, rc["ratio"])
        tbytes = sum(world.templates[(codec, s, rc["ratio"])].nbytes() for s in shapes.values())
        tmpl_bytes = sum(p.nbytes() for (c, _, r), p in world.templates.items() if c == codec and r == rc["ratio"])

        def allocated() -> int:
            if world.cuda:
                return torch.cuda.memory_allocated(world.device)
            return base.numel() * 2 + kv.numel() * 2 + tmpl_bytes + sum(sum(p.nbytes() for p in t.values()) for t in held)

        while len(held) < rc["max_tenants"] and allocated() + tbytes <= budget - reserve:
            held.append(world.tenant(codec, rc["ratio"], shapes, len(held)))
        gb = allocated() / 1e9
        records.append({"codec": codec, "ratio": rc["ratio"], "tenants": len(held), "gpu_gb": round(gb, 2)})
        log(f"resident {codec} {rc['ratio']:g}x: {len(held)} tenants of {tbytes / 1e9:.3f} GB, {gb:.2f} GB allocated")
        del held, base, kv
        for key in [k for k in world.templates if k[0] == codec]:
            del world.templates[key]
    notes["resident"] = {
        "budget_bytes": budget, "reserve_bytes": reserve, "base_bytes": base_params * 2, "kv_cache_bytes": rc["kv_bytes"],
        "kv_cache_tokens_7b": rc["kv_bytes"] // (2 * m["layers"] * m["hidden"] * 2),
        "tenant": "every linear, lm_head and the embedding, packed (templates included in the allocation)",
        "cap": rc["max_tenants"],
    }
    return records


# ---- targets (issue 6) --------------------------------------------------------------------------------------------------
def targets(data: dict) -> dict:
    """Each target against the records: met or missed, and by how much."""
    out = {}
    ks = [r for r in data.get("kernels", []) if r["k"] >= 8]
    if ks:
        worst = {}
        for r in ks:
            key = r["codec"]
            if key not in worst or r["efficiency"] < worst[key]["efficiency"]:
                worst[key] = r
        out["kernels_70pct_of_copy_at_k>=8"] = {
            c: {"worst": f"{r['shape']} k={r['k']}", "efficiency": r["efficiency"], "met": r["efficiency"] >= 0.7,
                "short_by": round(max(0.0, 0.7 - r["efficiency"]), 3)} for c, r in worst.items()}
    dec = data.get("decode", [])
    if dec:
        out["decode_80pct_of_bound"] = {
            f"{r['codec']} {r['ratio']:g}x k={r['k']}": {"of_bound": r["of_bound"], "met": r["of_bound"] >= 0.8,
                                                         "short_by": round(max(0.0, 0.8 - r["of_bound"]), 3),
                                                         **decode_extra(r)} for r in dec}
        out["what_bounds_decode"] = (
            "a step's time over the base's (extra_ms) is the delta kernels' time: one launch per linear per layer "
            "inside the step's CUDA graph. extra_ms_at_bound is what the deltas' bytes cost at the base's own rate "
            "(the 1/(1 + k/R) bound); extra_over_bound = extra_ms / extra_ms_at_bound, how many times longer the "
            "kernels take than their bytes. Their efficiencies and limits per path are in what_bounds_the_kernels: "
            "with few tenants each tenant has many rows (k=1 at batch 64: 64), so the launch takes the tensor-core "
            "path, which reads a tenant's delta once per 16 rows")
    tr = {r["system"]: r for r in data.get("trace", [])}
    if "deltapack" in tr and "swap" in tr:
        x = tr["deltapack"]["throughput"] / max(1e-12, tr["swap"]["throughput"])
        out["trace_10x_swap_throughput"] = {"ratio": round(x, 2), "met": x >= 10, "offered_load": RECORD_LOAD}
        sweep = data.get("notes", {}).get("trace", {}).get("sweep") or []
        if sweep:  # at the highest offered load both systems are saturated: the ratio of their capacities
            out["trace_10x_swap_throughput"]["saturated"] = {
                "offered_load": sweep[-1]["load"], "ratio": sweep[-1]["throughput_ratio"],
                "ratio_with_kernels_at_bound": sweep[-1].get("throughput_ratio_at_bound")}
    res = data.get("resident", [])
    if res:
        templates = data.get("notes", {}).get("templates", {})
        out["resident_50_tenants_16x"] = {f"{r['codec']} {r['ratio']:g}x": {"tenants": r["tenants"], "met": r["tenants"] >= 50,
                                                                            **resident_bound(r, templates)}
                                          for r in res}
    ncu_file = RESULTS / "serving_ncu.json"
    ncu = json.loads(ncu_file.read_text()) if ncu_file.is_file() else None
    out["what_bounds_the_kernels"] = bounds_note(data.get("kernels", []),
                                                 data.get("notes", {}).get("kernels", {}).get("batch", 64), ncu)
    return out


def decode_extra(r: dict) -> dict:
    """A decode record's step time over the base's, against what the bound allows (targets: what_bounds_decode)."""
    step = r["batch"] / r["tokens_per_s"]
    base = r["batch"] / r["base_tokens_per_s"]
    at_bound = base / r["bound"] - base
    return {"step_ms": round(1e3 * step, 2), "base_step_ms": round(1e3 * base, 2), "extra_ms": round(1e3 * (step - base), 2),
            "extra_ms_at_bound": round(1e3 * at_bound, 2), "extra_over_bound": round((step - base) / at_bound, 1)}


def resident_bound(r: dict, templates: dict) -> dict:
    """What a resident tenant of this codec costs on the GPU against its stored ratio (the smallest resident ratio of
    its matrix shapes), and, where that is what keeps the count short, why."""
    mine = [t for t in templates.values() if t.get("codec") == r["codec"] and t.get("ratio") == r["ratio"]]
    if not mine:
        return {}
    worst = min(mine, key=lambda t: t["resident_ratio"])
    out = {"resident_ratio": worst["resident_ratio"], "stored_ratio": worst["stored_ratio"], "layout": worst["layout"]}
    if worst["resident_ratio"] < 0.5 * worst["stored_ratio"]:
        out["bounded_by"] = (
            f"on the GPU a tenant takes 1/{worst['resident_ratio']:.2f} of the dense bytes, not 1/{worst['stored_ratio']:.0f}"
            + (f": the '{worst['layout']}' layout stores each non-zero's column (int16) beside its bf16 value, "
               f"{worst.get('resident_bytes_per_nonzero', float('nan')):.1f} bytes per non-zero with padding, while the "
               "stored delta keeps no positions at all (the mask is regenerated from its seed) and k-bit values; a "
               "kernel that regenerated the mask in registers would need the mask's RNG in Triton"
               if worst["layout"] == "ell" else ""))
    return out


def kernel_path(k: int, batch: int) -> str:
    """Which path a batch of k tenants takes for factors and sign codes: 1-2 tokens per tenant run on the CUDA-core
    decode path, more on the tensor-core path."""
    return "1-2 tokens/tenant" if batch // max(1, k) <= 2 else ">= 3 tokens/tenant"


def ncu_summary(ncu: dict, batch: int) -> dict:
    """Ranges of the Nsight Compute counters per kernel path (bench/serving/ncu.py's records): warps per scheduler
    (achieved occupancy x 64 warps / 4 schedulers), share of cycles issuing, DRAM share of peak, top stall reasons."""
    paths: dict = {}
    for r in ncu.get("records", []):
        path = "sparse (ELL)" if r["codec"] in ("dare", "deltadq") else kernel_path(r["k"], batch)
        paths.setdefault(path, []).append(r)

    def rng(vals):
        return [round(min(vals), 1), round(max(vals), 1)]

    out = {}
    for path, recs in paths.items():
        stalls: dict = {}
        for r in recs:
            for k, v in r["stalls"].items():
                if k not in ("selected", "not_selected"):
                    stalls[k] = stalls.get(k, 0.0) + v / len(recs)
        out[path] = {
            "launches": [f"{r['codec']} k={r['k']} {r['launch']}" for r in recs],
            "warps_per_scheduler": rng([r["occupancy_pct"] * 64 / 100 / 4 for r in recs]),
            "issue_active_pct": rng([r["issue_active_pct"] for r in recs]),
            "dram_pct": rng([r["dram_pct"] for r in recs]),
            "registers": rng([r["registers"] for r in recs]),
            "top_stalls": {k: round(v, 2) for k, v in sorted(stalls.items(), key=lambda kv: -kv[1])[:3]},
        }
    return {"source": f"bench/results/serving_ncu.json ({ncu.get('device')}, {ncu.get('date')}, kernels "
                      f"{ncu.get('kernels_sha')})", "by_path": out}


def bounds_note(kernels: list[dict], batch: int, ncu: dict | None = None) -> dict:
    """Per codec, the best efficiency with 1-2 and with more tokens per tenant (batch / k; factors and sign codes:
    the CUDA-core decode path and the tensor-core path), and what bounds each path."""
    by_path: dict = {}
    for r in kernels:
        path = kernel_path(r["k"], batch)
        cur = by_path.setdefault(r["codec"], {}).get(path)
        if cur is None or r["efficiency"] > cur["efficiency"]:
            by_path[r["codec"]][path] = {"efficiency": r["efficiency"], "at": f"{r['shape']} k={r['k']}"}
    return {
        "best_by_path": by_path,
        "1-2 tokens/tenant": "factors and sign: the decode path, codes decoded in place on the CUDA cores (an AND and an FFMA per code "
                             "and token, plus x loads): bound by instruction issue, not by memory (`ncu`: the schedulers "
                             "issue on most cycles while DRAM runs far below its peak); "
                             "bench/results/serving_sass.json has the instructions per code of each launch, "
                             "bench/results/serving_tune.json the block-size / warp / split sweep the defaults come from",
        ">= 3 tokens/tenant": "factors and sign: the tensor-core path, codes decoded to bf16 and moved through shared memory into the "
                              "MMA operand layout: several times the instructions per code of the decode path (serving_sass.json) "
                              "on few resident warps (`ncu`, below: a few warps per scheduler at the 128-register cap, issue on "
                              "under half the cycles, stalls on memory latency and dependent-instruction waits), "
                              "and a tenant with more than 16 tokens is read once per 16 (k=1 at batch 64: 4 times). "
                              "sparse (ELL): 3-D gathers of x by column, tens of instructions per non-zero whatever the token "
                              "count (`ncu`: memory-latency and MIO-throttle stalls)",
        **({"ncu": ncu_summary(ncu, batch)} if ncu else {}),
    }


# ---- output -------------------------------------------------------------------------------------------------------------
def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    a = ax[0, 0]
    for codec in sorted({r["codec"] for r in data.get("kernels", [])}):
        for shape in sorted({r["shape"] for r in data["kernels"] if r["codec"] == codec}):
            rs = sorted((r for r in data["kernels"] if r["codec"] == codec and r["shape"] == shape), key=lambda r: r["k"])
            a.plot([r["k"] for r in rs], [r["efficiency"] for r in rs], marker="o", label=f"{codec} {shape}")
    a.axhline(0.7, color="k", ls="--", lw=0.8)
    a.set(xscale="log", xlabel="tenants in the batch (k)", ylabel="GB/s / copy GB/s", title="kernels (batch 64)")
    a.legend(fontsize=6)
    a = ax[0, 1]
    for key in sorted({(r["codec"], r["ratio"]) for r in data.get("decode", [])}):
        rs = sorted((r for r in data["decode"] if (r["codec"], r["ratio"]) == key), key=lambda r: r["k"])
        a.plot([r["k"] for r in rs], [r["tokens_per_s"] / r["base_tokens_per_s"] for r in rs], marker="o",
               label=f"{key[0]} {key[1]:g}x measured")
        a.plot([r["k"] for r in rs], [r["bound"] for r in rs], ls=":", label=f"{key[0]} {key[1]:g}x bound 1/(1+k/R)")
    a.set(xscale="log", xlabel="tenants in the batch (k)", ylabel="decode tokens/s / base tokens/s", title="end-to-end decode")
    a.legend(fontsize=7)
    a = ax[1, 0]
    tr = data.get("trace", [])
    sweep = data.get("notes", {}).get("trace", {}).get("sweep") or []
    if sweep:
        loads = [w["load"] for w in sweep]
        for system, style in (("deltapack", "-o"), ("swap", "--s"), ("deltapack_at_bound", "-.^")):
            if all(system in w for w in sweep):
                a.plot(loads, [w[system]["throughput"] for w in sweep], style, label=f"{system} throughput")
        a.set(xlabel="offered load (x deltapack's capacity)", ylabel="tokens/s",
              title="trace (simulated, per-step costs measured on the GPU)")
        b = a.twinx()
        for system, style in (("deltapack", ":o"), ("swap", ":s")):
            b.plot(loads, [w[system]["ttft_p99"] for w in sweep], style, alpha=0.6, label=f"{system} TTFT p99")
        b.set(ylabel="TTFT p99 (s)", yscale="log")
        a.legend(fontsize=7, loc="upper left")
        b.legend(fontsize=7, loc="lower right")
    elif tr:
        names = [r["system"] for r in tr]
        a.bar(names, [r["throughput"] for r in tr])
        a.set(ylabel="tokens/s", title="trace (simulated, measured costs): throughput")
        for i, r in enumerate(tr):
            a.text(i, r["throughput"], f"TTFT p50 {r['ttft_p50']:.2f}s\np99 {r['ttft_p99']:.2f}s", ha="center", va="bottom", fontsize=8)
    a = ax[1, 1]
    rs = data.get("resident", [])
    if rs:
        a.bar([f"{r['codec']} {r['ratio']:g}x" for r in rs], [r["tenants"] for r in rs])
        a.axhline(50, color="k", ls="--", lw=0.8)
        a.set(ylabel="tenants resident", title="tenants beside base + KV cache")
    fig.suptitle(f"{data.get('device', '')} — {data.get('date', '')}", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def resimulate_trace(out: Path, tc: dict) -> None:
    """The trace part again from the per-step costs a GPU run stored: the simulation is pure Python, so a change to
    it (or a new load sweep) needs no GPU time. notes.runs.trace keeps the device run that measured the costs."""
    data = json.loads(out.read_text())
    notes = data["notes"]
    measured = notes["runs"].get("trace", {})
    if not notes.get("trace", {}).get("costs") or not measured:
        raise SystemExit(f"{out} has no measured trace costs (run --parts trace on the GPU first)")
    command = command_line()
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    data["trace"] = simulate_trace(notes["trace"]["costs"], tc, notes)
    notes["runs"]["trace_simulation"] = {
        "command": command, "date": date, "host": platform.node() or platform.machine(),
        "costs_from": f"{measured.get('command')} on {measured.get('device')} at {measured.get('date')}"}
    data["command"] = command
    notes["targets"] = targets(data)
    write_json(out, data)
    plot(data, out.with_suffix(".png"))
    log(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/serving[_smoke].json)")
    ap.add_argument("--trace-from-costs", action="store_true",
                    help="re-run only the trace simulation (records + load sweep) from the per-step costs already in "
                         "--out (notes.trace.costs, measured on the GPU); no GPU needed")
    ap.add_argument("--targets-only", action="store_true",
                    help="recompute notes.targets of --out from its records (no GPU; records unchanged)")
    ap.add_argument("--codecs", default=None, help="only these codecs (comma-separated) in kernels/decode/resident; "
                    "the other codecs' records already in the file are kept")
    args = ap.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown parts {bad}; choose from {PARTS}")
    if args.targets_only:
        out = Path(args.out) if args.out else RESULTS / "serving.json"
        data = json.loads(out.read_text())
        data["notes"]["targets"] = targets(data)
        data["notes"].setdefault("runs", {})["targets"] = {
            "command": command_line(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        write_json(out, data)
        return log(f"wrote {out}")
    if args.trace_from_costs:
        return resimulate_trace(Path(args.out) if args.out else RESULTS / "serving.json", settings(args.smoke)["trace"])
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    world = World(args.smoke)
    only = None
    if args.codecs:
        import synth

        only = [c.strip() for c in args.codecs.split(",") if c.strip()]
        if any(c not in synth.CODECS for c in only):
            ap.error(f"unknown codecs in {only}; choose from {synth.CODECS}")
        world.cfg["kernel_codecs"] = world.cfg["decode_codecs"] = world.cfg["resident"]["codecs"] = only
    out = Path(args.out) if args.out else RESULTS / ("serving_smoke.json" if args.smoke else "serving.json")
    data = json.loads(out.read_text()) if out.is_file() else {}
    notes = data.setdefault("notes", {})
    errors = notes.setdefault("errors", {})
    runs = notes.setdefault("runs", {})
    command = command_line()
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    data.update({"command": command, "device": world.name(), "date": date})
    for p in RECORD_PARTS:
        data.setdefault(p, [])
    fns = {"kernels": part_kernels, "decode": part_decode, "trace": part_trace, "profile": part_profile,
           "resident": part_resident}
    for p in PARTS:  # fixed order: resident frees the model, so it runs last
        if p not in parts:
            continue
        t0 = time.perf_counter()
        log(f"part {p}")
        try:
            recs = fns[p](world, notes)
            if only is not None and p != "trace":  # keep the records of codecs not run now
                recs = [r for r in data.get(p, []) if r.get("codec") not in only] + recs
            if p in RECORD_PARTS:
                data[p] = recs
            errors.pop(p, None)
        except Exception as e:
            traceback.print_exc()
            errors[p] = f"{type(e).__name__}: {e}"
            log(f"part {p} FAILED: {errors[p]}")
        # a run of some codecs only keeps the provenance of the other codecs' records (the earlier full run); a full
        # run replaces every record of the part, so earlier codec-only provenance goes
        key = p if only is None or p == "trace" else f"{p}:{','.join(only)}"
        if only is None:
            for stale in [k for k in runs if k.startswith(f"{p}:")]:
                del runs[stale]
        runs[key] = {"command": command, "device": world.name(), "date": date, "seconds": round(time.perf_counter() - t0, 1),
                     "kernels_sha": kernels_sha()}
        notes.setdefault("templates", {}).update(world.template_stats)
        write_json(out, data)  # after every part: a later crash keeps what was measured
    notes["targets"] = targets(data)
    write_json(out, data)
    try:
        plot(data, out.with_suffix(".png"))
    except Exception as e:  # the numbers matter more than the figure
        log(f"plot failed: {e}")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
