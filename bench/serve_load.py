"""Bounded loopback load test of `deltapack serve`: mixed tenants, several minutes, zero errors, flat memory.

Builds a pico Llama base (with a word-level tokenizer and chat template) and four fine-tunes compressed with
different codecs (raw/dense, lowrank/factors, bitdelta/sign, dare/sparse), starts `deltapack serve` as a subprocess
on 127.0.0.1 with a device-tier budget that holds only some of the deltas (so tiers churn under load), and drives
it from client threads with a mix of requests: completions, streamed completions, chat, echo+logprobs, and a
share of malformed bodies (which must be answered 400). A side loop unloads and reloads a delta through the API.
The server's RSS is sampled from /proc during the measured phase (after a warm-up).

Bounded: only 127.0.0.1, at most --max-requests requests and --duration seconds (plus setup).

    python bench/serve_load.py                      # the committed run: bench/results/serve_load.json
    python bench/serve_load.py --smoke              # seconds; same code path, tiny
    python bench/serve_load.py --model smollm       # SmolLM2-135M-Instruct base instead of the pico model

Writes JSON with the command, device, date, config and results (requests, errors, latency percentiles, tokens/s,
server RSS at start/end/max and its slope, tier counters from /metrics). Exit status 1 if any error occurred or
memory grew past the flatness bound.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import httpx  # noqa: E402
import torch  # noqa: E402

WORDS_START = 14  # first "w<i>" id of deltapack.serve.testing.make_word_tokenizer's vocabulary


def log(msg: str) -> None:
    print(f"[serve_load {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- models -----------------------------------------------------------------------------------------------------------
def make_pico(path: Path, hidden: int, layers: int, vocab: int, seed: int = 0) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltapack.serve.testing import make_word_tokenizer

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path, safe_serialization=True)
    make_word_tokenizer(path, vocab)


def make_finetune(base: Path, out: Path, seed: int, scale: float = 0.3) -> None:
    """base + random perturbation (low rank on matrices), saved fp32 with the base's tokenizer files."""
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(seed)
    m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        for _, p in m.named_parameters():
            if p.dim() == 2:
                r = 8
                d = torch.randn(p.shape[0], r, generator=g) @ torch.randn(r, p.shape[1], generator=g) / r**0.5
            else:
                d = torch.randn(p.shape, generator=g)
            p.add_(scale * p.abs().mean() * d)
    m.save_pretrained(out, safe_serialization=True)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copyfile(f, out / f.name)


def build_models(work: Path, model: str, smoke: bool) -> tuple[Path, dict[str, Path], int]:
    from deltapack import api

    if model == "smollm":
        from deltapack.io.embedded import embedded_model_dir

        base = embedded_model_dir()
        vocab = 49152
    else:
        base = work / "base"
        vocab = 256 if smoke else 512
        make_pico(base, hidden=64 if smoke else 256, layers=2 if smoke else 4, vocab=vocab)
    root = work / "deltas"
    root.mkdir()
    plan = [("raw", "raw", None), ("lowrank", "lowrank", 4.0), ("bitdelta", "bitdelta", 4.0), ("dare", "dare", 4.0)]
    deltas = {}
    for i, (name, method, ratio) in enumerate(plan):
        ft = work / f"ft_{name}"
        make_finetune(base, ft, seed=100 + i)
        log(f"compressing {name} ({method})")
        deltas[name] = api.compress(base, ft, root / name, method=method, ratio=ratio, progress=False)
        shutil.rmtree(ft)
    return base, deltas, vocab


# ---- server -------------------------------------------------------------------------------------------------------------
def packed_sizes(base: Path, deltas: dict[str, Path]) -> dict[str, int]:
    """Resident bytes of each delta in the reference kernels' layout (fp32 on CPU), to size the device tier."""
    from deltapack.format.directory import DeltaDir
    from deltapack.kernels import get_kernels

    k = get_kernels("reference")
    out = {}
    for name, p in deltas.items():
        d = DeltaDir.open(p)
        total = 0
        for t, te in d.manifest.tensors.items():
            parts = d.parts(t)
            extra = parts.pop("new_rows", None)
            shape = list(te.shape)
            if te.base_rows is not None:
                shape[0] = te.base_rows
            total += k.pack(te.codec, te.params, parts, tuple(shape), dtype=torch.float32).nbytes()
            total += 0 if extra is None else extra.numel() * 4
        out[name] = total
    return out


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError("server did not become healthy")


