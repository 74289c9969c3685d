"""`deltapack serve`: one base model, many compressed fine-tunes, one OpenAI-compatible server.

    from deltapack.serve import build_server, create_app, ServerThread
    state = build_server("base/", [("math", "deltas/math")], delta_root="deltas/")
    with ServerThread(create_app(state)) as srv:
        ...  # POST {srv.url}/v1/completions {"model": "math", ...}
    state.close()

Layout: model.py (base model with delta-aware layers), tiers.py (registered deltas, device/host/disk tiers),
engine.py (continuous batching, KV cache), sampling.py, text.py (detokenization, stop strings), protocol.py
(request bodies, errors), app.py (HTTP), metrics.py (Prometheus). Kernels: deltapack.kernels.
"""

from __future__ import annotations

__all__ = ["build_server", "create_app", "ServerThread", "ServerState"]


def __getattr__(name):  # lazy: importing deltapack.serve must not pull in fastapi / transformers
    if name in __all__:
        from deltapack.serve import app

        return getattr(app, name)
    raise AttributeError(name)
