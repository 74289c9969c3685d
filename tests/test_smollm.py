"""The embedded SmolLM2-135M-Instruct (real weights, GGUF -> cached safetensors): the ratio contract on a real model."""

import json

import pytest
import torch
from click.testing import CliRunner

from deltapack import api
from deltapack.cli import main

pytestmark = pytest.mark.smollm


@pytest.fixture(scope="module")
def smol_pair(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    from deltapack.io.embedded import embedded_model_dir

    base = embedded_model_dir()
    ft = tmp_path_factory.mktemp("smolft")
    sd = load_file(base / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for k, v in sd.items():  # a full-rank perturbation of every tensor, embeddings included
        sd[k] = (v.float() + 0.01 * v.float().std() * torch.randn(v.shape, generator=g)).to(v.dtype)
    save_file(sd, str(ft / "model.safetensors"), metadata={"format": "pt"})
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            (ft / f.name).write_bytes(f.read_bytes())
    return base, ft


def test_gguf_input_resolves_to_cached_checkpoint():
    from deltapack.io import open_model
    from deltapack.io.embedded import embedded_gguf

    src = open_model(embedded_gguf())
    assert src.model_id.startswith("gguf:") and "model.embed_tokens.weight" in src
    assert src.meta("model.embed_tokens.weight").shape == (49152, 576)


@pytest.mark.parametrize("method", ["lowrank", "bitdelta", "dare"])
def test_true_ratio_16x_smollm(smol_pair, tmp_path, method):
    base, ft = smol_pair
    d = api.compress(base, ft, tmp_path / "d", method=method, ratio=16, progress=False, device="cpu")
    on_disk = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    dense = 2 * sum(t.numel() for t in __import__("safetensors.torch", fromlist=["load_file"]).load_file(ft / "model.safetensors").values())
    assert dense / on_disk >= 15.5
    res = CliRunner().invoke(main, ["inspect", str(d), "--json"])
    assert json.loads(res.output)["true_ratio"] == pytest.approx(dense / on_disk, rel=1e-12)
    # tokenizer files equal the base's: referenced, not stored
    man = json.loads((d / "delta_config.json").read_text())
    assert man["aux"]["tokenizer.json"] == "base" and not (d / "hf" / "tokenizer.json").exists()
