"""Layer-by-layer calibration statistics: the input Hessian H = Σ x xᵀ of every nn.Linear of a decoder model.

Only one decoder block is in memory at a time, so a model larger than the GPU can be calibrated:
  1. build the model skeleton on the meta device (no weights), embed the calibration tokens with the real
     embedding matrix and keep the hidden states of the whole batch on the compute device;
  2. for each block: load that block's weights, run the hidden states through it in mini-batches with a pre-hook on
     each nn.Linear accumulating xᵀx, keep the block's outputs as the next block's inputs, drop the block;
  3. after the last block: the final norm's output is lm_head's input (collected when lm_head is its own tensor).

Which weights: the FINE-TUNED checkpoint's, for every block (base + the full, uncompressed delta). Delta-CoMe
calibrates on the fine-tuned model's activations: the compressed delta must reproduce Δ·x for the inputs x the
fine-tuned model actually sees. (A GPTQ-style sequential variant would feed each block the outputs of the already
compressed previous blocks; that needs compression interleaved with calibration, which the compress driver's
plan-then-encode order does not allow.)

Linears that read the same tensor (q/k/v, gate/up) share one Hessian object: the result maps every weight name to
its `Hessian`, aliases included, without duplicating memory. Supports HF Llama-family layouts
(`model.model.layers[i]`, `embed_tokens`, `rotary_emb`, `norm`): Llama, Mistral, Qwen2, SmolLM and the like.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from deltapack.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_CORPUS = "default:stdlib-docstrings"


class CalibrationError(InputError):
    """Calibration cannot run for this model (no tokenizer, unsupported architecture, no text)."""


class UnsupportedArchitecture(CalibrationError):
    """The model is not a Llama-family decoder this collector knows how to walk block by block."""


@dataclass
class Hessian:
    """Σ x xᵀ over `n_tokens` input rows (fp32, on `H.device`)."""

    H: torch.Tensor
    n_tokens: int = 0

    def mean(self) -> torch.Tensor:
        """H / n_tokens: scale-free, so damping and numerics do not depend on how much text was used."""
        return self.H / max(1, self.n_tokens)


# ---- calibration tokens ---------------------------------------------------------------------------------------------
def has_tokenizer(source) -> bool:
    files = source.aux_files()
    return any(n in files for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json"))


def calibration_tokens(ctx, n_seqs: int, seq_len: int, source: str = "text", seed: int = 0):
    """(input_ids (n x seq_len) LongTensor, record dict for the manifest).

    source="text": ctx.calibration_texts() (the --calib file or the stdlib-docstring default) through the
    fine-tune's tokenizer; a model without one raises CalibrationError. source="random": uniformly random token ids
    (tests and tokenizer-less pico models; recorded as such)."""
    if source == "random":
        vocab = int(ctx.finetuned.config().get("vocab_size") or 0)
        if vocab <= 0:
            raise CalibrationError("random calibration tokens need vocab_size in the fine-tune's config.json")
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (n_seqs, seq_len), generator=g)
        rec_source = "random-token-ids"
    elif source == "text":
        if not has_tokenizer(ctx.finetuned):
            raise CalibrationError(
                f"{ctx.finetuned.ref} has no tokenizer files: cannot tokenize calibration text "
                "(add the tokenizer next to the weights, or compress without calibration: quantizer=rtn)"
            )
        from transformers import AutoTokenizer

        from deltapack.calib.data import token_batches

        try:
            tok = AutoTokenizer.from_pretrained(str(ctx.finetuned.path))
        except Exception as e:  # transformers raises many types for broken tokenizer files
            raise CalibrationError(
                f"cannot load the tokenizer of {ctx.finetuned.ref}: {e.__class__.__name__}: {e}"
            ) from e
        ids = token_batches(tok, ctx.calibration_texts(), seq_len, n_seqs, seed=seed)
        rec_source = str(ctx.calib_path) if ctx.calib_path else DEFAULT_CORPUS
    else:
        raise CalibrationError(f"unknown calibration source {source!r} (text|random)")
    record = {
        "source": rec_source, "n_seqs": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "tokens": int(ids.numel())
    }
    if ids.shape[0] < n_seqs:
        log.info("calibration text gave %d of the %d sequences asked for", ids.shape[0], n_seqs)
    return ids, record


# ---- the block walker -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _tf32(device: torch.device):
    """TF32 for the xᵀx accumulations only: 8x faster on Hopper, and GPTQ damps H by 1% anyway."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _module_names(root: torch.nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in root.named_modules()}


