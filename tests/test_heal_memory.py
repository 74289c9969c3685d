"""Healing's memory bound, checked deterministically: the delta is decoded one decoder layer at a time under autograd
(no other layer's decoded or merged weights alive while a layer is decoded, in training steps too), the layerwise
forward gives the whole-model KL and gradient, and the micro-batch is sized from a memory budget."""

from __future__ import annotations

import weakref

import pytest
import torch

import deltapack.calib.heal as heal_mod
from deltapack.calib.layerwise import HealMemory, LayerwiseStudent, micro_batch, split_by_layer
from deltapack.compress import compress
from deltapack.format.codecs import get_codec


def _run_with_heal(pico_pair, tmp_path, monkeypatch, inspect_fn, steps: int = 2):
    """compress(auto, heal) on the pico pair with `inspect_fn(encoded, ctx, cfg, fit)` run before heal proper."""
    orig = heal_mod.heal

    def wrapped(encoded, ctx, cfg, fit=None):
        inspect_fn(encoded, ctx, cfg, fit)
        return orig(encoded, ctx, cfg, fit=fit)

    monkeypatch.setattr(heal_mod, "heal", wrapped)
    base, ft = pico_pair
    return compress(str(base), str(ft), str(tmp_path / "h"), method="auto", ratio=1.4, progress=False,
                    heal={"steps": steps, "seed": 0})


def test_heal_decodes_one_layer_at_a_time(pico_pair, tmp_path, monkeypatch):
    live: list[tuple[int | None, str, weakref.ref]] = []  # (layer or None for top level, name, decoded/merged)
    calls: list[tuple[int | None, bool]] = []
    orig_merged = LayerwiseStudent.merged

    def layer_of(self, name):
        for i, local in enumerate(self.per_layer):
            if name in local.values():
                return i
        return None

    def merged(self, name):
        layer = layer_of(self, name)
        if layer is not None:
            others = [n for lay, n, ref in live if lay is not None and lay != layer and ref() is not None]
            assert not others, f"decoding {name} (layer {layer}) while other layers' deltas are alive: {others}"
        calls.append((layer, torch.is_grad_enabled()))
        decoded = []
        orig_decode = self.decode
        self.decode = lambda n: decoded.append(orig_decode(n)) or decoded[-1]
        try:
            out = orig_merged(self, name)
        finally:
            self.decode = orig_decode
        live.append((layer, name, weakref.ref(out)))
        live.append((layer, name, weakref.ref(decoded[0])))
        return out

    monkeypatch.setattr(LayerwiseStudent, "merged", merged)
    _run_with_heal(pico_pair, tmp_path, monkeypatch, lambda *a: None)
    layers_seen = {lay for lay, grad in calls if lay is not None and grad}
    assert layers_seen == {0, 1}, calls  # both pico layers decoded under autograd (training steps ran)
    # each layer is decoded again in backward (checkpoint recompute): twice as many grad-enabled decodes per layer
    # as there are forwards; at least two training steps -> at least 4 per tensor
    per_name = {}
    for lay, grad in calls:
        if lay is not None and grad:
            per_name[lay] = per_name.get(lay, 0) + 1
    assert all(v >= 4 for v in per_name.values()), per_name


def test_layerwise_kl_and_gradient_match_the_whole_model(pico_pair, tmp_path, monkeypatch):
    checked = {}

    def compare(encoded, ctx, cfg, fit):
        assert fit is not None  # auto's fit is reused
        names = [n for n in encoded if n in fit.params]
        leaves = {}  # every float part a leaf with a gradient
        for n in names:
            enc = encoded[n]
            leaves[n] = {k: (v.float().clone().requires_grad_(True) if v.is_floating_point() else v)
                         for k, v in enc.parts.items()}

        def decode(n):
            enc = encoded[n]
            return get_codec(enc.codec).decode(enc.params, leaves[n], fit.shape(n))

        rows = torch.arange(min(2, fit.n_seqs))
        whole = fit.kl(lambda: {n: decode(n) for n in names}, rows)
        g_whole = torch.autograd.grad(whole, [t for p in leaves.values() for t in p.values() if t.requires_grad])
        student = LayerwiseStudent(fit, names, decode)
        assert len(student.layers) == 2 and all(student.per_layer)
        lw = student.kl_sum(rows) / (rows.numel() * fit.ids.shape[1])
        g_lw = torch.autograd.grad(lw, [t for p in leaves.values() for t in p.values() if t.requires_grad])
        checked["kl"] = (float(whole.detach()), float(lw.detach()))
        torch.testing.assert_close(lw, whole, rtol=1e-5, atol=1e-7)
        for a, b in zip(g_lw, g_whole):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)
        # the layers' forwards are restored afterwards
        assert all("forward" not in vars(layer) for _, layer in student.layers)

    _run_with_heal(pico_pair, tmp_path, monkeypatch, compare, steps=1)
    assert checked["kl"][0] > 0


def test_split_by_layer_puts_embedding_head_and_norm_at_top():
    layers = [("model.layers.0.", None), ("model.layers.1.", None), ("model.layers.10.", None)]
    top, per = split_by_layer(["model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight",
                               "model.layers.10.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"], layers)
    assert top == ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    assert per == [{}, {"mlp.up_proj.weight": "model.layers.1.mlp.up_proj.weight"},
                   {"self_attn.q_proj.weight": "model.layers.10.self_attn.q_proj.weight"}]


LLAMA7B_HEAL = HealMemory(seq_len=512, vocab=32000, hidden=4096, n_layers=32, heads=32,
                          layer_params=202_383_360, trainable=50_000_000)


def test_micro_batch_is_sized_from_the_memory_budget():
    m = LLAMA7B_HEAL
    per, fixed = m.per_sequence(), m.fixed()
    # 7B shape, 512 tokens: ~0.6 GB a sequence with layer checkpointing (was the whole model's activations)
    assert 0.3e9 < per < 1.0e9 and fixed < 5e9
    assert micro_batch(None, m, 4) == 4  # no bound known (CPU): the configured batch
    assert micro_batch(60 << 30, m, 4) == 4  # an H100 after base model + teacher log-probs: the whole batch fits
    assert micro_batch(fixed + 2 * per + 1, m, 4) == 2
    assert micro_batch(fixed + per - 1, m, 4) == 1  # never below one sequence
    assert micro_batch(0, m, 4) == 1
    # a longer sequence or a larger vocabulary costs more per sequence, never less
    longer = HealMemory(**{**m.__dict__, "seq_len": 2048})
    assert longer.per_sequence() > 4 * per * 0.99
    assert micro_batch(fixed + 4 * per, longer, 4) < 4


def test_heal_records_micro_batch_and_layers(pico_pair, tmp_path, monkeypatch):
    import json
    from pathlib import Path

    out = _run_with_heal(pico_pair, tmp_path, monkeypatch, lambda *a: None)
    rec = json.loads((Path(out) / "delta_config.json").read_text())["calibration"]["heal"]
    assert rec["layers"] == 2 and 1 <= rec["micro_batch"] <= rec["batch"]
