"""The HTTP server: OpenAI-compatible completions / chat, model list, runtime delta loading, health, metrics.

Request bodies are read and checked by deltapack.serve.guard and validated against deltapack.serve.protocol (malformed
JSON, wrong types, unsupported fields are 400s in OpenAI's error shape, not FastAPI's 422s), all before a request is
queued. Generation runs on the engine thread; each HTTP request waits on an asyncio queue the engine feeds. A client
that goes away (a closed stream, or a dropped connection while waiting) aborts its requests, which frees their slots.

(No `from __future__ import annotations` here: FastAPI reads the handlers' annotations at runtime, and `Request` is
imported inside `create_app` so that importing this module does not need fastapi.)
"""

import asyncio
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from deltapack import __version__
from deltapack.errors import DeltapackError
from deltapack.serve.engine import (
    Engine,
    ErrorEvent,
    FinishEvent,
    GenRequest,
    PromptEvent,
    TokenEvent,
)
from deltapack.serve.grammar import GrammarSpec
from deltapack.serve.guard import Guard, HTTPOptions, read_json
from deltapack.serve.metrics import CONTENT_TYPE, ServeMetrics
from deltapack.serve.protocol import (
    CHAT_REJECTED,
    COMPLETION_REJECTED,
    MAX_STOP,
    MAX_STOP_CHARS,
    APIError,
    ChatRequest,
    CompletionRequest,
    DeltaLoadRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
    validate,
)
from deltapack.serve.sampling import SamplingParams
from deltapack.serve.startup import StartupClock, in_background
from deltapack.serve.text import token_text
from deltapack.serve.tiers import PACK_STATS, ConflictError, DeltaTiers, Tenant, TooLargeError

log = logging.getLogger(__name__)

MAX_PROMPTS = 256  # prompts in one completions request
DISCONNECT_POLL_S = 0.5


@dataclass
class ServerState:
    runner: object
    tiers: DeltaTiers
    engine: Engine
    metrics: ServeMetrics
    base_name: str
    delta_root: Path | None = None
    verify_base: bool = True
    created: int = field(default_factory=lambda: int(time.time()))
    # warm-up progress (/health): state idle | running | done | failed, and when it started / ended
    warmup: dict = field(default_factory=lambda: {"state": "idle"})
    # start-up phase times (/health "startup"); the CLI's clock also covers imports and the HTTP socket
    startup: StartupClock = field(default_factory=lambda: StartupClock(since_process_start=False))

    def close(self) -> None:
        self.engine.stop()
        comp = getattr(self.runner.state.kernels, "compiler", None)
        if comp is not None:
            comp.close()
        self.tiers.close()


def build_server(
    base: str,
    deltas: list[tuple[str, str]] = (),
    *,
    delta_root: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    kernels: str = "auto",
    max_batch: int = 16,
    gpu_delta_bytes: int = 2 << 30,
    cpu_delta_bytes: int = 8 << 30,
    max_model_len: int | None = None,
    max_prefill_tokens: int = 4096,
    served_model_name: str | None = None,
    verify_base: bool = True,
    decode: str = "auto",
    prefill_delay_s: float | None = None,
    compiler=None,
    clock: StartupClock | None = None,
    merged_bytes: int | str | None = 0,
    prepack: bool | None = None,
    pack_device: str = "host",
) -> ServerState:
    """Load the base, register the deltas, start the engine thread. `compiler` (a deltapack.kernels.compile.
    KernelCompiler): Triton kernel variants compile on it in the background while their launches run on the torch
    path (the CLI attaches one on CUDA); None: each variant compiles on its first launch. `clock`: records the
    phases (base load, deltas, engine) for the log and /health; build_server makes one when none is given.
    `merged_bytes`: device memory for merged copies of hot tenants' weights (deltapack.serve.merged): bytes, 0 = off
    (the default: its CUDA-graph path has not run on a GPU yet), "auto" = on a GPU as much as free memory allows
    beyond the tiers', KV cache's and a headroom; off on a CPU. `prepack`: pack the deltas in background threads
    while the base loads (None: where the host has PREPACK_MIN_CPUS cores or more; on a small host they would
    compete with the load for the same cores). `pack_device`: "host" packs the deltas on the CPU; "auto" on the
    serving device when it is a GPU (tiers.pack_tensor's work_device)."""
    if pack_device not in ("host", "auto"):
        raise DeltapackError(f"--pack-device must be host or auto, got {pack_device!r}")
    clock = clock or StartupClock(since_process_start=False)
    with clock.phase("imports"):  # torch and our kernels: already imported by the CLI, not by tests
        from deltapack.serve.model import ModelRunner

    root = Path(delta_root).resolve() if delta_root else None
    if root is not None and not root.is_dir():
        raise DeltapackError(f"--delta-root {delta_root} is not a directory")
    if device == "auto" or str(device).startswith("cuda"):
        # the CUDA context (1-3 s on a GPU host) starts in a thread while transformers imports (GIL-bound Python)
        # instead of at the model's first move to the device; torch's lazy init is locked, so that move waits for it
        in_background(partial(_init_cuda, str(device)), "deltapack-cuda-init")
    fingerprint = None
    if deltas and verify_base and Path(base).is_dir():
        # the deltas' full-content base check hashes every base tensor: a second read of the base, done here while
        # transformers imports and loads it (hashing releases the GIL) instead of after
        from deltapack.compress import base_fingerprint
        from deltapack.io.sources import open_model

        fingerprint = in_background(lambda: base_fingerprint(open_model(base)), "deltapack-fingerprint")
    backend, prepacked = kernels, {}
    if prepack is None:
        prepack = (os.cpu_count() or 1) >= PREPACK_MIN_CPUS
    if deltas and prepack:
        # the deltas pack beside the base load (transformers' import and the weights' read are most of it) instead
        # of after it: packing needs only the dtype and the kernel backend, both known before the model exists
        with clock.phase("prepack start"):
            backend, prepacked = _start_prepacks(base, [p for _, p in deltas], device, dtype, kernels, pack_device)
    base_steps: dict[str, float] = {}
    try:
        with clock.phase("base load"):
            runner = ModelRunner(base, device=device, dtype=dtype, kernels=backend, max_model_len=max_model_len,
                                 timings=base_steps)
    except BaseException:
        for f in prepacked.values():
            f.cancel()
        raise
    clock.notes["base load"] = base_steps  # where the base load's time went (transformers' import, read, ...)
    if compiler is not None and hasattr(runner.state.kernels, "compiler"):
        runner.state.kernels.compiler = compiler
    name = served_model_name or str(base)
    tiers = DeltaTiers(runner, device_bytes=gpu_delta_bytes, host_bytes=cpu_delta_bytes, base_name=name,
                       pack_device=work_device(pack_device, runner.device))
    if fingerprint is not None:
        tiers.use_fingerprint(fingerprint)
    tiers.use_prepacked(prepacked)
    budget = merged_budget(merged_bytes, runner.device)
    if budget != 0:
        from deltapack.serve.merged import MergedWeights

        tiers.merged = MergedWeights(runner, tiers, budget=budget)
    try:
        with clock.phase("deltas"):
            tiers.register_many(list(deltas), verify_base=verify_base)  # prepared in parallel threads
        # summed over the threads: where the deltas' time went; and where they were packed
        clock.notes["deltas"] = dict(tiers.timings, pack_device=str(tiers.pack_device or "host"),
                                     device_pack_fallbacks=PACK_STATS["device_fallbacks"])
        if tiers.pack_device is not None:  # the packs' temporaries, kept by the caching allocator, would count as
            torch.cuda.empty_cache()  # used memory where the KV cache and merged copies are sized from free memory
    except BaseException:
        tiers.close()
        raise
    with clock.phase("engine"):
        metrics = ServeMetrics()
        engine = Engine(runner, tiers, max_batch=max_batch, max_prefill_tokens=max_prefill_tokens, metrics=metrics,
                        decode=decode, prefill_delay_s=prefill_delay_s)
        metrics.bind(engine, tiers)
        engine.start()
    return ServerState(runner, tiers, engine, metrics, name, root, verify_base, startup=clock)


