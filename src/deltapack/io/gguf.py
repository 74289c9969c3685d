"""GGUF input: dequantize once through transformers and cache a safetensors copy.

GGUF files are quantized (the embedded SmolLM2 is Q4_1); deltapack works on dense tensors, so the first use writes a
bf16 safetensors checkpoint (with config and tokenizer) to the cache and every later use reads that copy lazily.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from deltapack.errors import InputError

log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("DELTAPACK_CACHE", Path.home() / ".cache" / "deltapack"))


def gguf_to_safetensors_dir(gguf_path: Path) -> Path:
    from deltapack.io.sources import _file_digest

    digest = _file_digest(gguf_path)[:16]
    out = cache_root() / "gguf" / f"{gguf_path.stem}-{digest}"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    log.info("dequantizing %s to a cached safetensors copy (once)", gguf_path.name)
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise InputError("reading GGUF needs transformers, gguf and accelerate installed") from e
    load_kwargs = {}
    try:  # ask for dequantized weights: some transformers 5.x releases otherwise keep GGUF weights packed
        from transformers import GgufConfig

        load_kwargs["quantization_config"] = GgufConfig(gguf_file=gguf_path.name, dequantize=True)
    except (ImportError, TypeError):  # older transformers: GGUF weights are always dequantized on load
        pass
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.bfloat16, **load_kwargs
        )
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:
        raise InputError(f"cannot load GGUF {gguf_path}: {e.__class__.__name__}: {e}") from e
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        # transformers marks GGUF-loaded models as quantized and refuses save_pretrained: write the (already
        # dequantized) state dict ourselves, dropping the tied lm_head that safetensors cannot alias
        sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        from safetensors.torch import save_file

        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(cfg, attr):
                delattr(cfg, attr)
        cfg.dtype = torch.bfloat16
        cfg.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
