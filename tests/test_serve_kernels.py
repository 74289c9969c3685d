"""Reference delta kernels: every codec's packed layout applied to a mixed-tenant batch equals x @ decode(delta)^T."""

from __future__ import annotations

import pytest
import torch

from deltapack.format.codecs import CODECS, Codec, build_factor_parts, get_codec, register_codec
from deltapack.kernels import LayerDeltas, TokenSlots, get_kernels
from deltapack.methods.base import TensorJob
from deltapack.methods.bitdelta import BitDelta
from deltapack.methods.dare import Dare
from deltapack.quant.rtn import quantize_rows

M, N = 24, 40  # out x in (N not a multiple of 8: exercises packing padding)


def _job(delta: torch.Tensor) -> TensorJob:
    return TensorJob("model.layers.0.mlp.up_proj.weight", tuple(delta.shape), delta, 1 << 30, "linear")


def _entries() -> dict[str, tuple[str, dict, dict]]:
    """(codec, params, parts) of one random delta per codec variant."""
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(M, N, generator=g) * 0.05
    out = {"dense": ("dense", {}, {"values": delta.clone()})}
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    A, Bt = S[:6, None].sqrt() * Vh[:6], S[:6, None].sqrt() * U[:, :6].T
    params, parts = build_factor_parts([{"bits": 16, "A": A[:2], "Bt": Bt[:2]}])
    out["factors16"] = ("factors", params, parts)
    params, parts = build_factor_parts(
        [
            {"bits": 16, "A": A[:1], "Bt": Bt[:1]},
            {"bits": 8, "A": quantize_rows(A[1:3], 8, 16), "Bt": quantize_rows(Bt[1:3], 8)},
            {"bits": 3, "A": quantize_rows(A[3:6], 3, 16), "Bt": quantize_rows(Bt[3:6], 3)},
        ]
    )
    out["factors_mixed_bits"] = ("factors", params, parts)
    for planes, scale in ((1, "matrix"), (3, "row")):
        enc = BitDelta(planes=planes, scale=scale).encode(_job(delta.clone()), None)
        out[f"sign_{planes}_{scale}"] = (enc.codec, enc.params, enc.parts)
    for bits in (16, 4):
        enc = Dare(keep_prob=0.3, bits=bits, group_size=32).encode(_job(delta.clone()), None)
        out[f"sparse_bernoulli_{bits}"] = (enc.codec, enc.params, enc.parts)
    keep = 3
    params = {"mask": "group", "group_size": 8, "keep": keep, "seed": 11, "bits": 16}
    pos = get_codec("sparse").positions(params, (M, N))
    vals = torch.gather(delta, 1, pos).to(torch.bfloat16)
    out["sparse_group"] = ("sparse", params, {"values": vals})
    return out


ENTRIES = _entries()


def _decode(codec, params, parts, shape=(M, N)):
    return get_codec(codec).decode(params, parts, shape).float()


@pytest.mark.parametrize("key", sorted(ENTRIES))
def test_pack_apply_rows_match_decode(key):
    codec, params, parts = ENTRIES[key]
    k = get_kernels("reference")
    p = k.pack(codec, params, parts, (M, N), dtype=torch.float32)
    dense = _decode(codec, params, parts)
    assert p.nbytes() > 0
    x = torch.randn(5, N, generator=torch.Generator().manual_seed(1))
    lay = LayerDeltas("w")
    lay.set(0, p)
    tokens = TokenSlots(torch.zeros(5, dtype=torch.long))
    y = k.linear(x, tokens, lay)
    torch.testing.assert_close(y, x @ dense.T, rtol=1e-5, atol=1e-6)
    ids = torch.tensor([0, 5, M - 1, 5, 7])
    r = k.rows(ids, tokens, lay)
    torch.testing.assert_close(r.float(), dense[ids], rtol=1e-5, atol=1e-6)