PREPACK_MIN_CPUS = 8  # a GPU server's host; on this project's 2-core CPU machine the packing threads took the cores
# the base load needed, and the start got no faster


def work_device(pack_device: str, device: torch.device) -> torch.device | None:
    """Where deltas are packed (tiers.pack_tensor's work_device): the serving GPU for "auto", else the host (None)."""
    return device if pack_device == "auto" and device.type == "cuda" else None


def _start_prepacks(base: str, paths: list, device: str, dtype: str, kernels: str, pack_device: str = "host"):
    """(kernel backend, {path: future}) for build_server: the backend the model will use, made now, and the deltas'
    packing started on it. Anything that stops this (a base or option the model load will refuse) leaves the
    packing to registration, and the error to the model load."""
    from deltapack.io.sources import open_model
    from deltapack.kernels import get_kernels
    from deltapack.serve.model import resolve_device, serving_dtype
    from deltapack.serve.tiers import start_prepacks

    try:
        dev = resolve_device(device)
        backend = get_kernels(kernels, dev)
        return backend, start_prepacks(paths, serving_dtype(dtype, dev, open_model(base)), backend,
                                       work_device=work_device(pack_device, dev))
    except Exception as e:  # noqa: BLE001 -- an optimisation only: registration packs and reports
        log.debug("deltas not packed ahead of the base load: %s", e)
        return kernels, {}


def merged_budget(merged_bytes: int | str | None, device: torch.device) -> int | None:
    """--merged-bytes as MergedWeights' budget: bytes, 0 = off, None = limited by free device memory only. auto: that
    on a GPU; off on a CPU, where memory is the host's and a merged copy would compete with everything else."""
    if merged_bytes in ("auto", None):
        return None if device.type == "cuda" else 0
    n = int(merged_bytes)
    if n < 0:
        raise DeltapackError(f"--merged-bytes must be >= 0, got {n}")
    return n


def _init_cuda(device: str) -> None:
    if torch.cuda.is_available():
        dev = torch.device("cuda" if device == "auto" else device)
        torch.empty(1, device=dev)  # creates the context on that device


def warmup(state: ServerState, *, prompt_tokens: int = 24, max_tokens: int = 3, timeout_s: float = 1800.0,
           calibrate: bool = False) -> dict:
    """Send one short greedy request for the base and for every registered delta at once, and wait for them: the
    kernels the first real requests would need (prefill blocks, mixed-tenant decode steps, every bit width the
    deltas use) are compiled and the deltas loaded. Then stand-in prefills and the decode graphs (engine.warm_up).
    With a background compiler on the kernels (build_server's `compiler`), every launch meanwhile runs on the torch
    path until its variant is ready, the graphs' steps are run once eagerly to queue their variants, and the graphs
    are captured once all are compiled. calibrate: then measure the kernel and the dense path per layout and shape
    (deltapack.kernels.schedule) and let the cost model choose between them from then on.
    Returns {model: finish reason or error}. Warm-up requests are counted in /metrics like any other. Progress is
    kept in state.warmup (/health shows it)."""
    st = state.warmup
    st.update(state="running", started=time.time(), finished=None, error=None)
    try:
        outcome = _warm(state, prompt_tokens, max_tokens, timeout_s, calibrate)
    except Exception as e:
        st.update(state="failed", finished=time.time(), error=f"{e.__class__.__name__}: {e}")
        raise
    st.update(state="done", finished=time.time())
    return outcome


def start_warmup(state: ServerState, **kw) -> threading.Thread:
    """`warmup` in a daemon thread: the server answers (on the torch path where kernels still compile) meanwhile.
    A failure is logged and shown by /health; the server keeps serving."""

    def run():
        try:
            warmup(state, **kw)
        except Exception:
            log.exception("background warm-up failed")

    state.warmup.update(state="running", started=time.time())
    t = threading.Thread(target=run, name="deltapack-warmup", daemon=True)
    t.start()
    return t


