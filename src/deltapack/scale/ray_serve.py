"""`deltapack serve` behind Ray Serve: replicas of the server, requests routed by the OpenAI `model` field.

    from deltapack.scale.ray_serve import build_app
    from ray import serve
    serve.run(build_app("base/", {"alpha": "deltas/alpha", "beta": "deltas/beta"}, num_replicas=4))

Two deployments:
  - `DeltapackGateway` (HTTP ingress): reads the JSON body's `model`, answers /v1/models from the catalog, and sends
    the request to a backend replica through a handle with `multiplexed_model_id=model`. Ray Serve's router sends a
    model id to the replicas that already hold it (best effort), so each delta lives on few replicas and requests for
    it batch together there.
  - `DeltapackBackend` (N replicas): each runs one `python -m deltapack serve BASE --delta-root ROOT` process on a
    local port and proxies HTTP to it. `get_model` (a `serve.multiplexed` loader) registers a delta with that process
    through its runtime API (POST /v1/deltas); when Ray Serve evicts it (more than `max_deltas_per_replica` on the
    replica), DELETE /v1/deltas/NAME frees it. Requests for the base model go to any replica.

Only the CLI contract `deltapack serve BASE --delta-root DIR --served-model-name NAME --host --port` and the server's
HTTP API are used, so the server's engine runs unchanged (its own batching, tiers and /metrics per replica).
Ray and Ray Serve are imported when `build_app` is called, not when this module is.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-deltapack-replica"  # which backend replica answered (for tests and debugging)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class ServerProcess:
    """A `deltapack serve` child process on a free local port. `start()` waits until /health answers."""

    def __init__(self, base: str, *, delta_root: str | None, served_model_name: str, args: tuple[str, ...] = (),
                 startup_timeout: float = 600.0):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "deltapack", "serve", str(base), "--host", "127.0.0.1", "--port", str(self.port),
               "--served-model-name", served_model_name, *args]
        if delta_root:
            cmd += ["--delta-root", str(delta_root)]
        self.cmd = cmd
        self.timeout = startup_timeout
        self.log_path = Path(tempfile.mkstemp(prefix="deltapack-serve-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        import httpx

        logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=logf, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"deltapack serve exited with code {self.proc.returncode}:\n{tail}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"deltapack serve did not answer /health within {self.timeout:.0f} s (log: {self.log_path})")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


def _error(status: int, message: str, code: str | None = None) -> tuple[int, str, bytes]:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": "model", "code": code}}
    return status, "application/json", json.dumps(body).encode()


_DEPLOYMENTS: dict[int, tuple] = {}


def _deployments(max_deltas_per_replica: int):
    """Define the deployment classes on first use (Ray is optional for the rest of deltapack)."""
    if max_deltas_per_replica in _DEPLOYMENTS:
        return _DEPLOYMENTS[max_deltas_per_replica]
    import httpx
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse

    class _Loaded:
        """A delta registered with this replica's server; Ray Serve calls __del__ when it evicts it."""

        def __init__(self, url: str, name: str):
            self.url, self.name = url, name

        def __del__(self):
            try:
                httpx.delete(f"{self.url}/v1/deltas/{self.name}", timeout=30.0)
            except Exception:  # the server may be gone already (shutdown)
                pass

    class DeltapackBackend:
        def __init__(self, base: str, catalog: dict[str, str], base_name: str, serve_args: tuple[str, ...],
                     startup_timeout: float):
            self.catalog = {k: str(Path(v).resolve()) for k, v in catalog.items()}
            root = os.path.commonpath(list(self.catalog.values())) if self.catalog else None
            if root and Path(root).is_file():
                root = str(Path(root).parent)
            self.server = ServerProcess(base, delta_root=root, served_model_name=base_name, args=tuple(serve_args),
                                        startup_timeout=startup_timeout).start()
            self.client = httpx.AsyncClient(base_url=self.server.url, timeout=None)
            try:
                self.replica = serve.get_replica_context().replica_tag
            except Exception:
                self.replica = str(os.getpid())

        @serve.multiplexed(max_num_models_per_replica=max_deltas_per_replica)
        async def get_model(self, model_id: str):
            r = await self.client.post("/v1/deltas", json={"name": model_id, "path": self.catalog[model_id]})
            if r.status_code not in (200, 409):  # 409: registered already (a reload after a failed eviction)
                raise RuntimeError(f"loading {model_id} failed: {r.status_code} {r.text[:300]}")
            return _Loaded(self.server.url, model_id)

        async def _prepare(self) -> None:
            model_id = serve.get_multiplexed_model_id()
            if model_id:
                await self.get_model(model_id)

        async def handle(self, method: str, path: str, ctype: str | None, body: bytes) -> tuple[int, str, bytes, str]:
            await self._prepare()
            r = await self.client.request(method, path, content=body or None, headers={"content-type": ctype} if ctype else None)
            return r.status_code, r.headers.get("content-type", "application/json"), r.content, self.replica

        async def stream(self, method: str, path: str, ctype: str | None, body: bytes):
            """First item: (status, content type, replica); then the raw body chunks (server-sent events)."""
            await self._prepare()
            req = self.client.build_request(method, path, content=body or None, headers={"content-type": ctype} if ctype else None)
            r = await self.client.send(req, stream=True)
            try:
                yield r.status_code, r.headers.get("content-type", "text/event-stream"), self.replica
                async for chunk in r.aiter_raw():
                    yield chunk
            finally:
                await r.aclose()

        def check_health(self) -> None:
            if self.server.proc is None or self.server.proc.poll() is not None:
                raise RuntimeError("the deltapack serve process has exited")

        def __del__(self):
            self.server.stop()

    class DeltapackGateway:
        def __init__(self, backend, base_name: str, catalog: dict[str, str]):
            self.backend = backend
            self.base_name = base_name
            self.catalog = catalog
            self.created = int(time.time())

        async def __call__(self, request: Request):
            body = await request.body()
            path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            ctype = request.headers.get("content-type")
            if request.method == "GET" and request.url.path == "/v1/models":
                cards = [{"id": self.base_name, "object": "model", "created": self.created, "owned_by": "deltapack",
                          "root": self.base_name, "parent": None}]
                cards += [{"id": n, "object": "model", "created": self.created, "owned_by": "deltapack", "root": p,
                           "parent": self.base_name} for n, p in sorted(self.catalog.items())]
                return Response(json.dumps({"object": "list", "data": cards}), media_type="application/json")
            model, stream = None, False
            if request.method == "POST" and body:
                try:
                    payload = json.loads(body)
                    if isinstance(payload, dict):
                        model, stream = payload.get("model"), bool(payload.get("stream"))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    pass  # the server answers malformed bodies itself
            handle = self.backend
            if isinstance(model, str) and model != self.base_name:
                if model not in self.catalog:
                    status, ct, content = _error(404, f"The model `{model}` does not exist.", "model_not_found")
                    return Response(content, status_code=status, media_type=ct)
                handle = handle.options(multiplexed_model_id=model)
            if stream:
                gen = handle.options(stream=True).stream.remote(request.method, path, ctype, body)
                status, ct, replica = await gen.__anext__()

                async def rest():
                    async for chunk in gen:
                        yield chunk

                return StreamingResponse(rest(), status_code=status, media_type=ct, headers={REPLICA_HEADER: replica})
            status, ct, content, replica = await handle.handle.remote(request.method, path, ctype, body)
            return Response(content, status_code=status, media_type=ct, headers={REPLICA_HEADER: replica})

    _DEPLOYMENTS[max_deltas_per_replica] = (serve, DeltapackBackend, DeltapackGateway)
    return _DEPLOYMENTS[max_deltas_per_replica]