def test_packed_bytes_are_the_compressed_size():
    k = get_kernels("reference")
    sign = k.pack(*ENTRIES["sign_1_matrix"], (M, N), dtype=torch.float32)
    assert sign.tensors["signs"].dtype == torch.uint8  # bits stay packed
    assert sign.nbytes() == M * ((N + 7) // 8) + 4
    sp = k.pack(*ENTRIES["sparse_group"], (M, N), dtype=torch.float32)
    nnz = M * (N // 8) * 3
    assert sp.tensors["values"].numel() == nnz
    assert sp.nbytes() == nnz * (4 + 2) + (M + 1) * 4  # values fp32 + int16 columns + int32 row pointers
    f = k.pack(*ENTRIES["factors16"], (M, N), dtype=torch.float32)
    assert f.nbytes() == 2 * (M + N) * 4  # rank 2, fp32 factors


def test_mixed_tenants_in_one_call():
    """Tokens of 4 tenants (different codecs) and base tokens interleaved: each gets its own tenant's delta."""
    k = get_kernels("reference")
    keys = ["dense", "factors_mixed_bits", "sign_3_row", "sparse_bernoulli_4"]
    lay = LayerDeltas("w")
    dense = {}
    for s, key in enumerate(keys):
        slot = s * 2  # sparse slot numbers, one empty slot between
        lay.set(slot, k.pack(*ENTRIES[key], (M, N), dtype=torch.float32))
        dense[slot] = _decode(*ENTRIES[key])
    g = torch.Generator().manual_seed(2)
    slots = torch.tensor([0, -1, 2, 4, 6, 0, 1, 6, -1, 4, 2, 2])
    x = torch.randn(len(slots), N, generator=g)
    y = k.linear(x, TokenSlots(slots), lay)
    for t, s in enumerate(slots.tolist()):
        want = x[t] @ dense[s].T if s in dense else torch.zeros(M)
        torch.testing.assert_close(y[t], want, rtol=1e-5, atol=1e-6)


def test_token_groups_from_rows_match_generic():
    ts = TokenSlots.from_rows([3, -1, 0, 3], 5, "cpu")
    generic = TokenSlots(ts.slot_ids.clone())
    a = {s: i.tolist() for s, i in ts.groups()}
    b = {s: i.tolist() for s, i in generic.groups()}
    assert a == b == {0: list(range(10, 15)), 3: list(range(0, 5)) + list(range(15, 20))}


def test_vector_and_growth_rows():
    k = get_kernels("reference")
    lay = LayerDeltas("b")
    lay.set(1, k.pack("dense", {}, {"values": torch.arange(4.0)}, (4,), dtype=torch.float32))
    v = k.vector(TokenSlots(torch.tensor([1, -1, 1, 0, 5])), lay)  # slots 0 and 5 have no vector here
    torch.testing.assert_close(v, torch.stack([torch.arange(4.0), torch.zeros(4), torch.arange(4.0), torch.zeros(4), torch.zeros(4)]))
    # vocabulary growth: ids past the codec's rows read the stored new rows
    emb = LayerDeltas("e")
    p = k.pack(*ENTRIES["factors16"], (M, N), dtype=torch.float32)
    p.extra_rows = torch.randn(2, N)
    emb.set(0, p)
    ids = torch.tensor([1, M, M + 1, 3])
    r = k.rows(ids, TokenSlots(torch.zeros(4, dtype=torch.long)), emb)
    dense = _decode(*ENTRIES["factors16"])
    torch.testing.assert_close(r[0], dense[1])
    torch.testing.assert_close(r[1:3], p.extra_rows)
    torch.testing.assert_close(r[3], dense[3])
    assert emb.max_extra_rows == 2


def test_unknown_codec_falls_back_to_decoded_layout():
    name = "test-serve-diag"
    if name not in CODECS:

        @register_codec
        class _Diag(Codec):  # a codec without a packer: a diagonal delta
            name = "test-serve-diag"

            @classmethod
            def decode(cls, params, parts, shape):
                out = torch.zeros(shape)
                d = parts["diag"].float()
                out[range(d.numel()), range(d.numel())] = d
                return out

    k = get_kernels("reference")
    p = k.pack(name, {}, {"diag": torch.arange(1.0, 9.0)}, (M, N), dtype=torch.float32)
    assert p.kind == "sparse" and p.meta["nnz"] == 8
    x = torch.randn(3, N)
    lay = LayerDeltas("w")
    lay.set(0, p)
    y = k.linear(x, TokenSlots(torch.zeros(3, dtype=torch.long)), lay)
    torch.testing.assert_close(y, x @ get_codec(name).decode({}, {"diag": torch.arange(1.0, 9.0)}, (M, N)).T)


def test_bf16_compute():
    """The packed layouts work in the GPU dtype too (values rounded to bf16, results close)."""
    k = get_kernels("reference")
    for key in ("dense", "factors_mixed_bits", "sign_3_row", "sparse_group"):
        p = k.pack(*ENTRIES[key], (M, N), dtype=torch.bfloat16)
        lay = LayerDeltas("w")
        lay.set(0, p)
        x = torch.randn(4, N)
        y = k.linear(x.bfloat16(), TokenSlots(torch.zeros(4, dtype=torch.long)), lay)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), x @ _decode(*ENTRIES[key]).T, rtol=0.05, atol=0.02)


def test_fast_paths_equal_definitions():
    """The sparse fast path (torch CSR matmul) equals the gather definition; the uint8 sign unpacker equals the
    format's generic unpacker."""
    from deltapack.format.packing import pack_bits, unpack_bits
    from deltapack.kernels.reference import csr_matmul, csr_matmul_gather, unpack_pm1, unpack_signs

    k = get_kernels("reference")
    for key in ("sparse_bernoulli_16", "sparse_group"):
        t = k.pack(*ENTRIES[key], (M, N), dtype=torch.float32).tensors
        x = torch.randn(7, N)
        torch.testing.assert_close(csr_matmul(x, t["crow"], t["col"], t["values"], M), csr_matmul_gather(x, t["crow"], t["col"], t["values"], M))
    codes = (torch.rand(13, N) < 0.5).to(torch.uint8)
    packed = pack_bits(codes, 1)
    assert torch.equal(unpack_signs(packed, N), unpack_bits(packed, 1, N)) and torch.equal(unpack_signs(packed, N), codes)
    assert torch.equal(unpack_pm1(packed, N, torch.float32), codes.float() * 2 - 1)
