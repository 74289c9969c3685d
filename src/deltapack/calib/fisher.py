"""Kronecker-factored Fisher statistics of a causal LM: for every linear layer, the input second moment
H = E[x xᵀ] and the output-gradient second moment G = E[g gᵀ], g = ∂(−log p(ŷ))/∂y with ŷ sampled from the model's
own next-token distribution (the true Fisher, not the empirical one: no labels are needed, so any text works as
calibration, and the statistics describe the model, not the text's continuations).

Why: a weight error E of one layer changes the expected loss by about ½·vec(E)ᵀ F vec(E), and with the K-FAC
approximation F ≈ G ⊗ H that is ½·tr(G E H Eᵀ). The plain output error tr(E H Eᵀ) weighs every output direction
alike; G says which output directions the rest of the network is sensitive to. A random-mask error (DARE) spreads
over all directions, a truncated-SVD error concentrates on the delta's own ones: only G tells them apart.

Large outputs (the LM head over a 49k vocabulary, MLP up-projections of 7B models) keep the diagonal of G only
(`full_out_max`). An embedding's lookup is a linear map of a one-hot input: its H is the diagonal of token counts,
its G the second moment of the gradient at the embedding output (the residual stream). A tied embedding gets both
roles' statistics.

The whole model runs in memory with autograd on activations only (weights frozen): for the models deltapack's
benchmarks use, and up to ~7B on an 80 GB GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@dataclass
class KFac:
    """Sums over `n_tokens` positions: H (in x in), G (out x out, or out when diagonal)."""

    H: torch.Tensor | None
    G: torch.Tensor
    n_tokens: int = 0
    # embedding role: counts of each token id (a diagonal H); None for linear layers
    token_counts: torch.Tensor | None = None

    @property
    def g_diagonal(self) -> bool:
        return self.G.dim() == 1

    def loss_increase(self, E: torch.Tensor) -> float:
        """½·tr(G E H Eᵀ) / n_tokens for a linear layer's weight error E (out x in): the K-FAC estimate of the mean
        loss increase per token (nats)."""
        E = E.to(self.G.device, torch.float32)
        if self.token_counts is not None:  # embedding: rows looked up with their counts, G on the hidden side
            EG = E @ self.G if not self.g_diagonal else E * self.G
            val = (self.token_counts.to(E.device).float()[:, None] * EG * E).sum()
        else:
            EH = E @ self.H.to(E.device)
            if self.g_diagonal:
                val = (self.G[:, None] * EH * E).sum()
            else:
                val = ((self.G @ E) * EH).sum()
        # G and H (or the counts) are both sums over the same tokens: the per-token means are /n each
        return 0.5 * float(val) / max(1, self.n_tokens) ** 2


def _sample_targets(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logits.detach().float(), -1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def collect_kfac(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    batch_seqs: int = 8,
    full_out_max: int = 4096,
    seed: int = 0,
    progress: bool = False,
    names: set[str] | None = None,
) -> dict[str, KFac]:
    """K-FAC statistics of every nn.Linear (keyed by its weight's state-dict name) and of the input embedding, on
    `input_ids` (n x L). `names`: restrict to these weight names. Statistics are fp32 on the model's device."""
    dev = next(model.parameters()).device
    mods = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    emb = model.get_input_embeddings()
    emb_name = next(f"{n}.weight" for n, m in model.named_modules() if m is emb)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    if names is not None:
        mods = {n: m for n, m in mods.items() if n in names or (tied and m is head and emb_name in names)}
    stats: dict[str, KFac] = {}
    handles = []
    was_training = model.training
    model.eval()
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)

    def linear_hooks(key: str, mod: torch.nn.Linear):
        out_dim, in_dim = mod.out_features, mod.in_features
        diag = out_dim > full_out_max
        g_shape = (out_dim,) if diag else (out_dim, out_dim)
        st = stats[key] = KFac(torch.zeros(in_dim, in_dim, device=dev), torch.zeros(g_shape, device=dev))

        def fwd(m, inputs, output):
            x = inputs[0].detach().reshape(-1, in_dim).float()
            st.H.addmm_(x.T, x)
            st.n_tokens += x.shape[0]

            def grad_hook(g):
                g2 = g.detach().reshape(-1, out_dim).float()
                if diag:
                    st.G.add_((g2 * g2).sum(0))
                else:
                    st.G.addmm_(g2.T, g2)

            if output.requires_grad:
                output.register_hook(grad_hook)

        return mod.register_forward_hook(fwd)

    for key, mod in mods.items():
        # a tied head's statistics are the head role of the embedding tensor
        handles.append(linear_hooks(key if not (tied and mod is head) else emb_name + "::head", mod))

    emb_stat = None
    if names is None or emb_name in names:
        d = emb.weight.shape[1]
        emb_stat = stats[emb_name] = KFac(None, torch.zeros(d, d, device=dev),
                                          token_counts=torch.zeros(emb.weight.shape[0], device=dev))

    gen = torch.Generator(device=dev).manual_seed(seed)
    try:
        for s in tqdm(range(0, input_ids.shape[0], batch_seqs), desc="fisher", disable=not progress, leave=False):
            ids = input_ids[s : s + batch_seqs].to(dev)
            with torch.no_grad():
                emb_out = emb(ids)
            # the graph starts at the embedding output (weights are frozen): its gradient is the embedding's G, and
            # the hooks above see every linear's output gradient on the way
            emb_out.requires_grad_(True)
            with torch.enable_grad():
                logits = model(inputs_embeds=emb_out).logits
                targets = _sample_targets(logits, gen)
                loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                         targets.reshape(-1), reduction="sum")
                (grad,) = torch.autograd.grad(loss, emb_out)
            if emb_stat is not None:
                flat = ids.reshape(-1)
                emb_stat.token_counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
                emb_stat.n_tokens += flat.numel()
                g2 = grad.reshape(-1, grad.shape[-1]).float()
                emb_stat.G.addmm_(g2.T, g2)
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.train(was_training)
    return stats


