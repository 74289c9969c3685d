"""The two shard writers (io.writer) and the byte-range reader (io.safetensors_file) against safetensors itself."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from deltapack.errors import InputError
from deltapack.io.safetensors_file import SafetensorsFile
from deltapack.io.sources import open_model
from deltapack.io.writer import PlannedShardWriter, StreamingShardWriter, write_weights


def _mixed(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "b.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "a.weight": torch.randn(3, 4, generator=g),  # fp32 sorts before bf16 in safetensors' layout
        "a.codes": torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8),
        "c.idx": torch.randint(0, 1000, (2, 3), generator=g, dtype=torch.int32),
        "z.empty": torch.zeros(0, 4),
        "s.scalar": torch.tensor(2.5),
    }


def _specs(sd):
    return [(n, t.dtype, tuple(t.shape)) for n, t in sd.items()]


def _read_all(d) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_planned_single_shard_is_byte_identical_to_safetensors_save(tmp_path):
    sd = _mixed()
    w = PlannedShardWriter(tmp_path, "model", _specs(sd), metadata={"format": "pt"})
    for n in w.order:
        w.add(n, sd[n])
    files = w.close()
    assert list(files) == ["model.safetensors"]
    data = (tmp_path / "model.safetensors").read_bytes()
    assert data == st_save(sd, metadata={"format": "pt"})
    assert files["model.safetensors"]["bytes"] == len(data)
    assert not list(tmp_path.glob(".*partial"))


def test_planned_shards_follow_the_spec_order_and_size_limit(tmp_path):
    sd = {f"layers.{i}.w": torch.full((64, 16), float(i)) for i in range(10)}  # 4 KiB each
    w = PlannedShardWriter(tmp_path, "model", _specs(sd), max_shard_bytes=3 * 4096 + 100)
    assert w.files == [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    assert w.location["layers.0.w"] == w.location["layers.2.w"] != w.location["layers.3.w"]
    for n in w.order:
        w.add(n, sd[n])
    files = w.close()
    got = _read_all(tmp_path)
    assert set(got) == set(sd) and all(torch.equal(got[n], sd[n]) for n in sd)
    for name, fe in files.items():
        assert (tmp_path / name).stat().st_size == fe["bytes"]
    idx = w.index()
    assert idx["metadata"]["total_size"] == sum(t.numel() * 4 for t in sd.values())
    assert all((tmp_path / f).is_file() for f in idx["weight_map"].values())


def test_planned_writer_refuses_what_was_not_planned(tmp_path):
    sd = _mixed()
    w = PlannedShardWriter(tmp_path, "model", _specs(sd))
    first, second = w.order[0], w.order[1]
    with pytest.raises(ValueError, match="planned order"):
        w.add(second, sd[second])
    with pytest.raises(ValueError, match="planned"):
        w.add(first, sd[first].to(torch.float64))
    with pytest.raises(ValueError, match="planned"):
        w.add(first, sd[first].reshape(-1))
    w.add(first, sd[first])
    with pytest.raises(ValueError, match="never written"):
        w.close()
    w.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="duplicate"):
        PlannedShardWriter(tmp_path, "model", _specs(sd) + _specs(sd)[:1])
    with pytest.raises(ValueError, match="cannot be stored"):
        PlannedShardWriter(tmp_path, "model", [("x", torch.complex64, (2,))])


def test_write_weights_leaves_no_partial_file_when_a_tensor_fails(tmp_path):
    sd = {f"t{i}": torch.ones(8, 8) for i in range(4)}

    def tensor(n):
        if n == "t2":
            raise RuntimeError("decode failed")
        return sd[n]

    with pytest.raises(RuntimeError, match="decode failed"):
        write_weights(tmp_path, _specs(sd), tensor, max_shard_bytes=256)
    assert list(tmp_path.iterdir()) == []
    files = write_weights(tmp_path, _specs(sd), sd.__getitem__, max_shard_bytes=256)
    assert len(files) == 4
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd)


def test_streaming_writer_shards_are_byte_identical_to_safetensors_save(tmp_path):
    sd = _mixed(1)
    w = StreamingShardWriter(tmp_path, "delta", max_shard_bytes=1 << 20, metadata={"format": "deltapack"})
    for n, t in sd.items():
        w.add(n, t)
    files = w.close()
    assert list(files) == ["delta.safetensors"]
    assert (tmp_path / "delta.safetensors").read_bytes() == st_save(sd, metadata={"format": "deltapack"})
    assert not list(tmp_path.glob(".*"))


def test_byte_range_reader_matches_safe_open_and_reports_truncation(tmp_path):
    sd = _mixed(2)
    p = tmp_path / "m.safetensors"
    p.write_bytes(st_save(sd))
    f = SafetensorsFile(p)
    assert set(f.keys()) == set(sd)
    for n, t in sd.items():
        assert torch.equal(f.get(n), t) and f.get(n).dtype == t.dtype
    p.write_bytes(p.read_bytes()[:-8])
    with pytest.raises(InputError, match="truncated"):
        SafetensorsFile(p)
    p.write_bytes(b"\x10\x00")
    with pytest.raises(InputError, match="header"):
        SafetensorsFile(p)


def test_model_source_reads_every_dtype_by_byte_range(tmp_path):
    sd = {k: v for k, v in _mixed(3).items()}
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(st_save(sd))
    src = open_model(tmp_path)
    assert src.keys() == sorted(sd)
    for n, t in src.iter_tensors():
        assert torch.equal(t, sd[n]) and src.meta(n).dtype == t.dtype and src.meta(n).shape == tuple(t.shape)


# ---- building a model from a checkpoint's tensors (api.model_from_tensors) ------------------------------------------
@pytest.mark.parametrize("tie", [False, True])
def test_model_from_tensors_reads_each_tensor_once_and_holds_no_second_copy(tmp_path, tie):
    """The teacher and student models of auto / healing are built tensor by tensor from the checkpoint: each tensor
    read once (the old loader read every tensor twice) and, on the CPU, the tensor read becomes the parameter (the
    old one held a whole state dict beside the model: 13.5 GB more host memory on a 7B model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import make_llama
    from deltapack.api import model_from_tensors

    make_llama(tmp_path, tie=tie)
    src = open_model(tmp_path)
    reads: dict[str, int] = {}
    given: dict[str, int] = {}

    def get(name):
        reads[name] = reads.get(name, 0) + 1
        t = src.get(name)
        given[name] = t.untyped_storage().data_ptr()
        return t

    config = AutoConfig.from_pretrained(tmp_path)
    model = model_from_tensors(config, src.keys(), get, device="cpu", dtype=torch.bfloat16)
    assert reads and set(reads.values()) == {1}
    params = dict(model.named_parameters())
    assert all(params[n].untyped_storage().data_ptr() == p for n, p in given.items() if n in params)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    x = torch.randint(0, 64, (2, 7))
    assert torch.equal(model(x).logits, ref(x).logits)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie


def test_model_from_tensors_refuses_a_checkpoint_that_does_not_fit_the_config(tmp_path):
    from transformers import AutoConfig

    from conftest import make_llama
    from deltapack.api import model_from_tensors
    from deltapack.errors import FormatError

    make_llama(tmp_path)
    src = open_model(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    wrong = {n: src.get(n) for n in src.keys()}
    wrong["model.norm.weight"] = torch.ones(7, dtype=torch.bfloat16)
    with pytest.raises(FormatError, match="model.norm.weight"):
        model_from_tensors(config, list(wrong), wrong.__getitem__, dtype=torch.bfloat16)
    missing = {n: t for n, t in wrong.items() if n != "model.norm.weight"}
    with pytest.raises(FormatError, match="missing"):
        model_from_tensors(config, list(missing), missing.__getitem__, dtype=torch.bfloat16)
