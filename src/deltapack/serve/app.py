"""The HTTP server: OpenAI-compatible completions / chat, model list, runtime delta loading, health, metrics.

Request bodies are parsed by hand (malformed JSON and wrong types are 400s in OpenAI's error shape, not FastAPI's
422s). Generation runs on the engine thread; each HTTP request waits on an asyncio queue the engine feeds. A client
that goes away (a closed stream, or a dropped connection while waiting) aborts its requests, which frees their slots.

(No `from __future__ import annotations` here: FastAPI reads the handlers' annotations at runtime, and `Request` is
imported inside `create_app` so that importing this module does not need fastapi.)
"""

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from deltapack.errors import DeltapackError
from deltapack.serve.engine import Engine, ErrorEvent, FinishEvent, GenRequest, PromptEvent, TokenEvent
from deltapack.serve.metrics import CONTENT_TYPE, ServeMetrics
from deltapack.serve.protocol import APIError, ChatRequest, CompletionRequest, DeltaLoadRequest, error_body, validate
from deltapack.serve.sampling import SamplingParams
from deltapack.serve.text import token_text
from deltapack.serve.tiers import ConflictError, DeltaTiers, Tenant, TooLargeError

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

    def close(self) -> None:
        self.engine.stop()


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
) -> ServerState:
    """Load the base, register the deltas, start the engine thread."""
    from deltapack.serve.model import ModelRunner

    root = Path(delta_root).resolve() if delta_root else None
    if root is not None and not root.is_dir():
        raise DeltapackError(f"--delta-root {delta_root} is not a directory")
    runner = ModelRunner(base, device=device, dtype=dtype, kernels=kernels, max_model_len=max_model_len)
    name = served_model_name or str(base)
    tiers = DeltaTiers(runner, device_bytes=gpu_delta_bytes, host_bytes=cpu_delta_bytes, base_name=name)
    for dname, dpath in deltas:
        tiers.register(dname, dpath, verify_base=verify_base)
    metrics = ServeMetrics()
    engine = Engine(runner, tiers, max_batch=max_batch, max_prefill_tokens=max_prefill_tokens, metrics=metrics,
                    decode=decode, prefill_delay_s=prefill_delay_s)
    metrics.bind(engine, tiers)
    engine.start()
    return ServerState(runner, tiers, engine, metrics, name, root, verify_base)


def warmup(state: ServerState, *, prompt_tokens: int = 24, max_tokens: int = 3, timeout_s: float = 1800.0) -> dict:
    """Send one short greedy request for the base and for every registered delta at once, and wait for them: the
    kernels the first real requests would need (prefill blocks, mixed-tenant decode steps, every bit width the
    deltas use) are compiled and the deltas loaded before the server answers /health. Triton compiles each kernel
    variant on first use (minutes for a full set, cached on disk afterwards); without this, the first users pay it.
    Returns {model: finish reason or error}. Warm-up requests are counted in /metrics like any other."""

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
    graphs = state.engine.warm_up(slots)
    if graphs:
        log.info("warm-up captured %d decode graphs", graphs)
    return outcome


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


def _unsupported(req) -> None:
    if req.n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    if getattr(req, "best_of", None) not in (None, 1):
        raise APIError(400, "best_of is not supported", param="best_of")
    if req.presence_penalty != 0 or req.frequency_penalty != 0:
        raise APIError(400, "presence/frequency penalties are not supported", param="presence_penalty")
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    if getattr(req, "suffix", None):
        raise APIError(400, "suffix is not supported", param="suffix")


