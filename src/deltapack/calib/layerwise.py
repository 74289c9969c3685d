"""Healing's student forward with the delta decoded one decoder layer at a time, and the memory it needs.

Why: healing used to decode every tensor's delta (fp32) for the whole model, merge them all into bf16 weights and run
one forward under autograd. On a Llama-2-7B shape that held, besides the 13.5 GB base model, 27 GB of fp32 decoded
deltas during the forward, 13.5 GB of merged weights saved for backward and every layer's activations (~10 GB for
4 x 512 tokens): past 78 GB on an 80 GB H100. Here each decoder layer runs inside a non-reentrant activation checkpoint
whose function decodes that layer's deltas from the trainable parts, merges them and calls the layer functionally.
Forward keeps only each layer's input; backward recomputes one layer at a time (decode included), so at most one
layer's decoded delta, merged weights and activations exist at once. The embedding, head and final norm (outside
the layers) are decoded at the top level, each merged as soon as it is decoded.

Cost: one more forward per training step (the recompute) and a second decode of each layer, in exchange for the
memory of one layer instead of all of them. Without gradients (the held-out KL) layers run directly, still one
layer's decode at a time.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

Decode = Callable[[str], torch.Tensor]  # tensor name -> its 2-D codec delta (under autograd when grad is enabled)


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(prefix "model.layers.3.", layer) for the ModuleList holding most of the model's parameters (the decoder
    layers of any HF causal LM); empty when the model has none."""
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_n = (name, mod), n
    if best is None:
        return []
    name, mods = best
    return [(f"{name}.{i}." if name else f"{i}.", m) for i, m in enumerate(mods)]


def split_by_layer(names, layers: list[tuple[str, nn.Module]]) -> tuple[list[str], list[dict[str, str]]]:
    """(names outside every layer, per layer {local parameter name: full name})."""
    per_layer: list[dict[str, str]] = [{} for _ in layers]
    top = []
    for n in names:
        for i, (prefix, _) in enumerate(layers):
            if n.startswith(prefix):
                per_layer[i][n[len(prefix):]] = n
                break
        else:
            top.append(n)
    return top, per_layer


class LayerwiseStudent:
    """Logits of `fit.student` with base + decode(name) for every name in `names` (a calib.teacher.TeacherFit's
    parameters), decoding one layer at a time (see the module docstring)."""

    def __init__(self, fit, names, decode: Decode):
        self.fit = fit
        self.decode = decode
        self.layers = decoder_layers(fit.student)
        self.top, self.per_layer = split_by_layer(names, self.layers)

    def merged(self, name: str) -> torch.Tensor:
        # the fp32 decoded delta lives only until it is merged (to(bf16) and + keep nothing of it for backward)
        return self.fit.weights({name: self.decode(name)})[name]

    @contextlib.contextmanager
    def _wrapped_layers(self) -> Iterator[None]:
        patched = []
        try:
            for (_, layer), local in zip(self.layers, self.per_layer):
                if local:
                    layer.forward = self._layer_forward(layer, local)  # instance attribute: shadows the class's
                    patched.append(layer)
            yield
        finally:
            for layer in patched:
                del layer.forward

    def _layer_forward(self, layer: nn.Module, local: dict[str, str]):
        orig = type(layer).forward.__get__(layer)
        state = {"inside": False}

        def run(*args, **kwargs):
            weights = {k: self.merged(n) for k, n in local.items()}
            state["inside"] = True  # functional_call calls layer(...) again: that call is the original forward
            try:
                return torch.func.functional_call(layer, weights, args, kwargs)
            finally:
                state["inside"] = False

        def forward(*args, **kwargs):
            if state["inside"]:
                return orig(*args, **kwargs)
            if torch.is_grad_enabled():
                return checkpoint(run, *args, use_reentrant=False, **kwargs)
            return run(*args, **kwargs)

        return forward

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        top = {n: self.merged(n) for n in self.top}
        with self._wrapped_layers():
            # use_cache=False: no KV cache kept across layers (and a checkpoint's recompute must not append to one)
            return torch.func.functional_call(self.fit.student, top, (ids,), {"use_cache": False}).logits

    def kl_sum(self, rows: torch.Tensor) -> torch.Tensor:
        """Summed KL(fine-tune ‖ student) over the tokens of calibration sequences `rows` (one forward); the
        per-token mean is this over rows.numel() x seq_len, as TeacherFit.kl."""
        fit = self.fit
        r = rows.to(fit.device)
        return fit.kl_sum_of_logits(self.logits(fit.ids[r]).float(), r)


# ---- memory ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HealMemory:
    """Bytes healing needs beyond the base model and the teacher's log-probs, for micro-batch sizing. Per sequence:
    the fp32 logits and what the KL keeps of them (logits, log-softmax, teacher log-probs in fp32, their gradients:
    ~6 copies of seq x vocab x 4 bytes), each layer's checkpointed input, and one layer's recomputed activations
    (~34 x hidden bytes a token in 16-bit plus the attention scores of an eager implementation). Fixed: the trainable
    state (θ, its gradient and Adam's two moments, fp32) and one layer's decoded delta in fp32 with its merged copy
    and gradients (~4 x the layer's parameters x 4 bytes)."""

    seq_len: int
    vocab: int
    hidden: int
    n_layers: int
    heads: int
    layer_params: int
    trainable: int
    act_bytes: int = 2  # 16-bit activations on GPU (fp32 on CPU: 4)

    def per_sequence(self) -> int:
        s, a = self.seq_len, self.act_bytes
        logits = 6 * s * self.vocab * 4
        inputs = self.n_layers * s * self.hidden * a
        layer = s * (34 * self.hidden * a // 2 + 5 * self.heads * s * a // 2)
        return logits + inputs + layer

    def fixed(self) -> int:
        return 20 * self.trainable + 16 * self.layer_params  # θ, grad, Adam's 2 moments, best-state copy


def micro_batch(budget_bytes: int | None, mem: HealMemory, batch: int) -> int:
    """Sequences per backward: `batch` when it fits `budget_bytes` (None: no bound), else as many as fit, at least
    one. Splitting a step's batch changes nothing but memory: the gradients of the summed KL are accumulated."""
    if budget_bytes is None:
        return batch
    room = budget_bytes - mem.fixed()
    return max(1, min(batch, math.floor(room / mem.per_sequence()) if room > 0 else 1))


def device_budget(device: torch.device, fraction: float = 0.85) -> int | None:
    """Bytes healing may still allocate on `device`: a fraction of what is free, counting memory the caching
    allocator holds but does not use. None on CPU (no bound is known; RSS is the user's)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int((free + cached) * fraction)