def _warm(state: ServerState, prompt_tokens: int, max_tokens: int, timeout_s: float, calibrate: bool) -> dict:
    from deltapack.serve.engine import ErrorEvent, FinishEvent, GenRequest
    from deltapack.serve.sampling import SamplingParams

    names = [state.base_name] + [n for n, t in state.tiers.tenants.items() if not t.removed]
    done = threading.Event()
    outcome: dict[str, str] = {}
    lock = threading.Lock()

    def emit(name: str, ev) -> None:
        if isinstance(ev, (FinishEvent, ErrorEvent)):
            with lock:
                outcome[name] = ev.reason if isinstance(ev, FinishEvent) else f"error {ev.status}: {ev.message}"
                if len(outcome) == len(names):
                    done.set()

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, name in enumerate(names):
        target = resolve_model(state, name)
        ids = [(7 + 13 * j) % max(2, target.vocab) for j in range(prompt_tokens)]  # any valid ids: only shapes matter
        state.engine.submit(GenRequest(f"warmup-{i}", name, target.tenant, ids, params, partial(emit, name),
                                       target.tokenizer, target.vocab, target.eos_ids))
    if not done.wait(timeout_s):
        raise DeltapackError(f"warm-up did not finish in {timeout_s:.0f} s (finished: {sorted(outcome)})")
    bad = {n: o for n, o in outcome.items() if o.startswith("error")}
    if bad:
        raise DeltapackError(f"warm-up failed: {bad}")
    # graph decoding: capture every token bucket's decode step now, with the tenants that are on the device
    slots = [t.slot for t in state.tiers.tenants.values() if not t.removed and t.slot is not None and t.tier == "device"]
    kernels = state.runner.state.kernels
    comp = getattr(kernels, "compiler", None)
    if comp is not None:
        state.engine.warm_up(slots, capture=False)  # queue the prefill and graph variants
        if not comp.wait(timeout_s):
            raise DeltapackError(f"kernel compilation did not finish in {timeout_s:.0f} s ({comp.status()})")
        graphs = state.engine.warm_up(slots, prefills=False)
    else:
        graphs = state.engine.warm_up(slots)
    if graphs:
        log.info("warm-up captured %d decode graphs", graphs)
    if calibrate:
        _calibrate(state)
    return outcome


def _calibrate(state: ServerState) -> None:
    """Fit the kernel-vs-dense cost model on the resident deltas (deltapack.kernels.schedule)."""
    from contextlib import nullcontext

    from deltapack.kernels.schedule import calibrate

    rs = state.runner.state
    comp = getattr(rs.kernels, "compiler", None)
    t0 = time.perf_counter()
    with state.tiers.lock, (comp.blocking() if comp is not None else nullcontext()):
        layers = {k: lay for k, lay in rs.layers.items() if lay.count}
        costs = calibrate(rs.kernels, layers, dtype=state.runner.dtype, device=state.runner.device,
                          max_tokens=min(1024, state.engine.max_prefill_tokens))
        rs.costs = costs
    state.warmup["cost_model"] = costs.summary()
    log.info("cost model calibrated in %.1f s: %s", time.perf_counter() - t0,
             {k: v["dense_from_tokens"] for k, v in costs.summary().items()})


# ---- helpers --------------------------------------------------------------------------------------------------------
class ClientGone(Exception):
    pass


@dataclass
class Target:
    name: str
    tenant: Tenant | None
    tokenizer: object | None
    vocab: int
    eos_ids: set[int]


def resolve_model(state: ServerState, name: str) -> Target:
    r = state.runner
    if name == state.base_name:
        return Target(name, None, r.tokenizer, r.vocab_size, set(r.eos_ids))
    t = state.tiers.tenants.get(name)
    if t is None or t.removed:
        raise APIError(404, f"The model `{name}` does not exist.", "not_found_error", "model", "model_not_found")
    return Target(name, t, t.tokenizer, t.vocab_size, set(t.eos_ids))


def _encode(tok, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(tok(text, add_special_tokens=add_special_tokens)["input_ids"])


def _check_ids(ids: list[int], vocab: int, param: str) -> None:
    if not ids:
        raise APIError(400, "the prompt is empty", param=param)
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})", param=param)


def _check_context(state: ServerState, n_prompt: int, max_tokens: int) -> None:
    limit = state.runner.max_model_len
    if n_prompt + max_tokens > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested {n_prompt + max_tokens} "
            f"tokens ({n_prompt} in the prompt, {max_tokens} in the completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )


def _check_token_list(ids: list[int] | None, vocab: int, param: str) -> list[int]:
    bad = [i for i in ids or [] if not 0 <= i < vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} in {param} is outside the model's vocabulary (0..{vocab - 1})", param=param)
    return list(ids or [])


