"""Storage primitives: bit packing, seeded masks, RTN quantization, codecs and the manifest."""

import json

import pytest
import torch

from deltapack.errors import FormatError
from deltapack.format.codecs import build_factor_parts, decode_entry
from deltapack.format.manifest import Manifest
from deltapack.format.masks import bernoulli_mask, group_keep_indices, seed_for
from deltapack.format.packing import pack_bits, packed_row_bytes, unpack_bits
from deltapack.quant.rtn import qmatrix_bytes, quantize_rows


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("cols", [1, 5, 8, 13, 64, 577])
def test_pack_unpack_exact_every_width(bits, cols):
    g = torch.Generator().manual_seed(bits * 1000 + cols)
    codes = torch.randint(0, 2**bits, (7, cols), generator=g)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (7, packed_row_bytes(cols, bits))
    assert torch.equal(unpack_bits(packed, bits, cols).long(), codes)


def test_packed_size_is_bits_per_code():
    # 3-bit codes: 8 codes in exactly 3 bytes
    assert packed_row_bytes(4096, 3) == 4096 * 3 // 8
    assert packed_row_bytes(4096, 1) == 512
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([[4]]), 2)


def test_bernoulli_mask_reproducible_and_name_dependent():
    s1, s2 = seed_for("a.weight"), seed_for("b.weight")
    assert s1 != s2
    m1 = bernoulli_mask((64, 96), 0.25, s1)
    assert torch.equal(m1, bernoulli_mask((64, 96), 0.25, s1))
    assert not torch.equal(m1, bernoulli_mask((64, 96), 0.25, s2))
    assert abs(m1.float().mean().item() - 0.25) < 0.03


def test_group_mask_fixed_count_per_group():
    idx = group_keep_indices((10, 64), 16, 3, seed=11)
    assert idx.shape == (10, 12)
    groups = idx // 16
    for r in range(10):
        assert torch.equal(torch.bincount(groups[r], minlength=4), torch.full((4,), 3))
    assert torch.equal(idx, group_keep_indices((10, 64), 16, 3, seed=11))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_rtn_error_falls_with_bits_and_bytes_are_exact(bits):
    x = torch.randn(32, 300, generator=torch.Generator().manual_seed(0))
    q = quantize_rows(x, bits, 128)
    assert q.nbytes() == qmatrix_bytes(32, 300, bits, 128)
    rel = ((q.dequantize() - x).norm() / x.norm()).item()
    bound = {1: 0.65, 2: 0.36, 3: 0.2, 4: 0.1, 8: 0.01}[bits]
    assert rel < bound


def test_factors_codec_mixed_groups_roundtrip():
    torch.manual_seed(0)
    m, n = 48, 80
    A1, B1 = torch.randn(2, n), torch.randn(2, m)
    A2, B2 = torch.randn(6, n), torch.randn(6, m)
    qa, qb = quantize_rows(A2, 3, 32), quantize_rows(B2, 3, 16)
    params, parts = build_factor_parts([{"bits": 16, "A": A1, "Bt": B1}, {"bits": 3, "A": qa, "Bt": qb}])
    want = B1.bfloat16().float().T @ A1.bfloat16().float() + qb.dequantize().T @ qa.dequantize()
    got = decode_entry("factors", params, parts, (m, n))
    assert torch.allclose(got, want, atol=1e-4)
    # a truncated code blob is a clear format error, not garbage
    parts["A.codes"] = parts["A.codes"][:-5]
    with pytest.raises(FormatError):
        decode_entry("factors", params, parts, (m, n))


def test_manifest_rejects_future_version(tmp_path):
    p = tmp_path / "delta_config.json"
    p.write_text(json.dumps({"format": "deltapack", "format_version": 99}))
    with pytest.raises(FormatError, match="format version 99"):
        Manifest.load(p)
    p.write_text('{"format": "deltapack", "format_ver')
    with pytest.raises(FormatError, match="not valid JSON"):
        Manifest.load(p)


@pytest.mark.parametrize("p", [0.0, 1e-9, 0.03, 0.5, 0.9999999, 1.0])
def test_bernoulli_hashes_give_the_decoders_mask(p):
    """dare's encoder hashes a tensor once and thresholds it per keep rate: the mask must be the one the decoder
    regenerates with bernoulli_mask, bit for bit (a mismatch would rebuild a different fine-tune)."""
    from deltapack.format.masks import BernoulliHashes, bernoulli_mask

    shape, seed = (37, 1000), 123456789
    assert torch.equal(BernoulliHashes(shape, seed).mask(p), bernoulli_mask(shape, p, seed))


def test_mask_hash_is_pinned_and_independent_of_blocking():
    """The seeded masks are part of the file format: a delta written by an earlier version must regenerate the same
    positions. Pinned values (computed by the original out-of-place hash); and the CPU's cache-sized blocks, other
    block sizes and row ranges give the same hashes as hashing the flat indices at once."""
    import hashlib

    from deltapack.format import masks

    idx = torch.tensor([0, 1, 2, 12345, 2**31 - 1, 2**31 + 7, 3 * 2**30 + 11], dtype=torch.int64)
    assert masks.hash32(idx, 3012345678).tolist() == [1119649522, 345853671, 261743443, 1361520175, 983510653,
                                                      3439106513, 3933715116]
    assert masks.hash32(idx, 0).tolist()[:4] == [0, 1834104592, 2889141741, 724572905]
    assert idx.tolist()[3] == 12345  # the input is not modified in place
    mask = masks.bernoulli_mask((1000, 1000), 0.1, 5)
    assert hashlib.sha256(mask.numpy().tobytes()).hexdigest()[:16] == "f156a3a1168a5a09"
    keep = masks.group_keep_indices((100, 1024), 32, 3, 5)
    assert hashlib.sha256(keep.numpy().tobytes()).hexdigest()[:16] == "11f0425c7e4e2c0f"

    shape, seed = (37, 1000), 77
    flat = masks.hash32(torch.arange(shape[0] * shape[1]), seed).view(shape)
    for block in (1, 999, 1000, 4096, 1 << 20):
        got = torch.cat([h for _, _, h in masks.row_block_hashes(shape, seed, block_elems=block)])
        assert torch.equal(got, flat), block
    assert torch.equal(masks.hash_rows(shape, 5, 30, seed), flat[5:30])
