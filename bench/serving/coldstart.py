"""Cold start of `deltapack serve` (issue 26): time to /health and to the first token of every tenant, with the
compiled-kernel cache emptied first (cold) or kept from the previous start (warm).

The real CLI runs as a subprocess: `python -m deltapack serve BASE --delta NAME=PATH ...` with four deltas of four
codecs (lowrank -> factors 16-bit, delta-come -> mixed-precision factors, dare -> sparse, deltadq -> sparse row
blocks), default options otherwise (on a GPU: Triton kernels, background warm-up, graph decode). Its kernel cache is
the default one (deltapack.kernels.compile.setup_cache_dir: $XDG_CACHE_HOME/deltapack/triton/<GPU>-<versions>), with
XDG_CACHE_HOME pointed at a directory of this benchmark, so "cold" empties only that, never the user's cache.
After /health answers, one request per tenant (max_tokens 1, token-id prompt, all four at once) is timed from the
process start: first_token_s. The run then waits for the background warm-up to end (warmup_s: every kernel variant
compiled, graphs captured) and stops the server.

The base is a random-weight checkpoint of SmolLM2-135M's shape (`--shape smollm`: 30 layers, 576 hidden, vocabulary
49152) or a pico Llama (`--shape pico`); fine-tunes are random perturbations; all made in --work (kept between runs).
Kernel variants depend on shapes and codecs, not on weight values, so random weights time the compile work
faithfully, and no network or model download is needed.

CPU smoke (no GPU: reference kernels, what the script and the server's background warm-up do end to end):

    PYTHONPATH=src python bench/serving/coldstart.py --smoke
        -> bench/results/serving_coldstart_cpu_smoke.json

GPU (the figures of issue 26; no network needed; beyond the device's own python, the wheels of ../shared/GPU.md's
`serve` list and the pydantic set -- fastapi, starlette, annotated-doc, opentelemetry-api, uvicorn, pydantic,
pydantic-core, annotated-types, typing-inspection, typing-extensions -- plus click and h11 where absent):

    PYTHONPATH=src python bench/serving/coldstart.py --shape smollm --runs cold,warm --max-batch 64
        -> `coldstart` records in bench/results/serving.json (its other keys are kept)

Each record: {cache: cold|warm, tenants, codecs, ready_s, first_token_s: {tenant: s}, warmup_s, kernels: the
server's compile status, startup_phases: the server's own start-up record from /health (ready_s from the process
start, and seconds per phase: imports, base load, deltas, engine, http app, http listen, other; notes.deltas: verify,
fingerprint wait and pack seconds summed over the deltas' threads), command, device, date}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = ROOT / "bench" / "results"

# name: (method, params) at 16x; data-free settings (random models have no tokenizer to calibrate on)
TENANTS = {
    "lowrank": ("lowrank", {}),
    "delta-come": ("delta-come", {"quantizer": "rtn"}),
    "dare": ("dare", {}),
    "deltadq": ("deltadq", {"calibrate": False}),
}
SHAPES = {
    "smollm": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                   num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True),
    "pico": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False),
}


def make_models(work: Path, shape: str, ratio: float, device: str) -> tuple[Path, dict[str, Path], dict[str, str]]:
    """Base, fine-tunes and their deltas in `work` (reused when a previous run made them). Returns (base, {tenant:
    delta dir}, {tenant: codec of its largest tensors})."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltapack import api

    base = work / f"base_{shape}"
    if not (base / "config.json").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SHAPES[shape])).to(torch.bfloat16).save_pretrained(base)
    deltas, codecs = {}, {}
    for i, (name, (method, params)) in enumerate(TENANTS.items()):
        ft, out = work / f"ft_{shape}_{name}", work / f"delta_{shape}_{name}"
        if not (out / "delta_config.json").is_file():
            ft.mkdir(parents=True, exist_ok=True)
            sd = load_file(str(base / "model.safetensors"))
            g = torch.Generator().manual_seed(100 + i)
            for k, v in sd.items():  # a full-rank perturbation of every tensor
                sd[k] = (v.float() + 0.02 * v.float().std() * torch.randn(v.shape, generator=g)).to(v.dtype)
            save_file(sd, str(ft / "model.safetensors"), metadata={"format": "pt"})
            shutil.copy(base / "config.json", ft / "config.json")
            api.compress(base, ft, out, method=method, ratio=ratio, params=params, progress=False, device=device)
            shutil.rmtree(ft)
        deltas[name] = out
        codecs[name] = method
    return base, deltas, codecs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0):
    import httpx

    try:
        return httpx.get(url, timeout=timeout)
    except httpx.HTTPError:
        return None


