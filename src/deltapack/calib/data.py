"""Calibration text.

`--calib FILE`: a .txt file (paragraphs separated by blank lines, or one long text) or a .jsonl file whose records
hold "text", or "prompt"+"answer"/"completion", or chat "messages".

Default, offline: the docstrings of Python's standard library modules, in a fixed order. Every Python install has
them, they mix English prose with code, and they are the same on every machine, so a default-calibrated delta is
reproducible. A fine-tune's own task data is better where the user has it: pass it with --calib.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from deltapack.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_MODULES = (
    "os", "json", "re", "collections", "itertools", "functools", "pathlib", "subprocess", "threading", "asyncio",
    "datetime", "decimal", "fractions", "statistics", "random", "math", "string", "textwrap", "difflib", "csv",
    "argparse", "logging", "unittest", "doctest", "typing", "dataclasses", "enum", "contextlib", "heapq", "bisect",
    "shutil", "tempfile", "glob", "fnmatch", "zipfile", "tarfile", "gzip", "hashlib", "hmac", "secrets", "base64",
    "urllib.parse", "http.client", "email.message", "html.parser", "xml.etree.ElementTree", "sqlite3", "pickle",
    "copy", "pprint", "inspect", "ast", "dis", "tokenize", "calendar", "locale", "gettext", "io", "socket", "select",
)


def default_calibration_texts(min_chars: int = 200) -> list[str]:
    import importlib
    import inspect

    out = []
    for name in DEFAULT_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        docs = [inspect.getdoc(mod) or ""]
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == mod.__name__:
                docs.append(f"{attr}: {inspect.getdoc(obj) or ''}")
        text = "\n\n".join(d for d in docs if d)
        if len(text) >= min_chars:
            out.append(text)
    return out


def _record_text(rec) -> str | None:
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict):
        return None
    if "text" in rec:
        return str(rec["text"])
    if "messages" in rec and isinstance(rec["messages"], list):
        return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in rec["messages"] if isinstance(m, dict))
    if "prompt" in rec:
        return str(rec["prompt"]) + " " + str(rec.get("answer", rec.get("completion", "")))
    return None


def load_calibration_texts(path: str | Path | None) -> list[str]:
    if path is None:
        return default_calibration_texts()
    p = Path(path)
    if not p.is_file():
        raise InputError(f"calibration file not found: {p}")
    raw = p.read_text(errors="replace")
    if p.suffix in (".jsonl", ".json"):
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                t = _record_text(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{p}:{i}: not valid JSON ({e.msg})") from e
            if t is None:
                raise InputError(f"{p}:{i}: record has no text/prompt/messages field")
            texts.append(t)
    else:
        texts = [t for t in raw.split("\n\n") if t.strip()] or [raw]
    if not texts:
        raise InputError(f"calibration file {p} holds no text")
    return texts


def token_batches(tokenizer, texts: list[str], seq_len: int, n_seqs: int, seed: int = 0):
    """Concatenate texts, cut into `n_seqs` windows of `seq_len` tokens (fewer if the text runs out). LongTensor."""
    import torch

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= seq_len * n_seqs:
            break
    n = min(n_seqs, len(ids) // seq_len)
    if n == 0:
        raise InputError(f"calibration text has {len(ids)} tokens, fewer than one {seq_len}-token sequence")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)
