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
    """Dequantized SmolLM2-135M-Instruct (safetensors dir, cached by deltapack.io.embedded)."""
    from deltapack.io.embedded import embedded_model_dir

    return embedded_model_dir()


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


def items_to_hex(per_item: list[bool]) -> str:
    """Right/wrong per test item as hex (item i = bit i mod 4 of hex digit i // 4): 1024 items in 256 characters."""
    digits = []
    for i in range(0, len(per_item), 4):
        v = sum(1 << j for j, ok in enumerate(per_item[i:i + 4]) if ok)
        digits.append("0123456789abcdef"[v])
    return "".join(digits)


def hex_to_items(text: str, n: int) -> list[bool]:
    return [bool(int(text[i // 4], 16) >> (i % 4) & 1) for i in range(n)]