def _skeleton(source):
    """The fine-tune's causal LM on the meta device (no memory), with SDPA attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(source.path))
    except Exception as e:
        raise UnsupportedArchitecture(f"cannot read the model config of {source.ref}: {e}") from e
    try:
        config._attn_implementation = "sdpa"
    except Exception:  # pragma: no cover - configs that refuse the attribute keep their default
        pass
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:
        raise UnsupportedArchitecture(f"cannot build {config.model_type!r} for calibration: {e}") from e
    if "gemma" in str(getattr(config, "model_type", "")):  # scales embeddings inside forward(): not walked here
        raise UnsupportedArchitecture(f"layer-by-layer calibration does not support {config.model_type!r} yet")
    inner = getattr(model, "model", None)
    needed = ("layers", "embed_tokens", "rotary_emb", "norm")
    if inner is None or not all(hasattr(inner, a) for a in needed):
        raise UnsupportedArchitecture(
            "layer-by-layer calibration supports Llama-family models (model.model.layers); "
            f"{config.model_type!r} is not one"
        )
    return config, model, inner


def _read_module(module: torch.nn.Module, prefix: str, source) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors for `module` (meta) under `prefix`, as read (CPU)."""
    sd = {}
    for local, t in module.state_dict(keep_vars=True).items():
        key = f"{prefix}.{local}"
        if key not in source:
            if isinstance(t, torch.nn.Parameter):
                raise UnsupportedArchitecture(f"checkpoint has no tensor {key} needed for calibration")
            continue  # non-persistent buffers are rebuilt by the module itself
        sd[local] = source.get(key)
    return sd


def _assign_module(module: torch.nn.Module, sd: dict[str, torch.Tensor], device, dtype) -> None:
    """Materialise `module` (meta) with tensors from `_read_module`."""
    out = {}
    for local, v in sd.items():
        v = v.to(device)
        out[local] = v.to(dtype) if v.is_floating_point() else v
    module.load_state_dict(out, strict=False, assign=True)


def _load_module(module: torch.nn.Module, prefix: str, source, device, dtype) -> None:
    """Materialise `module` (meta) with the checkpoint's tensors under `prefix`."""
    _assign_module(module, _read_module(module, prefix, source), device, dtype)


DEVICE_HESSIAN_SHARE = 0.4  # of the free device memory that calibration Hessians may keep (in-process runs only)


def hessian_device_budget(ctx) -> int:
    """Bytes of Hessians `collect_hessians` may leave on the compute device. Only when this process also encodes
    (compress, not a compress-many driver that pickles them to workers) and on CUDA: there they save a copy out and
    back in per matrix, and, for a 7B model's ~22 GB of Hessians, the host RAM."""
    if not (getattr(ctx, "in_process", False) and ctx.device.type == "cuda"):
        return 0
    return int(DEVICE_HESSIAN_SHARE * torch.cuda.mem_get_info(ctx.device)[0])


