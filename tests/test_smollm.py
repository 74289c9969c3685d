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


def test_share_layerdrop_on_smollm_keeps_tied_embeddings_and_loads_in_transformers(tmp_path):
    """--method layerdrop on the real model: SmolLM2 ties its head to the embeddings; the plain checkpoint must keep
    that tie (stored once) and load in transformers with its fewer layers. Two healing steps: mechanics, not quality
    (quality is bench/results/share.json)."""
    from transformers import AutoModelForCausalLM

    from deltapack.io.embedded import embedded_model_dir

    base = embedded_model_dir()
    r = CliRunner().invoke(main, ["share", str(base), "-o", str(tmp_path / "o"), "--method", "layerdrop",
                                  "--reduction", "0.05", "--tokens", "256", "--batch-size", "2", "--seq-len", "64",
                                  "--self-chat", "0", "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "o" / "deltapack_layerdrop.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "o"))
    assert model.config.num_hidden_layers == 30 - len(info["dropped_blocks"]) == info["num_layers"]["kept"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    n = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    assert n == info["params"]["final"] and info["params"]["reduction"] >= 0.05
    on_disk = sum(t.numel() for t in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        tmp_path / "o" / "model.safetensors").values())
    assert on_disk == n  # the tied head is not stored twice
    assert info["training"]["steps"] == 2
