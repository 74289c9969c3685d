"""Training text that exists on every machine with Python, and its train / held-out split.

Default source (offline, identical wherever the same Python version runs): the documentation that ships with
CPython itself, read without importing anything:
  * `pydoc_data.topics`: the language reference topics `help()` shows (~0.5 M characters of English prose);
  * the docstrings of every standard-library source file (module, class and function docstrings, parsed with
    `ast`; test suites, idlelib, tkinter and turtledemo skipped): ~1.5 M characters of English mixed with code.
Together ≈ 0.5 M SmolLM2 tokens: a few epochs of a typical distillation budget, which is fine for matching a
teacher's logits. `--data FILE` (.txt paragraphs or .jsonl records, the same formats as `--calib`) overrides it.

Split: a document is held out (evaluation only, never trained on) when sha256 of its id falls in the first
`heldout_per_mille`/1000 of the hash space, so the split is stable and independent of the document order.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import random
import sysconfig
from pathlib import Path

import torch

from deltapack.calib.data import load_calibration_texts, token_batches
from deltapack.errors import InputError

log = logging.getLogger(__name__)

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "__pycache__"}


def stdlib_docs() -> list[tuple[str, str]]:
    """[(doc id, text)]: pydoc topics, then one document per stdlib source file (sorted, deterministic)."""
    docs: list[tuple[str, str]] = []
    try:
        from pydoc_data.topics import topics

        docs += [(f"pydoc:{k}", v) for k, v in sorted(topics.items()) if len(v) >= 200]
    except ImportError:  # stripped Python builds may lack it
        log.warning("pydoc_data is not installed; using stdlib docstrings only")
    root = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    parts.append(doc if isinstance(node, ast.Module) else f"{node.name}: {doc}")
        text = "\n\n".join(parts)
        if len(text) >= 200:
            docs.append((f"stdlib:{rel.as_posix()}", text))
    if not docs:
        raise InputError("found no standard-library documentation to train on; pass --data FILE")
    return docs


def load_docs(data: str | Path | None) -> list[tuple[str, str]]:
    if data is None:
        return stdlib_docs()
    return [(f"data:{i}", t) for i, t in enumerate(load_calibration_texts(data))]


def split_docs(docs: list[tuple[str, str]], heldout_per_mille: int = 50) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts). Falls back to the last document held out if the hash selects none."""
    train, held = [], []
    for doc_id, text in docs:
        h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:4], "big") % 1000
        (held if h < heldout_per_mille else train).append(text)
    if not held and len(train) > 1:
        held.append(train.pop())
    if not train:
        raise InputError("not enough training text: every document was held out")
    return train, held


def windows(tokenizer, texts: list[str], seq_len: int, max_windows: int, seed: int = 0) -> torch.Tensor:
    """LongTensor [N, seq_len] of consecutive token windows, documents in a seeded shuffled order (so a capped
    number of windows still samples the whole corpus)."""
    order = list(texts)
    random.Random(seed).shuffle(order)
    return token_batches(tokenizer, order, seq_len, max_windows)