def collect_hessians(
    source,
    input_ids: torch.Tensor,
    device: torch.device | str,
    *,
    batch_seqs: int | None = None,
    dtype: torch.dtype | None = None,
    store_device: torch.device | str = "cpu",
    include_head: bool = True,
    progress: bool = True,
    device_budget: int = 0,
) -> dict[str, Hessian]:
    """Input Hessians of every nn.Linear of `source` (a ModelSource) on `input_ids`, one block in memory at a time.
    Returns {weight name: Hessian}; linears reading the same input share one object. Hessians stay on the compute
    device while their total fits in `device_budget` bytes (saves the copies out and back in when the caller
    encodes on that device in this process); the rest go to `store_device`. The next block's weights are read
    from disk in a background thread while the current block runs."""
    device = torch.device(device)
    if dtype is None:  # bf16 blocks on GPU; fp32 on CPU, where bf16 matmuls are slow and gain nothing
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config, model, inner = _skeleton(source)
    names = _module_names(model)
    layers_prefix = names[id(inner.layers)]
    n_seqs, seq_len = input_ids.shape
    if batch_seqs is None:
        batch_seqs = max(1, 16384 // seq_len) if device.type == "cuda" else max(1, 4096 // seq_len)

    emb_key = names[id(inner.embed_tokens)] + ".weight"
    if emb_key not in source:
        raise UnsupportedArchitecture(f"checkpoint has no embedding tensor {emb_key}")
    emb = source.get(emb_key).to(device)
    hidden = torch.nn.functional.embedding(input_ids.to(device), emb).to(dtype)  # (n, L, d)
    del emb
    rotary = type(inner.rotary_emb)(config=config).to(device)  # rebuilt off meta: its buffers are computed, not stored
    position_ids = torch.arange(seq_len, device=device).unsqueeze(0)

    out: dict[str, Hessian] = {}
    left = [max(0, int(device_budget))]

    def place(acc: torch.Tensor) -> torch.Tensor:
        size = acc.numel() * acc.element_size()
        if size <= left[0]:
            left[0] -= size
            return acc
        return acc.to(store_device)

    n_layers = len(inner.layers)
    with torch.no_grad(), _tf32(device), concurrent.futures.ThreadPoolExecutor(1) as reader:
        pos_emb = rotary(hidden[:1], position_ids)
        masks = _masks(config, hidden[:batch_seqs], position_ids)
        nxt = reader.submit(_read_module, inner.layers[0], f"{layers_prefix}.0", source) if n_layers else None
        for i in tqdm(range(n_layers), desc="calibrate", disable=not progress, leave=False):
            layer = inner.layers[i]
            prefix = f"{layers_prefix}.{i}"
            sd = nxt.result()
            nxt = reader.submit(_read_module, inner.layers[i + 1], f"{layers_prefix}.{i + 1}", source) if i + 1 < n_layers else None
            _assign_module(layer, sd, device, dtype)
            del sd
            mask = masks.get(getattr(layer, "attention_type", "full_attention"), masks["full_attention"])

            def forward(h, layer=layer, mask=mask):
                r = layer(h, attention_mask=_fit_mask(mask, h), position_ids=position_ids, position_embeddings=pos_emb)
                return r[0] if isinstance(r, tuple) else r  # older transformers return (hidden, ...)

            hess = _run_hooked(layer, prefix, hidden, batch_seqs, device, place, forward)
            out.update(hess)
            layer.to("meta")  # frees the block
        head = model.get_output_embeddings()
        head_key = names.get(id(head), "lm_head") + ".weight" if head is not None else None
        tied = head is not None and head.weight is inner.embed_tokens.weight
        if include_head and head_key and head_key in source and not tied and head_key != emb_key:
            _load_module(inner.norm, names[id(inner.norm)], source, device, dtype)
            acc = torch.zeros(hidden.shape[-1], hidden.shape[-1], device=device)
            for b0 in range(0, n_seqs, batch_seqs):
                x = inner.norm(hidden[b0 : b0 + batch_seqs]).reshape(-1, hidden.shape[-1]).float()
                acc.addmm_(x.T, x)
            out[head_key] = Hessian(place(acc), n_seqs * seq_len)
    return out


def _masks(config, sample: torch.Tensor, position_ids: torch.Tensor) -> dict[str, object]:
    """Attention masks as the model would build them (None under SDPA: causal flag)."""
    import inspect

    from transformers.masking_utils import create_causal_mask

    # transformers renamed `past_key_values` to `cache` (5.25; the old name warns and goes in 5.40): pass whichever
    # this version takes
    no_cache = {("cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"): None}
    masks = {"full_attention": create_causal_mask(config=config, inputs_embeds=sample, attention_mask=None,
                                                  position_ids=position_ids, **no_cache)}
    if getattr(config, "sliding_window", None):
        try:
            from transformers.masking_utils import create_sliding_window_causal_mask

            masks["sliding_attention"] = create_sliding_window_causal_mask(
                config=config, inputs_embeds=sample, attention_mask=None, position_ids=position_ids, **no_cache
            )
        except Exception:  # pragma: no cover - configs without sliding attention support
            pass
    return masks


def _fit_mask(mask, h: torch.Tensor):
    """A dense mask built for the first mini-batch, cut to a shorter last one."""
    if isinstance(mask, torch.Tensor) and mask.shape[0] not in (1, h.shape[0]):
        return mask[: h.shape[0]]
    return mask


def _run_hooked(layer, prefix, hidden, batch_seqs, device, place, forward) -> dict[str, Hessian]:
    """Run all of `hidden` through `forward` in place (outputs replace inputs) while accumulating xᵀx per distinct
    nn.Linear input. `place(acc)` puts a finished accumulator where it is kept."""
    acc: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}  # linear name -> name whose Hessian it shares
    # input identity -> (first linear that read it, the input itself). Holding the tensor keeps its memory from being
    # reused by a later input of the same shape in the same forward, which would alias two different inputs.
    seen: dict[tuple, tuple[str, torch.Tensor]] = {}
    tokens = 0

    def hook(name):
        def fn(module, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            if key in seen:
                alias[name] = seen[key][0]
                return
            seen[key] = (name, x)
            x2 = x.reshape(-1, x.shape[-1]).float()
            if name not in acc:
                acc[name] = torch.zeros(x2.shape[1], x2.shape[1], device=device)
            acc[name].addmm_(x2.T, x2)

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        for b0 in range(0, hidden.shape[0], batch_seqs):
            seen.clear()
            h = hidden[b0 : b0 + batch_seqs]
            hidden[b0 : b0 + batch_seqs] = forward(h)
            tokens += h.shape[0] * h.shape[1]
    finally:
        for hd in handles:
            hd.remove()
    stored = {n: Hessian(place(a), tokens) for n, a in acc.items()}
    out = {f"{prefix}.{n}.weight": stored[n] for n in stored}
    for n, target in alias.items():
        out[f"{prefix}.{n}.weight"] = stored[target]
    return out