def _sampling(req, max_tokens: int, tok, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if stop and tok is None:
        raise APIError(400, "stop strings need a tokenizer; this model serves token ids only (use stop_token_ids)", param="stop")
    if len(stop) > 16 or any(len(s) > 256 for s in stop):
        raise APIError(400, "at most 16 stop strings of at most 256 characters", param="stop")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k if req.top_k > 0 else 0,
        seed=req.seed,
        stop=stop,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


class Submission:
    """Engine requests of one HTTP request, and the queue their events arrive on."""

    def __init__(self, state: ServerState, target: Target, prompts: list[list[int]], params: SamplingParams, prefix: str):
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        base = uuid.uuid4().hex
        self.request_ids = [f"{prefix}-{base}-{i}" for i in range(len(prompts))]
        self.pending = set(range(len(prompts)))
        self.reqs = []
        for i, ids in enumerate(prompts):
            self.reqs.append(
                GenRequest(
                    self.request_ids[i], target.name, target.tenant, ids, params, partial(self._emit, i),
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


class _LogprobAcc:
    """OpenAI completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, tok, start_offset: int = 0):
        self.tok = tok
        self.offset = start_offset
        self.clear()

    def clear(self):
        self.tokens, self.lps, self.tops, self.offsets = [], [], [], []

    def add(self, token_id: int, lp, top):
        s = token_text(self.tok, token_id)
        self.tokens.append(s)
        self.lps.append(lp)
        self.tops.append(None if top is None else {token_text(self.tok, i): v for i, v in top})
        self.offsets.append(self.offset)
        self.offset += len(s)

    def body(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.lps, "top_logprobs": self.tops, "text_offset": self.offsets}


# ---- app --------------------------------------------------------------------------------------------------------------
def create_app(state: ServerState):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="deltapack serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.deltapack = state

    def err(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None) -> JSONResponse:
        state.metrics.http_errors.labels(str(status)).inc()
        return JSONResponse(error_body(message, type_, param, code), status_code=status)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return err(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return err(exc.status_code, str(exc.detail), type_)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return err(400, f"invalid request: {exc.errors()[0].get('msg', '')}")

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        log.exception("unhandled error")
        return err(500, f"internal error: {exc.__class__.__name__}", "server_error")

    async def body_of(request: Request):
        raw = await request.body()
        if len(raw) > 32 << 20:
            raise APIError(413, "request body too large")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}") from None

    # ---- info ---------------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not state.engine.alive:
            return err(503, "engine is not running", "server_error")
        return {"status": "ok"}

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

    # vLLM's adapter endpoints, for clients written against them
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
        req: CompletionRequest = validate(CompletionRequest, await body_of(request))
        _unsupported(req)
        target = resolve_model(state, req.model)
        tok = target.tokenizer
        p = req.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(x, int) for x in p)):
            p = [p]
        if not p:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(p) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts per request", param="prompt")
        if tok is None and any(isinstance(x, str) for x in p):
            raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")

        def tokenize():
            out = []
            for x in p:
                ids = _encode(tok, x) if isinstance(x, str) else list(x)
                _check_ids(ids, target.vocab, "prompt")
                out.append(ids)
            return out

        prompts = await run_in_threadpool(tokenize)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        for ids in prompts:
            _check_context(state, len(ids), max_tokens)
        params = _sampling(req, max_tokens, tok, req.logprobs, req.logprobs if req.echo and req.logprobs is not None else None)
        texts = [x if isinstance(x, str) else (tok.decode(x) if tok is not None else "") for x in p]
        cid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        with_ids = req.return_token_ids or tok is None
        sub = Submission(state, target, prompts, params, "cmpl")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _stream_completion(request, sub, req, target, prompts, texts, cid, created, include_usage, with_ids),
                media_type="text/event-stream",
            )
        n = len(prompts)
        pieces = [[] for _ in range(n)]
        out_ids = [[] for _ in range(n)]
        accs = [_LogprobAcc(tok) for _ in range(n)]
        finish = [None] * n
        usage = [(len(x), 0) for x in prompts]
        if req.echo:
            for i in range(n):
                pieces[i].append(texts[i])
        try:
            async with aclosing(sub.events(request)) as events:
                async for i, ev in events:
                    if isinstance(ev, PromptEvent):
                        for tid, lp, top in zip(prompts[i], ev.token_logprobs, ev.top_logprobs):
                            accs[i].add(tid, lp, top)
                    elif isinstance(ev, TokenEvent):
                        pieces[i].append(ev.text)
                        out_ids[i].append(ev.token_id)
                        if req.logprobs is not None:
                            accs[i].add(ev.token_id, ev.logprob, ev.top_logprobs)
                    elif isinstance(ev, FinishEvent):
                        finish[i] = ev.reason
                        usage[i] = (ev.prompt_tokens, ev.completion_tokens)
        except ClientGone:
            return Response(status_code=499)
        choices = []
        for i in range(n):
            c = {"index": i, "text": "".join(pieces[i]), "logprobs": accs[i].body() if req.logprobs is not None else None, "finish_reason": finish[i]}
            if with_ids:
                c["token_ids"] = out_ids[i]
                c["prompt_token_ids"] = prompts[i]
            choices.append(c)
        return {
            "id": cid, "object": "text_completion", "created": created, "model": req.model, "choices": choices,
            "usage": _usage(sum(u[0] for u in usage), sum(u[1] for u in usage)),
        }

    async def _stream_completion(request, sub: Submission, req, target, prompts, texts, cid, created, include_usage, with_ids):
        tok = target.tokenizer

        def chunk(i, text, finish=None, lp=None, ids=None):
            c = {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}
            if with_ids and ids is not None:
                c["token_ids"] = ids
            return _sse({"id": cid, "object": "text_completion", "created": created, "model": req.model, "choices": [c]})

        usage = [(len(x), 0) for x in prompts]
        try:
            if req.echo and req.logprobs is None:
                for i, t in enumerate(texts):
                    yield chunk(i, t, ids=[])
            async with aclosing(sub.events(request)) as events:
                async for i, ev in events:
                    if isinstance(ev, PromptEvent):
                        acc = _LogprobAcc(tok)
                        for tid, lp, top in zip(prompts[i], ev.token_logprobs, ev.top_logprobs):
                            acc.add(tid, lp, top)
                        yield chunk(i, texts[i], lp=acc.body(), ids=[])
                    elif isinstance(ev, TokenEvent):
                        lp = None
                        if req.logprobs is not None:
                            acc = _LogprobAcc(tok)
                            acc.add(ev.token_id, ev.logprob, ev.top_logprobs)
                            lp = acc.body()
                        if ev.text or lp is not None or with_ids:
                            yield chunk(i, ev.text, lp=lp, ids=[ev.token_id])
                    elif isinstance(ev, FinishEvent):
                        usage[i] = (ev.prompt_tokens, ev.completion_tokens)
                        yield chunk(i, "", finish=ev.reason)
            if include_usage:
                yield _sse({"id": cid, "object": "text_completion", "created": created, "model": req.model, "choices": [],
                            "usage": _usage(sum(u[0] for u in usage), sum(u[1] for u in usage))})
            yield "data: [DONE]\n\n"
        except APIError as e:  # the engine failed mid-stream: the status line is sent, so the error goes in the stream
            yield _sse(e.body())
            yield "data: [DONE]\n\n"
        except ClientGone:
            pass

    # ---- chat ---------------------------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req: ChatRequest = validate(ChatRequest, await body_of(request))
        _unsupported(req)
        target = resolve_model(state, req.model)
        tok = target.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer, so no chat template: use /v1/completions with token ids", param="messages")
        if not getattr(tok, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template", param="messages")
        messages = []
        for m in req.messages:
            content = m.content if isinstance(m.content, str) or m.content is None else "".join(part.text for part in m.content)
            msg = {"role": m.role, "content": content or ""}
            if m.name:
                msg["name"] = m.name
            messages.append(msg)

        def render():
            try:
                text = tok.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt, tokenize=False)
            except Exception as e:  # template errors (e.g. roles it refuses) are the client's
                raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
            ids = _encode(tok, text, add_special_tokens=False)
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
        params = _sampling(req, max_tokens, tok, top if req.logprobs else None, None)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        sub = Submission(state, target, [ids], params, "chat")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream_chat(request, sub, req, tok, cid, created, include_usage), media_type="text/event-stream")
        pieces, content_lp, out_ids = [], [], []
        finish, usage = None, (len(ids), 0)
        try:
            async with aclosing(sub.events(request)) as events:
                async for _, ev in events:
                    if isinstance(ev, TokenEvent):
                        pieces.append(ev.text)
                        out_ids.append(ev.token_id)
                        if req.logprobs:
                            content_lp.append(_chat_lp(tok, ev))
                    elif isinstance(ev, FinishEvent):
                        finish, usage = ev.reason, (ev.prompt_tokens, ev.completion_tokens)
        except ClientGone:
            return Response(status_code=499)
        choice = {
            "index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
            "logprobs": {"content": content_lp} if req.logprobs else None, "finish_reason": finish,
        }
        if req.return_token_ids:
            choice["token_ids"] = out_ids
            choice["prompt_token_ids"] = ids
        return {"id": cid, "object": "chat.completion", "created": created, "model": req.model, "choices": [choice], "usage": _usage(*usage)}

    async def _stream_chat(request, sub: Submission, req, tok, cid, created, include_usage):
        def chunk(delta, finish=None, lp=None):
            c = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
            return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model, "choices": [c]})

        usage = (len(sub.reqs[0].prompt_ids), 0)
        try:
            yield chunk({"role": "assistant", "content": ""})
            async with aclosing(sub.events(request)) as events:
                async for _, ev in events:
                    if isinstance(ev, TokenEvent):
                        lp = {"content": [_chat_lp(tok, ev)]} if req.logprobs else None
                        if ev.text or lp is not None:
                            yield chunk({"content": ev.text}, lp=lp)
                    elif isinstance(ev, FinishEvent):
                        usage = (ev.prompt_tokens, ev.completion_tokens)
                        yield chunk({}, finish=ev.reason)
            if include_usage:
                yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model, "choices": [], "usage": _usage(*usage)})
            yield "data: [DONE]\n\n"
        except APIError as e:  # the engine failed mid-stream: the status line is sent, so the error goes in the stream
            yield _sse(e.body())
            yield "data: [DONE]\n\n"
        except ClientGone:
            pass

    return app


def _chat_lp(tok, ev: TokenEvent) -> dict:
    s = token_text(tok, ev.token_id)
    tops = [{"token": token_text(tok, i), "logprob": v, "bytes": list(token_text(tok, i).encode())} for i, v in (ev.top_logprobs or [])]
    return {"token": s, "logprob": ev.logprob, "bytes": list(s.encode()), "top_logprobs": tops}


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
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def serve_forever(state: ServerState, host: str, port: int) -> None:
    import uvicorn

    app = create_app(state)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
    finally:
        state.close()