def build_app(
    base: str | os.PathLike,
    deltas: dict[str, str | os.PathLike],
    *,
    base_name: str = "base",
    num_replicas: int = 2,
    max_deltas_per_replica: int = 8,
    serve_args: tuple[str, ...] = (),
    replica_resources: dict | None = None,
    startup_timeout: float = 600.0,
):
    """A Ray Serve application: a gateway and `num_replicas` backend replicas, each running `deltapack serve BASE`
    with runtime loading of the `deltas` catalog ({model name: delta directory}). `serve_args`: extra `deltapack
    serve` options (e.g. ("--device", "cuda", "--max-batch", "32")). `replica_resources`: Ray actor options of a
    backend replica (default: {"num_cpus": 1}, plus {"num_gpus": 1} when the cluster has GPUs)."""
    serve, backend_cls, gateway_cls = _deployments(max_deltas_per_replica)
    catalog = {str(k): str(Path(v).resolve()) for k, v in deltas.items()}
    if base_name in catalog:
        raise ValueError(f"a delta is named like the base model ({base_name!r})")
    if replica_resources is None:
        import ray

        gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
        replica_resources = {"num_cpus": 1, **({"num_gpus": 1} if gpus else {})}
    backend = serve.deployment(backend_cls, name="DeltapackBackend", num_replicas=num_replicas,
                               ray_actor_options=replica_resources, health_check_period_s=10)
    gateway = serve.deployment(gateway_cls, name="DeltapackGateway", ray_actor_options={"num_cpus": 0})
    return gateway.bind(backend.bind(str(Path(base).resolve()), catalog, base_name, tuple(serve_args), startup_timeout),
                        base_name, catalog)
