"""What stands between the network and the handlers: the API key, the Host check of a loopback server (DNS
rebinding), the access log, and the request body read under a size limit while it streams, accepted as JSON only
with `Content-Type: application/json`, at most MAX_JSON_DEPTH deep, with finite numbers and clean strings.

The key, the Host check and the log are one pure ASGI middleware (not Starlette's BaseHTTPMiddleware, which buffers
streamed answers); the body checks are `read_json`, called by each JSON route.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import time
from dataclasses import dataclass, field

from deltapack.serve.protocol import APIError, error_body

access_log = logging.getLogger("deltapack.access")

MAX_BODY_BYTES = 32 << 20
MAX_JSON_DEPTH = 64
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
OPEN_PATHS = ("/health", "/metrics", "/version")  # answered without the API key (no model access, no admin)


@dataclass
class HTTPOptions:
    """Server-wide HTTP settings (`deltapack serve` options)."""

    api_key: str | None = None  # required as `Authorization: Bearer KEY` on every route but OPEN_PATHS
    bind_host: str = "127.0.0.1"  # where the server listens: a loopback bind checks the Host header
    allowed_hosts: list[str] = field(default_factory=list)  # more Host names to accept on a loopback bind
    max_body_bytes: int = MAX_BODY_BYTES
    access_log: bool = True


def is_loopback(host: str) -> bool:
    h = host.strip("[]").lower()
    return h in LOOPBACK_HOSTS or h.startswith("127.")


def host_name(value: str) -> str:
    """The name part of a Host header value (`name`, `name:port`, `[v6]`, `[v6]:port`), lower case."""
    v = value.strip().lower()
    if v.startswith("["):
        end = v.find("]")
        return v[1:end] if end > 0 else v
    return v.rsplit(":", 1)[0] if v.count(":") == 1 else v


class Guard:
    """ASGI middleware: Host check (loopback binds), API key, one access-log line per request."""

    def __init__(self, app, options: HTTPOptions, on_error=None):
        self.app = app
        self.opt = options
        self.on_error = on_error  # called with the status of every error answered here (metrics)
        self.check_host = is_loopback(options.bind_host)
        self.hosts = {h.lower().strip("[]") for h in (*LOOPBACK_HOSTS, *options.allowed_hosts)}
        self.key = options.api_key.encode() if options.api_key else None

    async def _refuse(self, send, status: int, message: str, code: str, extra_headers=()) -> None:
        if self.on_error is not None:
            self.on_error(status)
        body = json.dumps(error_body(message, "invalid_request_error", None, code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra_headers]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        auth = headers.get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [0]
        sent = [0]

        async def send_logged(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            elif msg["type"] == "http.response.body":
                sent[0] += len(msg.get("body", b""))
            await send(msg)

        headers = dict(scope.get("headers") or [])
        path = scope.get("path", "")
        try:
            if self.check_host and host_name(headers.get(b"host", b"").decode("latin-1")) not in self.hosts:
                # a browser page whose name resolves to 127.0.0.1 (DNS rebinding) sends its own name here
                return await self._refuse(send_logged, 400, "invalid Host header: this server answers to localhost only "
                                          "(serve --allowed-host NAME to add a name)", "invalid_host")
            if self.key is not None and path not in OPEN_PATHS and not self._authorized(headers):
                return await self._refuse(send_logged, 401, "Incorrect API key provided: send `Authorization: Bearer KEY` "
                                          "with the key given to `deltapack serve --api-key`", "invalid_api_key",
                                          [(b"www-authenticate", b"Bearer")])
            return await self.app(scope, receive, send_logged)
        finally:
            if self.opt.access_log and access_log.isEnabledFor(logging.INFO):
                client = scope.get("client") or ("-", 0)
                query = scope.get("query_string", b"")
                target = path + ("?" + query.decode("latin-1") if query else "")
                access_log.info('%s:%s "%s %s HTTP/%s" %d %dB %.1fms', client[0], client[1], scope.get("method", "-"),
                                target[:512], scope.get("http_version", "1.1"), status[0] or 499, sent[0],
                                1000 * (time.perf_counter() - t0))


def _reject_constant(name: str):
    raise APIError(400, f"malformed JSON body: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    v = float(text)
    if math.isinf(v):
        raise APIError(400, f"malformed JSON body: the number {text[:40]} is out of range")
    return v


def check_json(obj, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Depth at most max_depth; no NUL character and no lone surrogate (json.loads lets `\\ud800` through, and it
    breaks every later encode) in any string, keys included. Iterative: a deep body cannot exhaust the stack."""
    stack = [(obj, 1)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, str):
            _check_str(x)
            continue
        if not isinstance(x, (dict, list)):
            continue
        if depth > max_depth:
            raise APIError(400, f"the JSON body is nested deeper than {max_depth} levels")
        if isinstance(x, dict):
            for k, v in x.items():
                _check_str(k)
                stack.append((v, depth + 1))
        else:
            stack.extend((v, depth + 1) for v in x)


def _check_str(s: str) -> None:
    if "\x00" in s:
        raise APIError(400, "strings in the request must not contain NUL characters (\\u0000)")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "strings in the request must be valid Unicode (a lone surrogate \\ud800-\\udfff was sent)") from None


async def read_json(request, max_bytes: int = MAX_BODY_BYTES):
    """The request's JSON body: 415 without `Content-Type: application/json`, 413 as soon as more than max_bytes
    have arrived (the body is never buffered past the limit), 400 for anything but clean JSON."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";", 1)[0].strip().lower() != "application/json":
        raise APIError(415, f"Content-Type must be application/json (got {ctype[:100]!r})", param="content-type",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > max_bytes:
                raise APIError(413, f"request body too large: {declared} bytes, the limit is {max_bytes}")
        except ValueError:
            raise APIError(400, "malformed Content-Length header") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"request body too large: more than {max_bytes} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, UnicodeDecodeError) as e:  # ValueError: also an integer of more digits than Python converts
        raise APIError(400, f"malformed JSON body: {e}") from None
    except RecursionError:
        raise APIError(400, f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    check_json(body)
    return body