# ---- load ---------------------------------------------------------------------------------------------------------------
class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = {}
        self.ttft: list[float] = []
        self.requests = 0
        self.ok = 0
        self.expected_4xx = 0
        self.errors = 0
        self.error_samples: list[str] = []
        self.tokens = 0
        self.by_model: dict[str, int] = {}

    def record(self, kind: str, model: str, seconds: float, ok: bool, tokens: int = 0, expected_4xx: bool = False, err: str | None = None):
        with self.lock:
            self.requests += 1
            self.by_model[model] = self.by_model.get(model, 0) + 1
            if ok:
                self.ok += 1
                self.tokens += tokens
                self.latency.setdefault(kind, []).append(seconds)
            elif expected_4xx:
                self.expected_4xx += 1
            else:
                self.errors += 1
                if len(self.error_samples) < 20:
                    self.error_samples.append(f"{kind} {model}: {err}")


def pct(xs: list[float]) -> dict:
    if not xs:
        return {}
    s = sorted(xs)

    def q(p):
        return round(s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))], 4)

    return {"n": len(s), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": round(s[-1], 4), "mean": round(sum(s) / len(s), 4)}


def one_request(c: httpx.Client, rng: random.Random, models: list[str], vocab: int, max_tokens: int, stats: Stats) -> None:
    model = rng.choice(models)
    words = " ".join(f"w{rng.randrange(vocab - WORDS_START)}" for _ in range(rng.randrange(1, 24)))
    n = rng.randrange(1, max_tokens + 1)
    sampling = {"temperature": 0.0} if rng.random() < 0.5 else {"temperature": 0.8, "top_p": 0.95, "seed": rng.randrange(1 << 30)}
    kind = rng.choices(["completion", "stream", "chat", "echo_logprobs", "malformed"], [45, 20, 20, 10, 5])[0]
    t0 = time.monotonic()
    try:
        if kind == "malformed":
            body = rng.choice([b"{oops", b"[]", json.dumps({"model": model, "prompt": 5}).encode(), json.dumps({"model": model, "prompt": "x", "max_tokens": "9"}).encode()])
            r = c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            ok400 = r.status_code == 400 and "error" in r.json()
            stats.record(kind, model, time.monotonic() - t0, False, expected_4xx=ok400, err=None if ok400 else f"{r.status_code} {r.text[:200]}")
            return
        if kind == "completion":
            r = c.post("/v1/completions", json={"model": model, "prompt": words, "max_tokens": n, **sampling})
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code} {r.text[:200]}")
            u = r.json()["usage"]["completion_tokens"]
            if not 1 <= u <= n:
                raise RuntimeError(f"{u} completion tokens for max_tokens={n}")
            stats.record(kind, model, time.monotonic() - t0, True, u)
        elif kind == "stream":
            first = None
            done = False
            chunks = 0
            usage = None
            with c.stream("POST", "/v1/completions", json={"model": model, "prompt": words, "max_tokens": n, "stream": True, "stream_options": {"include_usage": True}, **sampling}) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"{r.status_code}")
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        continue
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        raise RuntimeError(f"stream error {ev['error']}")
                    if ev.get("usage"):
                        usage = ev["usage"]
                    elif first is None:
                        first = time.monotonic() - t0
                    chunks += 1
            if not done or usage is None:
                raise RuntimeError("stream ended without usage / [DONE]")
            with stats.lock:
                stats.ttft.append(first or 0.0)
            stats.record(kind, model, time.monotonic() - t0, True, usage["completion_tokens"])
        elif kind == "chat":
            r = c.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": words}], "max_tokens": n, **sampling})
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code} {r.text[:200]}")
            stats.record(kind, model, time.monotonic() - t0, True, r.json()["usage"]["completion_tokens"])
        else:
            r = c.post("/v1/completions", json={"model": model, "prompt": words, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0})
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code} {r.text[:200]}")
            lp = r.json()["choices"][0]["logprobs"]
            if lp["token_logprobs"][0] is not None or any(x is None for x in lp["token_logprobs"][1:]):
                raise RuntimeError("bad prompt logprobs")
            stats.record(kind, model, time.monotonic() - t0, True, 0)
    except Exception as e:  # noqa: BLE001 - every failure is a counted error
        stats.record(kind, model, time.monotonic() - t0, False, err=f"{e.__class__.__name__}: {e}")


