"""Shared fixtures: pico random Llama pairs built in-process (no network, seconds on CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# every test generates its own self-calibration replies: none reads what an earlier run (or the user) left in
# ~/.cache/deltapack/calib; tests/test_self_calibration.py turns the cache on where it tests it
os.environ.setdefault("DELTAPACK_NO_CALIB_CACHE", "1")


def make_llama(path: Path, *, hidden=32, layers=2, vocab=64, inter=None, seed=0, tie=False, dtype=torch.bfloat16):
    """Save a random Llama checkpoint (config + safetensors). Returns the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    return model


def make_finetune(base_dir: Path, ft_dir: Path, *, scale=0.02, rank=None, seed=1, grow_vocab=0, skip=()):
    """A 'fine-tune' of base_dir: base + (low-rank-ish or dense) perturbation on every tensor but `skip`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in skip):
                continue
            if p.dim() == 2 and rank:
                m, k = p.shape
                d = torch.randn(m, rank) @ torch.randn(rank, k) / rank**0.5
            else:
                d = torch.randn_like(p, dtype=torch.float32)
            p.add_((scale * d * p.float().abs().mean()).to(p.dtype))
    if grow_vocab:
        model.resize_token_embeddings(model.config.vocab_size + grow_vocab)
    model.save_pretrained(ft_dir, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def pico_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pico")
    make_llama(d / "base")
    make_finetune(d / "base", d / "ft", skip=("layers.1.mlp.up_proj",))
    return d / "base", d / "ft"


@pytest.fixture(scope="session")
def small_pair(tmp_path_factory):
    """~8M parameters, hidden 512, 2 layers: the ratio tests' model (metadata must not swamp the budget)."""
    d = tmp_path_factory.mktemp("small")
    make_llama(d / "base", hidden=512, layers=2, vocab=2048, inter=1536)
    make_finetune(d / "base", d / "ft", scale=0.05, seed=3)
    return d / "base", d / "ft"


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Pico models: one intra-op thread is faster than two on a 2-core machine (no oversubscription)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ratio_before_entropy(delta_dir) -> tuple[float, float]:
    """(true ratio, the true ratio the same delta would have without the entropy stage): the planner meets --ratio
    after the stage (methods spend its saving on more stored bytes), so the second is the smaller."""
    from deltapack import api
    from deltapack.format.directory import DeltaDir

    info = api.inspect(delta_dir)
    d = DeltaDir.open(delta_dir)
    saved = 0
    for n, te in d.manifest.tensors.items():
        for k, t in d.parts(n).items():
            if k in te.entropy:
                saved += t.numel() * t.element_size() - sum(te.entropy[k]["frames"])
    return info["true_ratio"], info["dense_delta_bytes"] / (info["total_bytes"] + saved)
