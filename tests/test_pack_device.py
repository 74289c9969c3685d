"""Packing on the device (`deltapack serve --pack-device auto`, serve/tiers.pack_tensor's work_device): every packer
of both kernel backends makes its layout where its inputs are, so that parts moved to a GPU are packed there.

Checked without a GPU: each codec's tensors are packed from CPU parts inside `torch.device("meta")`, which makes
every tensor created without an explicit device a meta tensor (it has no data, so any such tensor fails the pack or
shows in its result). A pack that equals the plain CPU pack there creates nothing on a device of its own choosing.
The same holds for codecs added later: they are packed by the same test once a method produces them."""

from __future__ import annotations

import pytest
import torch

from conftest import make_finetune, make_llama
from deltapack import api
from deltapack.format.directory import DeltaDir
from deltapack.kernels.reference import ReferenceKernels
from deltapack.kernels.triton.layouts import pack_entry
from deltapack.serve import tiers
from deltapack.serve.testing import to_float32

METHODS = {  # method -> params (data-free where a method would calibrate): between them, every stored codec
    "lowrank": {}, "delta-come": {"quantizer": "rtn"}, "dare": {}, "deltadq": {"calibrate": False},
    "bitdelta": {},
}  # (lossless tensors, decoded against the base, always pack on the host: tiers.pack_tensor)


@pytest.fixture(scope="module")
def deltas(tmp_path_factory):
    d = tmp_path_factory.mktemp("pack_device")
    make_llama(d / "base", hidden=64, vocab=96, dtype=torch.float32, tie=False)
    out = {}
    for i, (method, params) in enumerate(METHODS.items()):
        make_finetune(d / "base", d / f"ft_{method}", scale=0.5, seed=70 + i, grow_vocab=4 if method == "dare" else 0)
        to_float32(d / f"ft_{method}")
        out[method] = api.compress(d / "base", d / f"ft_{method}", d / f"delta_{method}", method=method,
                                   ratio=4.0, params=params, progress=False)
    return out


def _packs(path):
    d = DeltaDir.open(path)
    d.load_verified()
    for tname in d.manifest.tensors:
        te = d.entry(tname)
        parts = d.parts(tname)
        parts.pop("new_rows", None)
        shape = list(te.shape)
        if te.base_rows is not None:
            shape[0] = te.base_rows
        yield tname, te.codec, te.params, parts, tuple(shape)


def _same(a, b) -> bool:
    return (a.kind == b.kind and a.meta == b.meta and set(a.tensors) == set(b.tensors)
            and all(b.tensors[k].device.type == "cpu" and torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors))


@pytest.mark.parametrize("backend", ["reference", "triton-layout"])
def test_every_packer_makes_its_layout_where_its_inputs_are(deltas, backend):
    pack = ((lambda c, p, parts, s: ReferenceKernels().pack(c, p, parts, s, dtype=torch.bfloat16)) if backend == "reference"
            else (lambda c, p, parts, s: pack_entry(c, p, parts, s, torch.bfloat16)))
    codecs = set()
    for method, path in deltas.items():
        for tname, codec, params, parts, shape in _packs(path):
            entries = [(codec, params)]
            if codec == "factors":  # a peft adapter's tensors: factors with a scale (import_lora)
                entries.append(("lora", dict(params, scale=0.5)))
            for c, p in entries:
                codecs.add(c)
                plain = pack(c, p, parts, shape)
                with torch.device("meta"):  # a tensor made without following the inputs lands here
                    on_inputs = pack(c, p, parts, shape)
                assert _same(plain, on_inputs), (method, tname, c)
    assert {"factors", "lora", "sparse", "deltadq", "sign", "dense"} <= codecs  # every codec deltapack stores lossily


def test_a_device_out_of_memory_packs_on_the_host(deltas, monkeypatch):
    """pack_tensor with a work device: the parts go there; a device without memory for the pack leaves it to the
    host (same layout as a host pack, counted and logged) instead of failing the load."""
    calls = []

    class OutOfMemoryOnDevice(ReferenceKernels):
        def pack(self, codec, params, parts, shape, *, dtype, device="cpu"):
            where = {t.device.type for t in parts.values()}
            calls.append(where)
            if where != {"cpu"}:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return super().pack(codec, params, parts, shape, dtype=dtype, device=device)

    d = DeltaDir.open(deltas["dare"])
    d.load_verified()
    tname = next(n for n in d.manifest.tensors if "q_proj" in n)
    before = tiers.PACK_STATS["device_fallbacks"]
    got = tiers.pack_tensor(d, tname, torch.bfloat16, OutOfMemoryOnDevice(), "cpu", work_device=torch.device("meta"))
    want = tiers.pack_tensor(d, tname, torch.bfloat16, ReferenceKernels(), "cpu")
    assert calls == [{"meta"}, {"cpu"}]  # tried where asked, then on the host
    assert tiers.PACK_STATS["device_fallbacks"] == before + 1
    assert _same(want, got)


def test_pack_device_option_on_a_cpu_server(tmp_path):
    """--pack-device auto on a CPU server packs on the host (there is no other device) and says so in /health's
    start-up notes; an unknown value is refused before anything loads."""
    import httpx

    from deltapack.errors import DeltapackError
    from deltapack.serve.app import build_server, work_device
    from deltapack.serve.testing import running_server

    make_llama(tmp_path / "base", hidden=64, vocab=96, dtype=torch.float32)
    make_finetune(tmp_path / "base", tmp_path / "ft", scale=0.5, seed=5)
    to_float32(tmp_path / "ft")
    delta = api.compress(tmp_path / "base", tmp_path / "ft", tmp_path / "delta", method="dare", ratio=4.0,
                         progress=False)
    with running_server(tmp_path / "base", [("t", delta)], device="cpu", pack_device="auto") as (state, url):
        notes = httpx.get(f"{url}/health", timeout=10).json()["startup"]["notes"]["deltas"]
        assert notes["pack_device"] == "host" and state.tiers.pack_device is None
    assert work_device("auto", torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert work_device("host", torch.device("cuda", 0)) is None
    with pytest.raises(DeltapackError, match="--pack-device"):
        build_server(str(tmp_path / "base"), [], device="cpu", pack_device="gpu")