def reload_loop(url: str, path: Path, stop: threading.Event, stats: Stats, period: float) -> int:
    """Unload and reload a delta named "hot" through the API while the load runs; check it serves after each load."""
    cycles = 0
    with httpx.Client(base_url=url, timeout=120) as c:
        while not stop.wait(period):
            t0 = time.monotonic()
            try:
                r = c.post("/v1/deltas", json={"name": "hot", "path": str(path)})
                if r.status_code != 200:
                    raise RuntimeError(f"load {r.status_code} {r.text[:200]}")
                r = c.post("/v1/completions", json={"model": "hot", "prompt": "w1 w2", "max_tokens": 4, "temperature": 0})
                if r.status_code != 200:
                    raise RuntimeError(f"hot request {r.status_code}")
                r = c.delete("/v1/deltas/hot")
                if r.status_code != 200:
                    raise RuntimeError(f"unload {r.status_code}")
                cycles += 1
                stats.record("reload", "hot", time.monotonic() - t0, True)
            except Exception as e:  # noqa: BLE001
                stats.record("reload", "hot", time.monotonic() - t0, False, err=f"{e.__class__.__name__}: {e}")
    return cycles


def scrape(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name.startswith("deltapack:delta_") or s.name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
                key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
                out[key] = s.value
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["pico", "smollm"], default="pico")
    ap.add_argument("--duration", type=float, default=240.0, help="seconds of measured load")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds of load before memory is first sampled")
    ap.add_argument("--max-requests", type=int, default=20000, help="hard cap on requests")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default bench/results/serve_load.json; smoke: a temp file)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, seconds: checks the code path")
    args = ap.parse_args()
    if args.smoke:
        args.duration, args.warmup, args.max_requests, args.concurrency = 6.0, 2.0, 300, 4
    out = args.out or (Path(tempfile.gettempdir()) / "serve_load_smoke.json" if args.smoke else ROOT / "bench" / "results" / "serve_load.json")
    torch.set_num_threads(max(1, args.threads))
    work = Path(tempfile.mkdtemp(prefix="serve_load-"))
    proc = None
    try:
        log(f"building models in {work}")
        base, deltas, vocab = build_models(work, args.model, args.smoke)
        sizes = packed_sizes(base, deltas)
        codecs = {n: _codecs(p) for n, p in deltas.items()}
        # the device tier holds about half of the deltas: requests for the others evict and promote under load
        budget = int(sum(sorted(sizes.values())[-2:]) * 1.05)
        host_budget = int(max(sizes.values()) * 1.5)
        from deltapack.serve.app import free_port

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable, "-c", "from deltapack.cli import main; main()", "serve", str(base),
            *sum([["--delta", f"{n}={p}"] for n, p in deltas.items() if n != "dare"], []),
            "--delta-root", str(work / "deltas"), "--host", "127.0.0.1", "--port", str(port),
            "--max-batch", str(args.max_batch), "--gpu-delta-bytes", str(budget), "--cpu-delta-bytes", str(host_budget),
            "--served-model-name", "base",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT / "src")}
        log("starting server: " + " ".join(cmd[3:]))
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_healthy(url, proc)
        models = ["base"] + [n for n in deltas if n != "dare"]
        stats = Stats()
        stop = threading.Event()
        deadline_box = {"t": time.monotonic() + args.warmup + args.duration}

        def worker(seed: int):
            rng = random.Random(seed)
            with httpx.Client(base_url=url, timeout=300) as c:
                while time.monotonic() < deadline_box["t"] and stats.requests < args.max_requests:
                    one_request(c, rng, models, vocab, args.max_tokens, stats)

        t_start = time.monotonic()
        threads = [threading.Thread(target=worker, args=(1000 + i,), daemon=True) for i in range(args.concurrency)]
        for th in threads:
            th.start()
        reload_result = {}
        reload_period = 5.0 if args.smoke else 15.0
        rl = threading.Thread(target=lambda: reload_result.update(cycles=reload_loop(url, deltas["dare"], stop, stats, reload_period)), daemon=True)
        rl.start()
        time.sleep(args.warmup)
        warm_requests = stats.requests
        samples = []
        t_meas = time.monotonic()
        while any(th.is_alive() for th in threads):
            samples.append((round(time.monotonic() - t_meas, 1), rss_bytes(proc.pid), stats.requests))
            time.sleep(1.0 if args.smoke else 5.0)
        samples.append((round(time.monotonic() - t_meas, 1), rss_bytes(proc.pid), stats.requests))
        stop.set()
        rl.join(120)
        wall = time.monotonic() - t_start
        metrics = scrape(url)
        health = httpx.get(f"{url}/health", timeout=10).status_code
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)

    rss = [s[1] for s in samples]
    ts = [s[0] / 60 for s in samples]
    n = len(rss)
    mean_t, mean_r = sum(ts) / n, sum(rss) / n
    var_t = sum((t - mean_t) ** 2 for t in ts) or 1.0
    slope = sum((t - mean_t) * (r - mean_r) for t, r in zip(ts, rss)) / var_t  # bytes per minute, least squares
    # flat: the second half of the run holds no more memory than the first half's peak plus 5% (and 32 MB slack)
    half = n // 2
    first_peak, second_peak = max(rss[: max(1, half)]), max(rss[half:])
    flat = second_peak <= first_peak * 1.05 + (32 << 20)
    lat_all = [x for k, v in stats.latency.items() if k != "reload" for x in v]
    result = {
        "command": "python " + " ".join([_rel(sys.argv[0]), *sys.argv[1:]]),
        "device": f"{platform.processor() or platform.machine()} cpu: {_cpu_name()}, {os.cpu_count()} logical cores (shared), torch {torch.__version__}",
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "git_commit": _git_commit(),
        "config": {
            "model": args.model, "smoke": args.smoke, "duration_s": args.duration, "warmup_s": args.warmup,
            "max_requests": args.max_requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
            "max_batch": args.max_batch, "server_torch_threads": args.threads, "tenants": models + [f"hot (loaded, used, unloaded every {reload_period:g} s)"],
            "codecs": codecs, "packed_bytes": sizes, "gpu_delta_bytes": budget,
            "cpu_delta_bytes": host_budget,
        },
        "results": {
            "wall_s": round(wall, 1),
            "requests": stats.requests,
            "ok": stats.ok,
            "expected_400s_for_malformed": stats.expected_4xx,
            "errors": stats.errors,
            "error_samples": stats.error_samples,
            "requests_after_warmup": stats.requests - warm_requests,
            "requests_by_model": stats.by_model,
            "tokens_generated": stats.tokens,
            "tokens_per_s": round(stats.tokens / wall, 1),
            "latency_s": {"all": pct(lat_all), **{k: pct(v) for k, v in stats.latency.items()}},
            "stream_ttft_s": pct(stats.ttft),
            "reload_cycles": reload_result.get("cycles", 0),
            "health_at_end": health,
            "server_rss_mb": {
                "start": round(rss[0] / 2**20, 1),
                "end": round(rss[-1] / 2**20, 1),
                "max": round(max(rss) / 2**20, 1),
                "first_half_peak": round(first_peak / 2**20, 1),
                "second_half_peak": round(second_peak / 2**20, 1),
                "slope_mb_per_min": round(slope / 2**20, 2),
                "flat": flat,
                "flat_rule": "second-half peak <= first-half peak * 1.05 + 32 MB",
                "samples": [(t, round(r / 2**20, 1), q) for t, r, q in samples],
            },
            "server_metrics_at_end": metrics,
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.part")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    r = result["results"]
    log(
        f"{r['requests']} requests ({r['ok']} ok, {r['expected_400s_for_malformed']} expected 400s, {r['errors']} errors), "
        f"p50 {r['latency_s']['all'].get('p50')} s, p99 {r['latency_s']['all'].get('p99')} s, "
        f"RSS {r['server_rss_mb']['start']} -> {r['server_rss_mb']['end']} MB (flat={flat}); wrote {out}"
    )
    return 0 if stats.errors == 0 and flat and health == 200 else 1


def _rel(p: str) -> str:
    rp = Path(p).resolve()
    return str(rp.relative_to(ROOT)) if rp.is_relative_to(ROOT) else p


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _codecs(path: Path) -> list[str]:
    from deltapack import api

    return sorted({t["codec"] for t in api.inspect(path)["tensors"]})


if __name__ == "__main__":
    sys.exit(main())