def _logit_bias(bias: dict[str, float] | None, vocab: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        if not re.fullmatch(r"[0-9]{1,12}", key) or int(key) >= vocab:
            raise APIError(400, f"logit_bias keys must be token ids within the vocabulary (0..{vocab - 1}), given as "
                                f"strings of digits; got {key[:40]!r}", param="logit_bias")
        if not -100.0 <= value <= 100.0:
            raise APIError(400, f"logit_bias values must lie in [-100, 100]; token {key} has {value}", param="logit_bias")
        out[int(key)] = float(value)
    return out


def _stop_strings(req, tok) -> list[str]:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if stop and tok is None:
        raise APIError(400, "stop strings need a tokenizer; this model serves token ids only (use stop_token_ids)", param="stop")
    if len(stop) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise APIError(400, f"at most {MAX_STOP} stop strings of at most {MAX_STOP_CHARS} characters", param="stop")
    return [s for s in stop if s]


def _sampling(req, target: Target, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None,
              grammar=None) -> SamplingParams:
    """The engine's parameters of one request, every value checked against the model (a 400 before it is queued)."""
    vocab = target.vocab
    top_p = 1.0 if req.top_p is None else req.top_p
    if float(torch.tensor(top_p, dtype=torch.float32)) <= 0.0:  # sampling runs in float32: 1e-300 would be 0
        raise APIError(400, f"top_p {top_p} rounds to 0 in float32; use at least 1e-38", param="top_p")
    min_tokens = req.min_tokens or 0
    if min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({min_tokens}) exceeds max_tokens ({max_tokens})", param="min_tokens")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise APIError(400, "best_of other than n (ranking extra candidates) is not supported", param="best_of",
                       code="unsupported_parameter")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=top_p,
        top_k=req.top_k if req.top_k and req.top_k > 0 else 0,
        min_p=req.min_p or 0.0,
        seed=req.seed,
        stop=_stop_strings(req, target.tokenizer),
        stop_token_ids=_check_token_list(req.stop_token_ids, vocab, "stop_token_ids"),
        ignore_eos=bool(req.ignore_eos),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=_logit_bias(req.logit_bias, vocab),
        allowed_token_ids=(sorted(set(_check_token_list(req.allowed_token_ids, vocab, "allowed_token_ids")))
                           if req.allowed_token_ids is not None else None),
        min_tokens=min_tokens,
        include_stop_str_in_output=bool(req.include_stop_str_in_output),
        skip_special_tokens=req.skip_special_tokens is not False,
        grammar=grammar,
    )


def _choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n choices of one prompt: with a seed, choice j samples with seed + j (so choices differ, and each is
    reproducible); without, each draws its own random seed."""
    if n == 1 or params.seed is None:
        return [params] * n
    return [replace(params, seed=params.seed + j) for j in range(n)]


def grammar_spec(req, tool_schema: dict | None = None) -> GrammarSpec | None:
    """The request's one structured-output constraint (response_format, guided_*, structured_outputs or a forced
    tool call), or None. Two at once are refused."""
    specs: list[GrammarSpec] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        specs.append(GrammarSpec("json_object", None, "response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise APIError(400, "response_format of type json_schema needs json_schema.schema", param="response_format.json_schema")
        specs.append(GrammarSpec("json_schema", rf.json_schema.schema_, "response_format.json_schema.schema"))
    for field_name, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"), ("guided_grammar", "grammar")):
        value = getattr(req, field_name)
        if value is not None:
            specs.append(GrammarSpec(kind, value, field_name))
    so = req.structured_outputs
    if so is not None:
        for field_name, kind in (("json_", "json_schema"), ("regex", "regex"), ("choice", "choice"), ("grammar", "grammar")):
            value = getattr(so, field_name)
            if value is not None:
                specs.append(GrammarSpec(kind, value, "structured_outputs." + field_name.rstrip("_")))
        if so.json_object:
            specs.append(GrammarSpec("json_object", None, "structured_outputs.json_object"))
    if tool_schema is not None:
        specs.append(GrammarSpec("json_schema", tool_schema, "tool_choice"))
    if len(specs) > 1:
        raise APIError(400, f"give one structured-output constraint, not {len(specs)} ({', '.join(s.param for s in specs)})",
                       param=specs[1].param)
    return specs[0] if specs else None


async def _compile(spec: GrammarSpec | None, target: Target):
    if spec is None:
        return None
    from starlette.concurrency import run_in_threadpool

    from deltapack.serve.grammar import GrammarError, compile_spec

    try:
        return await run_in_threadpool(compile_spec, spec, target.tokenizer, target.vocab, target.eos_ids)
    except GrammarError as e:
        raise APIError(400, str(e), param=e.param) from None


class Submission:
    """Engine requests of one HTTP request, and the queue their events arrive on."""

    def __init__(self, state: ServerState, target: Target, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], prefix: str):
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        base = uuid.uuid4().hex
        self.request_ids = [f"{prefix}-{base}-{i}" for i in range(len(prompts))]
        self.pending = set(range(len(prompts)))
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        self.reqs = []
        for i, ids in enumerate(prompts):
            self.reqs.append(
                GenRequest(
                    self.request_ids[i], target.name, target.tenant, ids, per_prompt[i], partial(self._emit, i),
                    target.tokenizer, target.vocab, target.eos_ids,
                )
            )
        for r in self.reqs:
            state.engine.submit(r)

    def _emit(self, i: int, ev) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))
        except RuntimeError:  # event loop closed: the server is going down
            pass

    async def next(self, request) -> tuple[int, object]:
        while True:
            try:
                i, ev = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ClientGone() from None
                continue
            if isinstance(ev, (FinishEvent, ErrorEvent)):
                self.pending.discard(i)
            return i, ev

    def abort(self) -> None:
        for i in list(self.pending):
            self.state.engine.abort(self.request_ids[i])
        self.pending.clear()

    async def events(self, request):
        """(prompt index, event) until every prompt has finished. An engine error is raised as APIError; whatever
        ends the iteration early (error, client gone, a cancelled stream) frees the engine slots still held.
        Use under `contextlib.aclosing` so that happens at once, not when the generator is collected."""
        try:
            while self.pending:
                i, ev = await self.next(request)
                if isinstance(ev, ErrorEvent):
                    raise APIError(ev.status, ev.message, ev.type, None, ev.code)
                yield i, ev
        finally:
            self.abort()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _usage(p: int, c: int) -> dict:
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _token_str(tok, token_id: int, as_ids: bool) -> str:
    return f"token_id:{token_id}" if as_ids else token_text(tok, token_id)


class _LogprobAcc:
    """OpenAI completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, tok, start_offset: int = 0, as_ids: bool = False):
        self.tok = tok
        self.offset = start_offset
        self.as_ids = as_ids
        self.clear()

    def clear(self):
        self.tokens, self.lps, self.tops, self.offsets = [], [], [], []

    def add(self, token_id: int, lp, top):
        s = _token_str(self.tok, token_id, self.as_ids)
        self.tokens.append(s)
        self.lps.append(lp)
        self.tops.append(None if top is None else {_token_str(self.tok, i, self.as_ids): v for i, v in top})
        self.offsets.append(self.offset)
        self.offset += len(token_text(self.tok, token_id)) if self.as_ids else len(s)

    def body(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.lps, "top_logprobs": self.tops, "text_offset": self.offsets}