def one_start(args, cache: str, base: Path, deltas: dict[str, Path], work: Path) -> dict:
    """Start the server once, time /health and every tenant's first token, wait for the warm-up, stop it."""
    import httpx

    from deltapack.serve.testing import stop_process

    xdg = work / "xdg_cache"
    if cache == "cold":
        shutil.rmtree(xdg, ignore_errors=True)
    xdg.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.pop("TRITON_CACHE_DIR", None)  # the default cache path is what is measured
    env["XDG_CACHE_HOME"] = str(xdg)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("HF_HUB_OFFLINE", "1")
    port = free_port()
    cmd = [sys.executable, "-m", "deltapack", "serve", str(base), "--port", str(port), "--max-batch",
           str(args.max_batch), "--served-model-name", "base"]
    for name, path in deltas.items():
        cmd += ["--delta", f"{name}={path}"]
    cmd += args.serve_args
    log_path = work / f"serve_{cache}.log"
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=str(ROOT))
        try:
            ready = None
            while time.monotonic() - t0 < args.timeout:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
                r = _get(f"{url}/health")
                if r is not None and r.status_code == 200:
                    ready = time.monotonic() - t0
                    break
                time.sleep(0.05)
            if ready is None:
                raise RuntimeError(f"no /health after {args.timeout} s")
            first: dict[str, float] = {}
            errors: dict[str, str] = {}

            def ask(name: str) -> None:
                try:
                    r = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": [5, 17, 9, 33], "max_tokens": 1,
                                                                  "temperature": 0, "ignore_eos": True}, timeout=args.timeout)
                    if r.status_code == 200:
                        first[name] = round(time.monotonic() - t0, 3)
                    else:
                        errors[name] = f"{r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as e:
                    errors[name] = str(e)

            threads = [threading.Thread(target=ask, args=(n,)) for n in deltas]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            health = {}
            warm = None
            while time.monotonic() - t0 < args.timeout:
                r = _get(f"{url}/health")
                health = r.json() if r is not None and r.status_code == 200 else health
                if health.get("warmup", {}).get("state") in ("done", "failed", "idle"):
                    warm = round(time.monotonic() - t0, 3)
                    break
                time.sleep(0.2)
        finally:
            stop_process(proc)
    lines = [ln for ln in log_path.read_text().splitlines() if "kernels:" in ln or "ready in" in ln or "warm" in ln]
    return {
        "cache": cache, "tenants": len(deltas), "codecs": sorted({c for c in args.codecs.values()}),
        "ready_s": round(ready, 3), "first_token_s": first, "errors": errors, "warmup_s": warm,
        "warmup": health.get("warmup", {}).get("state"), "kernels": health.get("kernels"),
        "startup_phases": health.get("startup"),
        "cache_files": sum(1 for p in xdg.rglob("*") if p.is_file()), "log": lines[-6:],
    }


def device_name(serve_args: list[str]) -> str:
    import torch

    if torch.cuda.is_available() and "cpu" not in serve_args:
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def save(out: Path, records: list[dict], meta: dict, *, smoke: bool) -> None:
    if smoke:
        write_json(out, {"coldstart": records, **meta})
    else:
        doc = json.loads(out.read_text()) if out.is_file() else {}
        doc["coldstart"] = records  # the file's other parts stay as they are
        write_json(out, doc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU smoke: pico shape, --device cpu, background warm-up, "
                    "results to bench/results/serving_coldstart_cpu_smoke.json")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm")
    ap.add_argument("--runs", default="cold,warm", help="cache states in order (cold empties the kernel cache)")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--ratio", type=float, default=16.0)
    ap.add_argument("--work", type=Path, default=None, help="models and kernel cache [default: /tmp/deltapack_coldstart]")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--serve-arg", dest="serve_args", action="append", default=[], help="extra `serve` argument")
    args = ap.parse_args(argv)
    if args.smoke:
        args.shape = "pico"
        args.max_batch = min(args.max_batch, 8)
        args.ratio = min(args.ratio, 4.0)  # pico tensors are too small for 16x
        args.serve_args = ["--device", "cpu", "--warmup", "background"] + args.serve_args
    runs = [c.strip() for c in args.runs.split(",") if c.strip()]
    for cache in runs:
        if cache not in ("cold", "warm"):
            ap.error(f"--runs: {cache!r} is neither cold nor warm")
    work = args.work or Path("/tmp/deltapack_coldstart")
    work.mkdir(parents=True, exist_ok=True)
    import torch

    build_dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    t = time.perf_counter()
    base, deltas, codecs = make_models(work, args.shape, args.ratio, build_dev)
    print(f"models ready in {time.perf_counter() - t:.1f} s ({work})", file=sys.stderr)
    args.codecs = codecs
    command = "PYTHONPATH=src python bench/serving/coldstart.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(), "device": device_name(args.serve_args),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "shape": args.shape,
            "max_batch": args.max_batch, "ratio": args.ratio}
    if args.smoke:
        out = args.out or RESULTS / "serving_coldstart_cpu_smoke.json"
    else:
        out = args.out or RESULTS / "serving.json"
    records = []
    for cache in runs:
        rec = {**one_start(args, cache, base, deltas, work), **meta}
        print(json.dumps({k: rec[k] for k in ("cache", "ready_s", "first_token_s", "warmup_s", "kernels", "startup_phases")}),
              file=sys.stderr)
        records.append(rec)
        save(out, records, meta, smoke=args.smoke)  # after every start: a command killed during the next keeps this one
    print(f"wrote {out}", file=sys.stderr)
    return 0 if all(not r["errors"] and len(r["first_token_s"]) == r["tenants"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
