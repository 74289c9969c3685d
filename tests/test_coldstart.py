"""Cold start (issue 26): kernel variants compiled in the background with the pure-torch path serving meanwhile and a
per-kernel switch when each is ready (compilation mocked; kernels run in Triton's CPU interpreter), the compiled-
kernel cache directory, and a server that answers /health (and requests) before its warm-up ends."""

from __future__ import annotations

import os
import threading

if os.environ.get("DELTAPACK_TRITON_TEST_DEVICE", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch

from deltapack.kernels import LayerDeltas, TokenSlots
from deltapack.kernels.compile import KernelCompiler, Variant, cache_key, default_cache_dir, setup_cache_dir

pytest.importorskip("triton")
tk = pytest.importorskip("deltapack.kernels.triton")

from test_kernels_triton import ENTRIES, M, N, _exact, _rel, _want  # noqa: E402


def _gated(hold: threading.Event, fail: str | None = None, seen: list | None = None):
    """A mock compile: waits for `hold`; raises for variants whose description contains `fail`."""

    def compile_fn(v: Variant):
        if seen is not None:
            seen.append(v.what)
        hold.wait(10)
        if fail and fail in v.what:
            raise RuntimeError("mock compiler error")

    return compile_fn


KEYS = ["deltacome_rows", "sign_3_row", "dare_4", "lowrank"]


def _setup(k, dtype=torch.float32):
    lay = LayerDeltas("w")
    exact = {}
    for s, key in enumerate(KEYS):
        lay.set(s, k.pack(*ENTRIES[key], (M, N), dtype=dtype, device="cpu"))
        exact[s] = _exact(*ENTRIES[key])
    tokens = TokenSlots.from_rows([0, 1, -1, 2, 3, 0, 2], 1, "cpu")
    x = torch.randn(tokens.num_tokens, N, generator=torch.Generator().manual_seed(3))
    return lay, exact, tokens, x


def test_torch_path_while_compiling_then_switch():
    hold = threading.Event()
    seen: list[str] = []
    comp = KernelCompiler(4, compile_fn=_gated(hold, seen=seen))
    k = tk.TritonKernels(compiler=comp)
    lay, exact, tokens, x = _setup(k)
    want = _want(x, tokens.slot_ids, exact)

    y = k.linear(x, tokens, lay)  # nothing compiled: every family on the torch path, variants queued
    assert k.launches == {"triton": 0, "torch": 3}
    assert _rel(y, want) < 1e-5
    assert comp.pending == 4 and not comp.settled and not k.capturable_now  # direct, V, U, ell
    assert sorted(w.split(" ")[0] for w in seen) == ["ell", "seg/direct", "seg/u", "seg/v"]

    y = k.linear(x, tokens, lay)  # still compiling: no second queueing
    assert comp.pending == 4 and k.launches["torch"] == 6

    hold.set()
    assert comp.wait(10)
    assert comp.status()["ready"] == 4 and k.capturable_now
    y2 = k.linear(x, tokens, lay)
    assert k.launches == {"triton": 3, "torch": 6}
    assert _rel(y2, want) < 1e-5
    assert _rel(y2, y.double()) < 1e-5
    comp.close()


def test_switch_is_per_kernel_and_failures_stay_on_torch():
    hold = threading.Event()
    hold.set()
    comp = KernelCompiler(2, compile_fn=_gated(hold, fail="ell"))
    k = tk.TritonKernels(compiler=comp)
    lay, exact, tokens, x = _setup(k)
    k.linear(x, tokens, lay)
    assert comp.wait(10)
    assert comp.status()["failed"] == 1 and comp.status()["ready"] == 3
    before = dict(k.launches)
    y = k.linear(x, tokens, lay)
    assert k.launches["triton"] - before["triton"] == 2  # direct and factors switched
    assert k.launches["torch"] - before["torch"] == 1  # the sparse family's variant failed: torch path for good
    assert _rel(y, _want(x, tokens.slot_ids, exact)) < 1e-5
    comp.close()


def test_blocking_mode_compiles_before_launching():
    comp = KernelCompiler(2, compile_fn=lambda v: None)
    k = tk.TritonKernels(compiler=comp)
    lay, exact, tokens, x = _setup(k)
    with comp.blocking():
        y = k.linear(x, tokens, lay)
    assert k.launches == {"triton": 3, "torch": 0}
    assert _rel(y, _want(x, tokens.slot_ids, exact)) < 1e-5
    comp.close()


def test_family_masks_share_one_variant_across_layers():
    """Two layers whose factors use different bit widths launch one variant per side, not one per layer."""
    from test_kernels_triton import _factors

    seen: list[str] = []
    ev = threading.Event()
    ev.set()
    comp = KernelCompiler(1, compile_fn=_gated(ev, seen=seen))
    k = tk.TritonKernels(compiler=comp)
    layers = []
    for seed, groups in ((1, [(3, 2), (2, 8)]), (2, [(4, 3), (1, 16)])):
        lay = LayerDeltas(f"w{seed}")
        lay.set(0, k.pack(*_factors(groups, None, None, seed), (M, N), dtype=torch.float32, device="cpu"))
        layers.append(lay)
    tokens = TokenSlots.from_rows([0, -1], 1, "cpu")
    x = torch.randn(2, N)
    for lay in layers:
        k.linear(x, tokens, lay)
    assert comp.wait(10)
    assert len(seen) == 2, seen  # V and U, shared by both layers
    k2 = tk.TritonKernels(tk.LaunchConfig(family_masks=False), compiler=KernelCompiler(1, compile_fn=_gated(ev, seen=seen)))
    seen.clear()
    for lay in layers:
        lay.set(0, lay.get(0))  # new version: plans rebuilt for the second backend
        k2.linear(x, tokens, lay)
    k2.compiler.wait(10)
    assert len(seen) == 4, seen


def test_progress_lines():
    lines: list[str] = []
    hold = threading.Event()
    comp = KernelCompiler(2, compile_fn=_gated(hold), progress=lines.append, progress_every_s=0.0)
    for i in range(3):
        assert not comp.ready(Variant(("k", i), f"kernel {i}"))
    comp._report()
    assert "compiling 3 variants" in lines[-1] and "kernel 0" in lines[-1]
    hold.set()
    comp.wait(10)
    assert lines[-1].startswith("kernels: 3 variants ready (0 failed)")
    comp.close()


def test_cache_dir(tmp_path, monkeypatch):
    key = cache_key("NVIDIA H100 80GB HBM3", "3.6.0", "2.13.0+cu128", "0.4.0")
    assert key == "NVIDIA_H100_80GB_HBM3-triton3.6.0-torch2.13.0+cu128-deltapack0.4.0"
    assert default_cache_dir("A/B", "1", "2", "3", home=tmp_path) == tmp_path / "deltapack" / "triton" / "A_B-triton1-torch2-deltapack3"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    assert setup_cache_dir("cuda") == str(tmp_path / "mine")  # the user's choice wins
    monkeypatch.delenv("TRITON_CACHE_DIR")
    assert setup_cache_dir("cpu") is None and "TRITON_CACHE_DIR" not in os.environ


@pytest.fixture(scope="module")
def pico(tmp_path_factory):
    from conftest import make_finetune, make_llama
    from deltapack import api
    from deltapack.serve.testing import greedy_reference, merged_model, to_float32

    d = tmp_path_factory.mktemp("coldstart")
    make_llama(d / "base", hidden=64, layers=1, vocab=96, dtype=torch.float32)
    deltas, refs = [], {}
    for i, (name, method) in enumerate((("lr", "lowrank"), ("dare", "dare"))):
        make_finetune(d / "base", d / f"ft_{name}", scale=0.6, seed=30 + i)
        to_float32(d / f"ft_{name}")
        path = api.compress(d / "base", d / f"ft_{name}", d / f"d_{name}", method=method, ratio=4.0, progress=False)
        deltas.append((name, path))
        refs[name] = greedy_reference(merged_model(d / "base", path), [5, 17, 9], 3)
    return d, deltas, refs


def test_health_is_ready_before_the_warmup_ends(pico):
    """A server with a background compiler answers /health and serves requests (torch path, merged-model tokens)
    while every kernel variant is still compiling; when they are ready the warm-up finishes and launches switch."""
    import time

    import httpx

    from deltapack.serve.app import start_warmup
    from deltapack.serve.testing import running_server

    d, deltas, refs = pico
    hold = threading.Event()
    comp = KernelCompiler(2, compile_fn=_gated(hold))
    with running_server(d / "base", deltas, kernels="triton", device="cpu", dtype="float32", max_batch=4,
                        compiler=comp) as (state, url):
        k = state.runner.state.kernels
        assert k.compiler is comp
        state.engine.prefill_batch = 1  # fewer stand-in prefills: the interpreter is slow
        thread = start_warmup(state, prompt_tokens=5, max_tokens=2)
        end = time.monotonic() + 60
        while comp.pending == 0 and time.monotonic() < end:
            time.sleep(0.05)
        h = httpx.get(f"{url}/health").json()
        assert h["status"] == "ok" and h["warmup"]["state"] == "running"
        assert h["kernels"]["compiling"] > 0 and h["kernels"]["ready"] == 0
        for name, _ in deltas:  # served on the torch path meanwhile, exactly
            r = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": [5, 17, 9], "max_tokens": 3,
                                                          "temperature": 0, "ignore_eos": True}, timeout=60)
            assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == refs[name]
        assert k.launches["triton"] == 0 and k.launches["torch"] > 0
        assert thread.is_alive()
        hold.set()
        thread.join(300)
        h = httpx.get(f"{url}/health").json()
        assert h["warmup"]["state"] == "done" and h["kernels"]["compiling"] == 0 and h["kernels"]["ready"] > 0
        before = k.launches["triton"]
        for name, _ in deltas:  # the compiled (here: interpreted) kernels now, same tokens
            r = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": [5, 17, 9], "max_tokens": 3,
                                                          "temperature": 0, "ignore_eos": True}, timeout=60)
            assert r.json()["choices"][0]["token_ids"] == refs[name]
        assert k.launches["triton"] > before