# ---- tool calls -----------------------------------------------------------------------------------------------------
def tool_mode(req) -> tuple[str | None, dict | None]:
    """(mode, JSON schema the output must follow) for a chat request's tools: mode None (no tools, or tool_choice
    "none": plain text), "named" (the output is the named function's arguments) or "required" (a list of
    {name, parameters} calls). "auto" would need a model-specific parser of free text: refused."""
    tools = req.tools or []
    choice = req.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None, None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tool function names must be unique", param="tools")
    if choice is None or choice == "auto":
        raise APIError(400, 'tool_choice "auto" (the default when tools are given) is not supported: it needs a parser of '
                            "the model's own tool-call format. Pass tool_choice \"required\", a named function "
                            '({"type": "function", "function": {"name": ...}}) or "none"', param="tool_choice",
                       code="unsupported_parameter")
    if choice == "none":
        return None, None
    funcs = {t.function.name: t.function for t in tools}
    if choice != "required":
        fn = funcs.get(choice.function.name)
        if fn is None:
            raise APIError(400, f"tool_choice names function {choice.function.name!r}, which is not in tools", param="tool_choice")
        return "named", fn.parameters or {"type": "object", "properties": {}}
    defs: dict = {}
    variants = []
    for fn in tools:
        params = dict(fn.function.parameters or {"type": "object", "properties": {}})
        for k, v in (params.pop("$defs", None) or {}).items():  # "#/$defs/X" references resolve from the root
            if k in defs and defs[k] != v:
                raise APIError(400, f"tools define $defs/{k} differently", param="tools")
            defs[k] = v
        variants.append({"type": "object", "properties": {"name": {"enum": [fn.function.name]}, "parameters": params},
                         "required": ["name", "parameters"], "additionalProperties": False})
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": variants}}
    if req.parallel_tool_calls is False:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return "required", schema


