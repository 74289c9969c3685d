"""Start-up of `deltapack serve`: the phases it records (log, /health), readiness claimed only once requests are
served, and the parallel registration of the start-up deltas. No timings are asserted: only that they exist."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from conftest import make_finetune, make_llama
from deltapack import api
from deltapack.errors import FormatError
from deltapack.serve.app import free_port
from deltapack.serve.startup import StartupClock, in_background, process_age_s
from deltapack.serve.testing import running_server, stop_process, to_float32
from deltapack.serve.tiers import ConflictError


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_startup")
    make_llama(d / "base", hidden=64, vocab=128, dtype=torch.float32)
    out = {}
    for i, method in enumerate(("lowrank", "dare")):
        make_finetune(d / "base", d / f"ft{i}", scale=0.5, seed=60 + i)
        to_float32(d / f"ft{i}")
        out[method] = api.compress(d / "base", d / f"ft{i}", d / f"delta_{method}", method=method, ratio=2.0,
                                   progress=False)
    return d / "base", out


def test_clock_phases_add_up_and_name_the_gaps():
    clock = StartupClock(since_process_start=False)
    with clock.phase("base load"):
        pass
    time.sleep(0.01)  # work between phases lands in "other", so the phases add up to the total
    with clock.phase("deltas"):
        pass
    clock.mark("http listen")
    ready = clock.ready()
    d = clock.as_dict()
    assert d["ready_s"] == ready and d["from_process_start"] is False
    assert list(d["phases"])[:2] == ["base load", "other"] and "deltas" in d["phases"]
    assert sum(d["phases"].values()) == pytest.approx(ready, abs=0.01)


def test_process_age_and_background_future():
    age = process_age_s()
    if sys.platform.startswith("linux"):
        assert age is not None and age > 0
    assert in_background(lambda: 41 + 1, "t").result(5) == 42
    fut = in_background(lambda: 1 / 0, "t")
    with pytest.raises(ZeroDivisionError):
        fut.result(5)


def test_health_reports_startup_phases(pair):
    base, deltas = pair
    with running_server(base, list(deltas.items()), max_batch=4) as (state, url):
        h = httpx.get(f"{url}/health", timeout=10).json()
        assert h["status"] == "ok"
        st = h["startup"]
        assert st["ready_s"] is not None  # ServerThread marks it once the socket listens
        for phase in ("base load", "deltas", "engine"):
            assert phase in st["phases"]
        assert set(st["notes"]["deltas"]) == {"verify_s", "fingerprint_wait_s", "pack_s", "prepack_s", "prepack_wait_s",
                                              "pack_device", "device_pack_fallbacks"}
        assert st["notes"]["deltas"]["pack_device"] == "host"  # the default, and a CPU server's only choice
        steps = st["notes"]["base load"]  # where the base load went, step by step
        assert set(steps) == {"import_s", "read_s", "to_device_s", "wrap_s", "tokenizer_s"}
        assert sum(steps.values()) <= st["phases"]["base load"] + 1e-3
        # registered in the order given, though prepared in parallel
        assert list(state.tiers.tenants) == list(deltas)


def test_register_many_refuses_duplicates_and_adds_nothing_on_failure(pair, tmp_path):
    from deltapack.serve.model import ModelRunner
    from deltapack.serve.tiers import DeltaTiers

    base, deltas = pair
    tiers = DeltaTiers(ModelRunner(base, device="cpu"), device_bytes=1 << 30, host_bytes=1 << 30)
    try:
        with pytest.raises(ConflictError):
            tiers.register_many([("x", deltas["dare"]), ("x", deltas["lowrank"])])
        broken = tmp_path / "broken"
        subprocess.run(["cp", "-r", str(deltas["dare"]), str(broken)], check=True)
        shard = next(p for p in broken.iterdir() if p.suffix == ".safetensors")
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF  # same size, other bytes: only the checksum can tell
        shard.write_bytes(bytes(data))
        with pytest.raises(FormatError, match="checksum mismatch"):
            tiers.register_many([("good", deltas["lowrank"]), ("bad", broken)])
        assert tiers.tenants == {}
        got = tiers.register_many([("b", deltas["dare"]), ("a", deltas["lowrank"])])
        assert [t.name for t in got] == ["b", "a"] and list(tiers.tenants) == ["b", "a"]
    finally:
        tiers.close()


def test_cli_ready_only_when_every_model_answers(pair):
    """The first 200 of /health must mean requests are served: every model answers at once, and /health then carries
    the whole start-up record (imports counted from the process start)."""
    base, deltas = pair
    port = free_port()
    cmd = [sys.executable, "-c", "from deltapack.cli import main; main()", "serve", str(base), "--port", str(port),
           "--served-model-name", "base", "--max-batch", "4", "--device", "cpu"]
    for name, path in deltas.items():
        cmd += ["--delta", f"{name}={path}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)  # keep the pipe drained
    reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            try:
                r = httpx.get(f"{url}/health", timeout=2)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, b"".join(out).decode()[-2000:]
            assert time.monotonic() - t0 < 120, "server did not come up"
            time.sleep(0.05)
        for name in ["base", *deltas]:
            c = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": [5, 6, 7], "max_tokens": 1,
                                                          "temperature": 0}, timeout=60)
            assert c.status_code == 200, c.text
        st = httpx.get(f"{url}/health", timeout=5).json()["startup"]
        assert st["ready_s"] is not None
        for phase in ("imports", "base load", "deltas", "engine", "http app", "http listen"):
            assert phase in st["phases"], st
        if sys.platform.startswith("linux"):
            assert st["from_process_start"] is True
    finally:
        stop_process(proc)
        reader.join(10)
    log = b"".join(out).decode()
    assert proc.returncode == 0, log[-2000:]
    assert "ready in " in log and "base load" in log


def test_triton_packs_in_parallel_threads_match_sequential_ones(pair):
    """The server's start packs its deltas in parallel threads; the Triton backend's pack shares only its launch
    masks, now under their own lock (the whole pack used to take turns): the same packed tensors and the same
    family masks as one pack after another."""
    pytest.importorskip("triton")
    from concurrent.futures import ThreadPoolExecutor

    from deltapack.format.directory import DeltaDir
    from deltapack.kernels.triton import TritonKernels

    _, deltas = pair
    jobs = []
    for path in deltas.values():
        d = DeltaDir.open(path)
        for name in d.manifest.tensors:
            te = d.entry(name)
            if len(te.shape) == 2:
                jobs.append((te.codec, te.params, d.parts(name), tuple(te.shape)))
    assert len(jobs) > 4

    def pack_all(kernels, threads):
        def one(job):
            codec, params, parts, shape = job
            return kernels.pack(codec, params, dict(parts), shape, dtype=torch.float32)

        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(one, jobs))

    seq, par = TritonKernels(), TritonKernels()
    a, b = pack_all(seq, 1), pack_all(par, 8)
    assert par._masks == seq._masks and seq._masks
    for p, q in zip(a, b):
        assert p.kind == q.kind and p.meta == q.meta
        for k, v in vars(p).items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, getattr(q, k)), k


def test_deltas_packed_beside_the_base_load_serve_the_same_tokens(pair, tmp_path):
    """build_server(prepack=True): the deltas are packed while the base loads and registration takes those packs
    (no packing of its own) after its checks against the base; the tokens are those of a server that packed at
    registration. A delta whose shard is corrupt still fails with the checksum error, and nothing is added."""
    base, deltas = pair
    prompt = [3, 1, 4, 1, 5]

    def tokens(url, model):
        r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 4,
                                                      "temperature": 0, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    with running_server(base, list(deltas.items()), max_batch=4, prepack=False) as (state, url):
        want = {m: tokens(url, m) for m in deltas}
        assert state.tiers.timings["pack_s"] > 0 and state.tiers.timings["prepack_s"] == 0
    with running_server(base, list(deltas.items()), max_batch=4, prepack=True) as (state, url):
        assert {m: tokens(url, m) for m in deltas} == want
        assert state.tiers.timings["prepack_s"] > 0 and state.tiers.timings["pack_s"] == 0
        assert not state.tiers._prepacked  # every future taken
        notes = httpx.get(f"{url}/health", timeout=10).json()["startup"]["notes"]["deltas"]
        assert {"prepack_s", "prepack_wait_s"} <= set(notes)

    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(deltas["dare"]), str(broken)], check=True)
    shard = next(p for p in broken.iterdir() if p.suffix == ".safetensors")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    from deltapack.serve.app import build_server

    with pytest.raises(FormatError, match="checksum mismatch"):
        build_server(str(base), [("good", str(deltas["lowrank"])), ("bad", str(broken))], device="cpu", prepack=True)
