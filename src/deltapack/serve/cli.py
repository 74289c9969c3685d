"""`deltapack serve` command (registered on the main CLI group by `register`)."""

from __future__ import annotations

import logging

import click

from deltapack.errors import DeltapackError

log = logging.getLogger("deltapack.serve")


def configure_logging(level: str) -> None:
    """deltapack's loggers (the access log included) to stderr at `level`; uvicorn's follow its own log_level."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("deltapack")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def _delta_pairs(items: tuple[str, ...]) -> list[tuple[str, str]]:
    out = []
    for it in items:
        name, sep, path = it.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise DeltapackError(f"--delta {it!r} is not NAME=PATH")
        out.append((name.strip(), path.strip()))
    return out


def register(main: click.Group) -> None:
    @main.command("serve")
    @click.argument("base")
    @click.option("--delta", "deltas", multiple=True, metavar="NAME=PATH", help="a delta directory, or a peft LoRA adapter directory, to serve as model NAME (repeatable)")
    @click.option("--delta-root", type=click.Path(file_okay=False), default=None, help="directory runtime loads (POST /v1/deltas) must stay inside; without it runtime loading is off")
    @click.option("--host", default="127.0.0.1", show_default=True)
    @click.option("--port", default=8000, show_default=True, type=int)
    @click.option("--max-batch", default=16, show_default=True, type=int, help="sequences decoded together")
    @click.option("--gpu-delta-bytes", default="2GB", show_default=True, help="device tier budget for packed deltas (the CPU on CPU-only runs)")
    @click.option("--cpu-delta-bytes", default="8GB", show_default=True, help="host tier budget (LRU cache of packed deltas)")
    @click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N]")
    @click.option("--dtype", default="auto", show_default=True, help="auto (fp32 on CPU, checkpoint dtype on GPU) | float32 | bfloat16 | float16")
    @click.option("--kernels", default="auto", show_default=True, help="delta kernel backend: auto | reference | triton")
    @click.option("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    @click.option("--max-prefill-tokens", default=4096, show_default=True, type=int, help="padded tokens per prefill forward")
    @click.option("--served-model-name", default=None, help="name of the base model in the API (default: BASE as given)")
    @click.option("--no-verify-base", is_flag=True, help="skip the full-content check that deltas were made against this base")
    @click.option("--warmup", type=click.Choice(["auto", "background", "on", "off"]), default="auto", show_default=True,
                  help="one short request per model, stand-in prefills and the decode graphs, so that kernels compile "
                       "and deltas load: background (listen at once; launches whose Triton kernel is still compiling "
                       "run on the pure-torch path, each switching when its kernel is ready), on (the same, finished "
                       "before listening), off; auto: background with the Triton kernels on a GPU, else off")
    @click.option("--compile-workers", type=int, default=None,
                  help="Triton kernel variants compiled at once [default: min(8, CPU cores)]")
    @click.option("--dense-path", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                  help="after warm-up, time the delta kernels against dequantize-once + dense GEMM per layout and "
                       "shape, and give a tenant with many tokens in a forward (prefill, eager steps) the faster "
                       "(auto: on a GPU)")
    @click.option("--merged-bytes", default="0", show_default=True,
                  help="device memory for merged copies (base + delta) of the hottest tenants' linear weights: a "
                       "forward whose rows are all one tenant's (k = 1 decode, its prefills) then reads no delta; "
                       "chosen per forward from measured costs. auto: on a GPU what free memory allows beyond the "
                       "device tier's budget, the KV cache and 1 GiB (off on a CPU); 0: off (the default until the "
                       "live engine has served with it on a GPU: bench/serving/live.py --modes graph+merged)")
    @click.option("--pack-device", type=click.Choice(["host", "auto"]), default="host", show_default=True,
                  help="where deltas are packed for the kernels at load: host (the CPU; a 7B sparse delta's "
                       "seeded masks took 70-140 s there on two cores) or auto (the serving GPU; the host still on a "
                       "CPU, for lossless tensors and when the GPU is out of memory). host is the default until a "
                       "GPU start has been measured with auto")
    @click.option("--decode", "decode", type=click.Choice(["auto", "graph", "static", "dynamic"]), default="auto",
                  show_default=True,
                  help="decode steps: graph (rows in a static KV cache, each step a CUDA-graph replay), static (the "
                       "same without graphs), dynamic (eager, the cache rebuilt each step); auto: graph on a GPU with "
                       "the Triton kernels when the static cache (max-batch x max-model-len) fits in half the free "
                       "memory, else dynamic")
    @click.option("--prefill-delay-ms", type=float, default=None,
                  help="while rows decode, new requests wait up to this long (or until 8 can join) to share one prefill "
                       "[default: 250 with --decode graph, else 0]")
    @click.option("--api-key", envvar="DELTAPACK_API_KEY", default=None, show_envvar=True,
                  help="require `Authorization: Bearer KEY` on every route but /health, /metrics and /version")
    @click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
                  help="on a loopback bind, accept this Host header name besides localhost / 127.0.0.1 / [::1] "
                       "(e.g. behind a local reverse proxy; repeatable)")
    @click.option("--max-body-bytes", default="32MiB", show_default=True, help="largest request body accepted (413 past it)")
    @click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True,
                  help="server log level (info: one access-log line per request)")
    @click.option("--quiet", is_flag=True, help="log warnings and errors only (no access log); same as --log-level warning")
    def serve(base, deltas, delta_root, host, port, max_batch, gpu_delta_bytes, cpu_delta_bytes, device, dtype, kernels, max_model_len, max_prefill_tokens, served_model_name, no_verify_base, warmup, compile_workers, dense_path, merged_bytes, pack_device, decode, prefill_delay_ms, api_key, allowed_hosts, max_body_bytes, log_level, quiet):
        """Serve BASE and compressed fine-tunes of it over an OpenAI-compatible HTTP API.

        Every request names a model: the base (BASE, or --served-model-name) or a delta NAME. Requests for different
        deltas share one batch; each delta is applied from its compressed form, never merged. A peft LoRA adapter
        directory is served as a delta too (stored exactly: its factors and scaling), in the same batches.
        """
        import os
        import time

        from deltapack.serve.startup import StartupClock

        clock = StartupClock()  # first: "imports" counts from the process start
        level = "warning" if quiet else log_level
        configure_logging(level)

        from deltapack.cli import _size
        from deltapack.kernels.compile import KernelCompiler
        from deltapack.serve.app import build_server, serve_forever, start_warmup
        from deltapack.serve.app import warmup as run_warmup
        from deltapack.serve.guard import HTTPOptions, is_loopback

        if api_key is not None and not api_key.strip():
            raise DeltapackError("--api-key (or DELTAPACK_API_KEY) is empty")
        if not is_loopback(host) and api_key is None:
            log.warning("serving on %s without --api-key: anyone who can reach it can load and unload deltas", host)
        options = HTTPOptions(api_key=api_key, bind_host=host, allowed_hosts=list(allowed_hosts),
                              max_body_bytes=_size(max_body_bytes))

        state = build_server(
            base,
            _delta_pairs(deltas),
            delta_root=delta_root,
            device=device,
            dtype=dtype,
            kernels=kernels,
            max_batch=max_batch,
            gpu_delta_bytes=_size(gpu_delta_bytes),
            cpu_delta_bytes=_size(cpu_delta_bytes),
            max_model_len=max_model_len,
            max_prefill_tokens=max_prefill_tokens,
            served_model_name=served_model_name,
            verify_base=not no_verify_base,
            decode=decode,
            prefill_delay_s=None if prefill_delay_ms is None else prefill_delay_ms / 1000,
            compiler=None if warmup == "off" else KernelCompiler(
                compile_workers or min(8, os.cpu_count() or 1), progress=lambda m: click.echo(m, err=True)),
            clock=clock,
            merged_bytes="auto" if merged_bytes == "auto" else _size(merged_bytes),
            pack_device=pack_device,
        )
        runner = state.runner
        triton_gpu = runner.state.kernels.name == "triton" and runner.device.type == "cuda"
        comp = getattr(runner.state.kernels, "compiler", None)
        if comp is not None:
            comp.start_reporter()
        if warmup == "auto":
            warmup = "background" if triton_gpu else "off"
        calibrate = dense_path == "on" or (dense_path == "auto" and runner.device.type == "cuda")
        n_models = 1 + len(state.tiers.tenants)
        if warmup == "on":
            t0 = time.perf_counter()
            how = f"kernel compilation in {comp.workers} threads, " if comp is not None else ""
            click.echo(f"warming up {n_models} models ({how}delta loads)...", err=True)
            with clock.phase("warm-up"):  # --warmup on: readiness waits for it, by request
                run_warmup(state, calibrate=calibrate)
            click.echo(f"warm-up done in {time.perf_counter() - t0:.1f} s", err=True)
        elif warmup == "background":
            how = f"kernels compile in {comp.workers} threads; " if comp is not None else ""
            click.echo(f"warming up {n_models} models in the background ({how}requests are served meanwhile)", err=True)
            start_warmup(state, calibrate=calibrate)
        elif calibrate:
            start_warmup(state, calibrate=True, max_tokens=1)
        click.echo(
            f"serving {state.base_name} + {len(state.tiers.tenants)} deltas on http://{host}:{port} "
            f"({state.runner.device}, {str(state.runner.dtype).replace('torch.', '')}, kernels={state.runner.state.kernels.name}, "
            f"decode={state.engine.decode_mode})",
            err=True,
        )
        # the "ready in X s: imports a, base load b, ..." line is logged once the socket listens
        serve_forever(state, host, port, options, level)