def tool_calls_of(mode: str, req, text: str) -> list[dict] | None:
    """The tool calls a constrained output encodes (None if it does not parse: a cut-off output)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if mode == "named":
        calls = [(req.tool_choice.function.name, value)]
    else:
        try:
            calls = [(c["name"], c["parameters"]) for c in value]
        except (KeyError, TypeError):  # the grammar rules this out; a shape it let through is returned as text
            return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}} for name, args in calls]


def _chat_messages(req) -> list[dict]:
    out = []
    for m in req.messages:
        content = m.content if isinstance(m.content, str) or m.content is None else "".join(part.text for part in m.content)
        if content is None and m.refusal is not None:
            content = m.refusal
        msg: dict = {"role": m.role, "content": content or ""}
        if m.name:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def render_chat(req, tok) -> str:
    """The chat request's prompt text through the model's template (template errors are the client's: 400)."""
    if req.continue_final_message and req.add_generation_prompt:
        raise APIError(400, "continue_final_message needs add_generation_prompt: false", param="continue_final_message")
    kw = {}
    if req.tools:
        kw["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
    if req.continue_final_message:
        kw["continue_final_message"] = True
    try:
        return tok.apply_chat_template(_chat_messages(req), add_generation_prompt=req.add_generation_prompt is not False,
                                       tokenize=False, **kw)
    except Exception as e:  # template errors (e.g. roles it refuses) are the client's
        raise APIError(400, f"cannot apply the chat template: {str(e)[:500]}", param="messages") from None


# ---- app --------------------------------------------------------------------------------------------------------------
def create_app(state: ServerState, options: HTTPOptions | None = None):
    """The FastAPI app of a built server. `options`: API key, Host check, body limit, access log (HTTPOptions()
    by default: no key, a loopback bind)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    opts = options or HTTPOptions()
    app = FastAPI(title="deltapack serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.deltapack = state
    app.add_middleware(Guard, options=opts, on_error=lambda status: state.metrics.http_errors.labels(str(status)).inc())

    def err(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None) -> JSONResponse:
        state.metrics.http_errors.labels(str(status)).inc()
        return JSONResponse(error_body(message, type_, param, code), status_code=status)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return err(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        if exc.status_code == 404:
            return err(404, f"no route {request.method} {request.url.path}: this server answers /v1/completions, "
                            "/v1/chat/completions, /v1/models, /v1/deltas, /tokenize, /detokenize, /version, /health, "
                            "/metrics", "not_found_error")
        return err(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return err(400, f"invalid request: {exc.errors()[0].get('msg', '')}")

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        log.exception("unhandled error")
        return err(500, f"internal error: {exc.__class__.__name__}", "server_error")

    async def body_of(request: Request):
        return await read_json(request, opts.max_body_bytes)

    # ---- info ---------------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not state.engine.alive:
            return err(503, "engine is not running", "server_error")
        # ready as soon as the engine runs: while kernels compile, launches take the torch path
        body = {"status": "ok", "warmup": {k: v for k, v in state.warmup.items() if k != "cost_model"},
                "startup": state.startup.as_dict()}
        if state.tiers.merged is not None:  # which tenants run on merged weights, their bytes and measured costs
            body["merged"] = await run_in_threadpool(lambda: state.tiers.snapshot()["merged"])
        comp = getattr(state.runner.state.kernels, "compiler", None)
        if comp is not None:
            body["kernels"] = comp.status()
        return body

    @app.get("/metrics")
    async def metrics():
        body = await run_in_threadpool(state.metrics.render)
        return Response(body, media_type=CONTENT_TYPE)

    def model_card(name: str, root: str, parent: str | None, created: int) -> dict:
        return {
            "id": name, "object": "model", "created": created, "owned_by": "deltapack", "root": root, "parent": parent,
            "max_model_len": state.runner.max_model_len,
        }

    @app.get("/v1/models")
    async def models():
        data = [model_card(state.base_name, str(state.runner.path), None, state.created)]
        for t in list(state.tiers.tenants.values()):
            data.append(model_card(t.name, str(t.path), state.base_name, t.created))
        return {"object": "list", "data": data}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name == state.base_name:
            return model_card(state.base_name, str(state.runner.path), None, state.created)
        t = resolve_model(state, name).tenant
        return model_card(t.name, str(t.path), state.base_name, t.created)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.api_route("/v1/embeddings", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def embeddings():
        raise APIError(404, "embeddings are not served: deltapack serves text generation (/v1/completions, "
                            "/v1/chat/completions) of a base model and its deltas", "not_found_error", None,
                       "unsupported_endpoint")

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req: TokenizeRequest = validate(TokenizeRequest, await body_of(request))
        target = resolve_model(state, req.model)
        tok = target.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer (it serves token ids)", param="model")
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")

        def run():
            if req.prompt is not None:
                return _encode(tok, req.prompt, req.add_special_tokens is not False)
            if not getattr(tok, "chat_template", None):
                raise APIError(400, "this model's tokenizer has no chat template", param="messages")
            return _encode(tok, render_chat(req, tok), bool(req.add_special_tokens))

        ids = await run_in_threadpool(run)
        out = {"count": len(ids), "max_model_len": state.runner.max_model_len, "tokens": ids, "token_strs": None}
        if req.return_token_strs:
            out["token_strs"] = tok.convert_ids_to_tokens(ids)
        return out

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req: DetokenizeRequest = validate(DetokenizeRequest, await body_of(request))
        target = resolve_model(state, req.model)
        if target.tokenizer is None:
            raise APIError(400, "this model has no tokenizer (it serves token ids)", param="model")
        _check_token_list(req.tokens, target.vocab, "tokens")
        return {"prompt": await run_in_threadpool(target.tokenizer.decode, req.tokens)}

    # ---- runtime delta management -------------------------------------------------------------------------------------
    def inside_root(path: str) -> Path:
        root = state.delta_root
        if root is None:
            raise APIError(403, "runtime delta loading is disabled: start the server with --delta-root", "permission_error", "path")
        p = Path(path).expanduser()
        if not p.is_absolute():
            p = root / p
        rp = p.resolve()
        if not rp.is_relative_to(root):
            raise APIError(403, f"path {path!r} is outside the delta root", "permission_error", "path")
        return rp

    async def load_delta(name: str, path: str):
        p = inside_root(path)
        try:
            t = await run_in_threadpool(state.tiers.register, name, p, verify_base=state.verify_base)
        except ConflictError as e:
            raise APIError(409, str(e), param="name", code="conflict") from None
        except TooLargeError as e:
            raise APIError(400, str(e), param="path") from None
        except DeltapackError as e:
            raise APIError(400, str(e), param="path") from None
        return {"object": "delta", "id": t.name, "parent": state.base_name, "path": str(t.path), "packed_bytes": t.nbytes, "tier": t.tier}

    def unload_delta(name: str):
        try:
            state.tiers.remove(name)
        except KeyError:
            raise APIError(404, f"The model `{name}` does not exist.", "not_found_error", "name", "model_not_found") from None
        return {"object": "delta", "id": name, "deleted": True}

    @app.post("/v1/deltas")
    async def post_delta(request: Request):
        req = validate(DeltaLoadRequest, await body_of(request))
        return await load_delta(req.name, req.path)

    @app.get("/v1/deltas")
    async def list_deltas():
        snap = await run_in_threadpool(state.tiers.snapshot)
        return {"object": "list", "data": [{"id": n, **v} for n, v in snap["tenants"].items()], "tiers": {k: snap[k] for k in ("resident", "bytes", "budget", "loads", "hits", "evictions")}}

    @app.delete("/v1/deltas/{name:path}")
    async def delete_delta(name: str):
        return await run_in_threadpool(unload_delta, name)

    # vLLM's adapter endpoints, for clients written against them: lora_path is a peft adapter or a delta directory
    @app.post("/v1/load_lora_adapter")
    async def load_lora(request: Request):
        body = await body_of(request)
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        req = validate(DeltaLoadRequest, {"name": body.get("lora_name"), "path": body.get("lora_path")})
        return await load_delta(req.name, req.path)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(request: Request):
        body = await body_of(request)
        name = body.get("lora_name") if isinstance(body, dict) else None
        if not isinstance(name, str):
            raise APIError(400, "lora_name must be a string", param="lora_name")
        return await run_in_threadpool(unload_delta, name)

    # ---- completions ----------------------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = validate(CompletionRequest, await body_of(request), COMPLETION_REJECTED)
        target = resolve_model(state, req.model)
        tok = target.tokenizer
        p = req.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(x, int) for x in p)):
            p = [p]
        if not p:
            raise APIError(400, "the prompt is empty", param="prompt")
        n = req.n or 1
        if len(p) * n > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts x n per request", param="prompt")
        if tok is None and any(isinstance(x, str) for x in p):
            raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")

        def tokenize():
            out = []
            for x in p:
                ids = _encode(tok, x, req.add_special_tokens is not False) if isinstance(x, str) else list(x)
                if req.truncate_prompt_tokens is not None:
                    ids = ids[-req.truncate_prompt_tokens :]
                _check_ids(ids, target.vocab, "prompt")
                out.append(ids)
            return out

        prompts = await run_in_threadpool(tokenize)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        for ids in prompts:
            _check_context(state, len(ids), max_tokens)
        grammar = await _compile(grammar_spec(req), target)
        params = _sampling(req, target, max_tokens, req.logprobs, req.logprobs if req.echo and req.logprobs is not None else None, grammar)
        texts = [x if isinstance(x, str) else (tok.decode(x) if tok is not None else "") for x in p]
        # choice i*n + j is prompt i's j-th sample (OpenAI's order)
        runs = [ids for ids in prompts for _ in range(n)]
        run_texts = [t for t in texts for _ in range(n)]
        cid = req.request_id or f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        with_ids = req.return_token_ids or tok is None
        sub = Submission(state, target, runs, _choice_params(params, n) * len(prompts), "cmpl")
        prompt_tokens = sum(len(ids) for ids in prompts)
        as_ids = bool(req.return_tokens_as_token_ids)
        if req.stream:
            return StreamingResponse(
                _stream_completion(request, sub, req, target, runs, run_texts, cid, created, with_ids, prompt_tokens, as_ids),
                media_type="text/event-stream",
            )
        k = len(runs)
        pieces = [[] for _ in range(k)]
        out_ids = [[] for _ in range(k)]
        accs = [_LogprobAcc(tok, as_ids=as_ids) for _ in range(k)]
        finish = [None] * k
        completion = [0] * k
        if req.echo:
            for i in range(k):
                pieces[i].append(run_texts[i])
        try:
            async with aclosing(sub.events(request)) as events:
                async for i, ev in events:
                    if isinstance(ev, PromptEvent):
                        for tid, lp, top in zip(runs[i], ev.token_logprobs, ev.top_logprobs):
                            accs[i].add(tid, lp, top)
                    elif isinstance(ev, TokenEvent):
                        pieces[i].append(ev.text)
                        out_ids[i].append(ev.token_id)
                        if req.logprobs is not None:
                            accs[i].add(ev.token_id, ev.logprob, ev.top_logprobs)
                    elif isinstance(ev, FinishEvent):
                        finish[i] = ev.reason
                        completion[i] = ev.completion_tokens
        except ClientGone:
            return Response(status_code=499)
        choices = []
        for i in range(k):
            c = {"index": i, "text": "".join(pieces[i]), "logprobs": accs[i].body() if req.logprobs is not None else None, "finish_reason": finish[i]}
            if with_ids:
                c["token_ids"] = out_ids[i]
                c["prompt_token_ids"] = runs[i]
            choices.append(c)
        return {
            "id": cid, "object": "text_completion", "created": created, "model": req.model, "choices": choices,
            "usage": _usage(prompt_tokens, sum(completion)),
        }

    async def _stream_completion(request, sub: Submission, req, target, prompts, texts, cid, created, with_ids, prompt_tokens, as_ids):
        tok = target.tokenizer
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.continuous_usage_stats)
        completion = [0] * len(prompts)

        def chunk(i, text, finish=None, lp=None, ids=None):
            c = {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}
            if with_ids and ids is not None:
                c["token_ids"] = ids
            body = {"id": cid, "object": "text_completion", "created": created, "model": req.model, "choices": [c]}
            if continuous:
                body["usage"] = _usage(prompt_tokens, sum(completion))
            return _sse(body)

        try:
            if req.echo and req.logprobs is None:
                for i, t in enumerate(texts):
                    yield chunk(i, t, ids=[])
            async with aclosing(sub.events(request)) as events:
                async for i, ev in events:
                    if isinstance(ev, PromptEvent):
                        acc = _LogprobAcc(tok, as_ids=as_ids)
                        for tid, lp, top in zip(prompts[i], ev.token_logprobs, ev.top_logprobs):
                            acc.add(tid, lp, top)
                        yield chunk(i, texts[i], lp=acc.body(), ids=[])
                    elif isinstance(ev, TokenEvent):
                        completion[i] += 1
                        lp = None
                        if req.logprobs is not None:
                            acc = _LogprobAcc(tok, as_ids=as_ids)
                            acc.add(ev.token_id, ev.logprob, ev.top_logprobs)
                            lp = acc.body()
                        if ev.text or lp is not None or with_ids:
                            yield chunk(i, ev.text, lp=lp, ids=[ev.token_id])
                    elif isinstance(ev, FinishEvent):
                        completion[i] = ev.completion_tokens
                        yield chunk(i, "", finish=ev.reason)
            if include_usage:
                yield _sse({"id": cid, "object": "text_completion", "created": created, "model": req.model, "choices": [],
                            "usage": _usage(prompt_tokens, sum(completion))})
            yield "data: [DONE]\n\n"
        except APIError as e:  # the engine failed mid-stream: the status line is sent, so the error goes in the stream
            yield _sse(e.body())
            yield "data: [DONE]\n\n"
        except ClientGone:
            pass

    # ---- chat ---------------------------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req: ChatRequest = validate(ChatRequest, await body_of(request), CHAT_REJECTED)
        target = resolve_model(state, req.model)
        tok = target.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer, so no chat template: use /v1/completions with token ids", param="messages")
        if not getattr(tok, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template", param="messages")
        mode, tool_schema = tool_mode(req)
        spec = grammar_spec(req, tool_schema)

        def render():
            ids = _encode(tok, render_chat(req, tok), add_special_tokens=bool(req.add_special_tokens))
            if req.truncate_prompt_tokens is not None:
                ids = ids[-req.truncate_prompt_tokens :]
            _check_ids(ids, target.vocab, "messages")
            return ids

        ids = await run_in_threadpool(render)
        limit = state.runner.max_model_len
        max_tokens = req.max_completion_tokens or req.max_tokens or max(0, limit - len(ids))
        if max_tokens <= 0:
            _check_context(state, len(ids), 1)
        _check_context(state, len(ids), max_tokens)
        top = req.top_logprobs or 0
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        grammar = await _compile(spec, target)
        params = _sampling(req, target, max_tokens, top if req.logprobs else None, None, grammar)
        n = req.n or 1
        cid = req.request_id or f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        sub = Submission(state, target, [ids] * n, _choice_params(params, n), "chat")
        as_ids = bool(req.return_tokens_as_token_ids)
        if req.stream:
            return StreamingResponse(_stream_chat(request, sub, req, tok, cid, created, mode, len(ids), as_ids), media_type="text/event-stream")
        pieces = [[] for _ in range(n)]
        content_lp = [[] for _ in range(n)]
        out_ids = [[] for _ in range(n)]
        finish = [None] * n
        completion = [0] * n
        try:
            async with aclosing(sub.events(request)) as events:
                async for i, ev in events:
                    if isinstance(ev, TokenEvent):
                        pieces[i].append(ev.text)
                        out_ids[i].append(ev.token_id)
                        if req.logprobs:
                            content_lp[i].append(_chat_lp(tok, ev, as_ids))
                    elif isinstance(ev, FinishEvent):
                        finish[i], completion[i] = ev.reason, ev.completion_tokens
        except ClientGone:
            return Response(status_code=499)
        choices = []
        for i in range(n):
            message, reason = _chat_message(mode, req, "".join(pieces[i]), finish[i])
            choice = {"index": i, "message": message, "logprobs": {"content": content_lp[i]} if req.logprobs else None, "finish_reason": reason}
            if req.return_token_ids:
                choice["token_ids"] = out_ids[i]
                choice["prompt_token_ids"] = ids
            choices.append(choice)
        return {"id": cid, "object": "chat.completion", "created": created, "model": req.model, "choices": choices,
                "usage": _usage(len(ids), sum(completion))}

    async def _stream_chat(request, sub: Submission, req, tok, cid, created, mode, prompt_tokens, as_ids):
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.continuous_usage_stats)
        n = len(sub.reqs)
        completion = [0] * n
        texts = [[] for _ in range(n)]

        def chunk(i, delta, finish=None, lp=None):
            c = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model, "choices": [c]}
            if continuous:
                body["usage"] = _usage(prompt_tokens, sum(completion))
            return _sse(body)

        try:
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": ""})
            async with aclosing(sub.events(request)) as events:
                async for i, ev in events:
                    if isinstance(ev, TokenEvent):
                        completion[i] += 1
                        if mode is not None:  # tool calls are sent whole, once their JSON is complete
                            texts[i].append(ev.text)
                            continue
                        lp = {"content": [_chat_lp(tok, ev, as_ids)]} if req.logprobs else None
                        if ev.text or lp is not None:
                            yield chunk(i, {"content": ev.text}, lp=lp)
                    elif isinstance(ev, FinishEvent):
                        completion[i] = ev.completion_tokens
                        reason = ev.reason
                        if mode is not None:
                            message, reason = _chat_message(mode, req, "".join(texts[i]), ev.reason)
                            if message.get("tool_calls"):
                                calls = [{"index": j, **c} for j, c in enumerate(message["tool_calls"])]
                                yield chunk(i, {"tool_calls": calls})
                            elif message.get("content"):
                                yield chunk(i, {"content": message["content"]})
                        yield chunk(i, {}, finish=reason)
            if include_usage:
                yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model, "choices": [],
                            "usage": _usage(prompt_tokens, sum(completion))})
            yield "data: [DONE]\n\n"
        except APIError as e:  # the engine failed mid-stream: the status line is sent, so the error goes in the stream
            yield _sse(e.body())
            yield "data: [DONE]\n\n"
        except ClientGone:
            pass

    return app


def _chat_message(mode: str | None, req, text: str, finish: str | None) -> tuple[dict, str | None]:
    """The assistant message of one choice and its finish reason: plain content, or the tool calls a constrained
    output encodes (an output cut off before its JSON closed stays content, with finish_reason "length")."""
    if mode is None or finish != "stop":
        return {"role": "assistant", "content": text}, finish
    calls = tool_calls_of(mode, req, text)
    if not calls:
        return {"role": "assistant", "content": text}, finish
    # OpenAI answers a forced (named) function call with finish_reason "stop", a chosen one with "tool_calls"
    return {"role": "assistant", "content": None, "tool_calls": calls}, "stop" if mode == "named" else "tool_calls"


def _chat_lp(tok, ev: TokenEvent, as_ids: bool = False) -> dict:
    s = _token_str(tok, ev.token_id, as_ids)
    tops = [{"token": _token_str(tok, i, as_ids), "logprob": v, "bytes": list(token_text(tok, i).encode())} for i, v in (ev.top_logprobs or [])]
    return {"token": s, "logprob": ev.logprob, "bytes": list(token_text(tok, ev.token_id).encode()), "top_logprobs": tops}


# ---- running ----------------------------------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` in a background thread (tests, benchmarks): `with ServerThread(app) as srv: srv.url`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None):
        import uvicorn

        self.host = host
        self.port = port or free_port(host)
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="deltapack-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError("HTTP server did not start")
            time.sleep(0.02)
        state = getattr(self.server.config.app.state, "deltapack", None)
        if state is not None and state.startup.ready_s is None:
            state.startup.ready()  # listening: the start-up record is complete (/health shows ready_s)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def serve_forever(state: ServerState, host: str, port: int, options: HTTPOptions | None = None, log_level: str = "info") -> None:
    import uvicorn

    opts = options or HTTPOptions()
    opts.bind_host = host
    clock = state.startup
    with clock.phase("http app"):
        app = create_app(state, opts)
        # our Guard writes the access log (uvicorn's would miss the requests it refuses)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                             ws="none"))  # no websocket routes: skip loading a ws library

    def watch() -> None:  # `started` turns true once the socket listens: the moment requests can be served
        while not server.started and not server.should_exit:
            time.sleep(0.005)
        if server.started:
            clock.mark("http listen")
            clock.ready()

    threading.Thread(target=watch, name="deltapack-startup", daemon=True).start()
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled: a clean stop, as uvicorn.run treats it
        pass
    finally:
        state.close()
    if not server.started:
        raise SystemExit(3)  # never listened (port taken, ...): uvicorn.run's start-up failure status