def tensor_loss_increase(stats: dict[str, KFac], name: str, E: torch.Tensor) -> float:
    """K-FAC loss increase of a weight error E on tensor `name`, summing the head role of a tied embedding."""
    total = 0.0
    if name in stats:
        total += stats[name].loss_increase(E)
    if name + "::head" in stats:
        total += stats[name + "::head"].loss_increase(E)
    return total


def load_source_model(source, device: torch.device, dtype: torch.dtype | None = None):
    """An HF causal LM built in memory from a ModelSource (its config.json and tensors), no random init."""
    from transformers import AutoConfig

    from deltapack.api import model_from_tensors
    from deltapack.calib.activations import CalibrationError

    cfg_path = getattr(source, "path", None)
    if cfg_path is None or not (cfg_path / "config.json").is_file():
        raise CalibrationError(f"{source.ref} has no config.json: cannot build the model to calibrate on")
    config = AutoConfig.from_pretrained(str(cfg_path))
    if dtype is None:  # bf16 on GPU (the model's own dtype in practice); fp32 on CPU, where bf16 matmuls are slow
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:  # tensor by tensor: no second copy of the model in host memory
        return model_from_tensors(config, source.keys(), source.get, device=device, dtype=dtype)
    except Exception as e:  # an architecture transformers cannot build from the config
        raise CalibrationError(f"cannot build {source.ref} for calibration: {e}") from e


def kfac_for_source(ctx, *, n_seqs: int, seq_len: int, source: str = "self", self_prompts: int = 64,
                    self_tokens: int = 160, seed: int = 0, names: set[str] | None = None) -> tuple[dict[str, KFac], dict]:
    """K-FAC statistics of the fine-tune in `ctx` (a CompressContext) and the calibration record for the manifest.

    source "self": the fine-tune's own replies to deltapack.calib.data.GENERIC_PROMPTS (falls back to "text" when the
    tokenizer has no chat template); "text": ctx's calibration text (--calib, or the default corpus); "random": token
    ids drawn uniformly."""
    from transformers import AutoTokenizer

    from deltapack.calib.activations import CalibrationError, calibration_tokens, has_tokenizer
    from deltapack.calib.data import cached_self_calibration_texts, token_batches

    src = ctx.finetuned
    max_pos = src.config().get("max_position_embeddings")
    if max_pos:
        seq_len = min(seq_len, int(max_pos))
    model = load_source_model(src, ctx.device)
    try:
        if source == "self":
            if not has_tokenizer(src):
                raise CalibrationError(f"{src.ref} has no tokenizer: cannot self-calibrate")
            tok = AutoTokenizer.from_pretrained(str(src.path))
            if getattr(tok, "chat_template", None):
                texts = cached_self_calibration_texts(src, model, tok, n_tokens=n_seqs * seq_len,
                                                      n_prompts=self_prompts, max_new_tokens=self_tokens, seed=seed)
                ids = token_batches(tok, texts, seq_len, n_seqs)
                record = {"source": "self:generic-prompts", "n_seqs": int(ids.shape[0]), "seq_len": seq_len,
                          "tokens": int(ids.numel()), "replies": len(texts), "seed": seed}
            else:
                log.warning("%s has no chat template: calibrating on text instead of its own replies", src.ref)
                source = "text"
        if source != "self":
            ids, record = calibration_tokens(ctx, n_seqs, seq_len, source)
        stats = collect_kfac(model, ids, batch_seqs=max(1, (8192 if ctx.device.type == "cuda" else 2048) // seq_len),
                             seed=seed, progress=ctx.progress, names=names)
    finally:
        del model
    return stats, record
