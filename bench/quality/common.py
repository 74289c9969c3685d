"""Shared helpers of the quality benchmark scripts: the base model, the smoke (pico) base, devices, JSON parts."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("bench.quality")

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def command_line() -> str:
    return " ".join(["python", *[a if " " not in a else repr(a) for a in sys.argv]])


def write_json(path: Path, obj) -> None:
    from deltapack.io.writer import write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, obj)


def embedded_base_dir() -> Path:
    """Dequantized SmolLM2-135M-Instruct (safetensors dir). Uses deltapack.io.embedded; where this transformers keeps
    GGUF weights packed (5.2x: 'not serializable'), dequantizes explicitly into the same cache path instead."""
    from deltapack.errors import DeltapackError
    from deltapack.io.embedded import embedded_gguf, embedded_model_dir

    try:
        return embedded_model_dir()
    except (DeltapackError, ValueError) as e:
        if "serializ" not in str(e):
            raise
        log.warning("core GGUF conversion failed (%s); dequantizing explicitly", str(e)[:120])
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from deltapack.io.gguf import cache_root
    from deltapack.io.sources import _file_digest

    g = embedded_gguf()
    out = cache_root() / "gguf" / f"{g.stem}-{_file_digest(g)[:16]}"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    model = AutoModelForCausalLM.from_pretrained(
        str(g.parent), gguf_file=g.name, dtype=torch.bfloat16, quantization_config=GgufConfig(gguf_file=g.name, dequantize=True)
    )
    tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def smoke_base_dir(workdir: Path, hidden: int = 64, layers: int = 2) -> Path:
    """A pico random Llama with SmolLM2's tokenizer and chat template (vocab 49152, tied embeddings): the real code
    path at a size a busy CPU runs in seconds."""
    out = workdir / f"pico-smollm-h{hidden}-l{layers}"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = embedded_base_dir()
    tok = AutoTokenizer.from_pretrained(str(src))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=workdir))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
