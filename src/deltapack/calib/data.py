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


# ---- self-calibration: the fine-tune's own replies ----------------------------------------------------------------
# Generic chat prompts of many kinds (explanation, code, maths, writing, facts, advice). The fine-tune answers them in
# its own way (a fine-tune for a narrow task often answers in that task's format whatever is asked), which makes its
# replies calibration text in the fine-tune's own distribution without any user data. Fixed, so a self-calibrated
# delta is reproducible from the seed.
GENERIC_PROMPTS = (
    "Explain what a hash table is.", "Write a short poem about the sea.", "What is the capital of Japan?",
    "Give me three tips for better sleep.", "Summarize the plot of a detective story in two sentences.",
    "How do I sort a list in Python?", "Translate 'good morning' into French.", "What causes rain?",
    "Write an email declining a meeting.", "List five fruits that are red.", "What is 17 times 23?",
    "Describe a cat to someone who has never seen one.", "Why is the sky blue?", "Tell me a joke about computers.",
    "What is the difference between weather and climate?", "Write a haiku about autumn.",
    "How many legs does a spider have?", "Convert 5 kilometres to miles.", "Give a recipe for pancakes.",
    "What does a CPU do?", "Name three planets.", "Write one sentence about friendship.",
    "Explain recursion simply.", "What is photosynthesis?", "Suggest a name for a bakery.",
    "What year did the first person walk on the moon?", "How do vaccines work?", "Write a limerick about a dog.",
    "Explain the rules of chess briefly.", "What is JSON?", "Give an example of a metaphor.",
    "How can I learn a new language faster?", "Write a Python function that reverses a string.",
    "If I have 12 apples and give away 5, how many are left?", "What is the boiling point of water in Fahrenheit?",
    "Classify this review as positive or negative: 'The battery died after a day.'",
    "Extract the date from: 'The meeting moved to March 3, 2024 at noon.'", "What does HTTP stand for?",
    "Write a two-line dialogue between a teacher and a student.", "What is the square root of 144?",
    "Give three synonyms for 'happy'.", "Explain what an API is to a child.", "What is a prime number?",
    "Describe your ideal weekend in three sentences.", "What are the primary colours?",
    "Write a SQL query that counts rows in a table called users.", "How does a refrigerator keep food cold?",
    "Turn this into a list: eggs, milk and bread.", "What is the past tense of 'run'?",
    "Give a one-sentence definition of machine learning.", "Which is heavier, a kilo of feathers or a kilo of iron?",
    "Write a tweet announcing a new coffee shop.", "What is the largest ocean on Earth?",
    "How do I make a cup of tea?", "Sort these numbers: 9, 2, 7, 4.", "What is the plural of 'mouse'?",
    "Explain inflation in simple terms.", "Write a short story opening about a lighthouse.",
    "What does the print function do in Python?", "Name two famous painters.", "What is 15% of 80?",
    "Give me a packing list for a beach trip.", "What language is spoken in Brazil?",
    "Summarize: 'The committee met on Tuesday and approved the new budget after a long debate.'",
)


def self_calibration_texts(model, tok, *, n_tokens: int, n_prompts: int = 64, max_new_tokens: int = 160,
                           seed: int = 0, batch: int | None = None, max_rounds: int = 8) -> list[str]:
    """Chat-formatted (prompt, reply) texts whose replies the model sampled itself (temperature 1, top-p 0.95),
    until they hold about `n_tokens` tokens: batches walk through the first `n_prompts` prompts, then round again
    with fresh samples (at most `max_rounds` rounds). A batch is no larger than the tokens still needed call for,
    estimated from the replies so far (most end well before `max_new_tokens`). `batch` (default 128 on a GPU, 32
    on the CPU): generation is a loop of small steps, so on a GPU one wide batch costs about what a narrow one does
    (measured on the H100: three batches of 32 took 33-53 s of auto's ~130 s on SmolLM2-135M). Needs a chat
    template."""
    import torch

    if not getattr(tok, "chat_template", None):
        raise InputError("self-calibration needs a chat template in the fine-tune's tokenizer")
    prompts = [GENERIC_PROMPTS[i % len(GENERIC_PROMPTS)] for i in range(n_prompts)]
    dev = next(model.parameters()).device
    if batch is None:
        batch = 128 if dev.type == "cuda" else 32
    side, pad_tok = tok.padding_side, tok.pad_token
    tok.padding_side = "left"
    if tok.pad_token is None:  # batching needs one; any id works under the attention mask
        tok.pad_token = tok.eos_token
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    texts: list[str] = []
    total = 0
    per_reply = max_new_tokens + 24  # a reply at most, plus its prompt and template, until replies are measured
    i, limit = 0, n_prompts * max_rounds
    try:
        while i < limit and total < n_tokens:
            need = max(1, -(-(n_tokens - total) // per_reply))
            start = i
            idx = list(range(start, min(start + batch, start + need, limit)))
            i += len(idx)
            chunk = [prompts[j % n_prompts] for j in idx]
            enc = tok.apply_chat_template([[{"role": "user", "content": p}] for p in chunk], add_generation_prompt=True,
                                          return_tensors="pt", padding=True, return_dict=True)
            enc = {k: v.to(dev) for k, v in enc.items()}
            torch.manual_seed(seed * 1_000_003 + start)  # seeded per batch: the same model and seed give the same replies
            with torch.no_grad():
                out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=0.95, top_k=0,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad)
            for p, row in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
                reply = tok.decode(row, skip_special_tokens=True)
                text = tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": reply}],
                                               tokenize=False)
                texts.append(text)
                total += len(tok(text, add_special_tokens=False)["input_ids"])
            per_reply = max(8, min(per_reply, -(-total // len(texts))))  # the mean so far: ask for enough next time
    finally:
        tok.padding_side, tok.pad_token = side, pad_tok
    return texts


# ---- the fine-tune's replies, kept between runs ----------------------------------------------------------------------
# bump when self_calibration_texts changes what it would generate for the same model, tokenizer and arguments
SELF_TEXTS_VERSION = 1


def self_texts_key(source, model, tok, **params) -> str:
    """What the replies depend on: the fine-tune's files (name, size, modification time: rewriting a checkpoint
    changes them), its chat template, the prompts, the generation arguments and where it ran (dtype, device type)."""
    import hashlib

    from deltapack.io.sources import _weight_files

    root = Path(source.path)
    files = _weight_files(root) + sorted(p for p in root.glob("*token*") if p.is_file())
    p0 = next(model.parameters())
    stats = [(f.name, f.stat()) for f in files]
    sig = {"v": SELF_TEXTS_VERSION, "root": str(root.resolve()), "template": tok.chat_template,
           "files": [(name, st.st_size, st.st_mtime_ns) for name, st in stats], "prompts": list(GENERIC_PROMPTS),
           "dtype": str(p0.dtype), "device": p0.device.type, **params}
    return hashlib.sha256(json.dumps(sig, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cached_self_calibration_texts(source, model, tok, **kw) -> list[str]:
    """`self_calibration_texts`, kept on disk (DELTAPACK_CACHE/calib) for the next run on the same fine-tune: a
    compression at another ratio or method then skips the generation (tens of seconds on a GPU) and calibrates on
    the very same replies. DELTAPACK_NO_CALIB_CACHE=1 turns it off."""
    import os
    import tempfile

    from deltapack.io.gguf import cache_root

    if os.environ.get("DELTAPACK_NO_CALIB_CACHE") or getattr(source, "path", None) is None:
        return self_calibration_texts(model, tok, **kw)
    try:
        path = cache_root() / "calib" / f"self-{self_texts_key(source, model, tok, **kw)}.json"
    except (OSError, InputError) as e:  # no way to tell this fine-tune's files apart: no cache, never a failure
        log.warning("self-calibration: not cached (%s)", e)
        return self_calibration_texts(model, tok, **kw)
    try:
        texts = json.loads(path.read_text())["texts"]
        if isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts):
            log.info("self-calibration: reusing %d replies from %s", len(texts), path)
            return texts
        log.warning("self-calibration: ignoring a malformed cache file %s", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("self-calibration: ignoring an unreadable cache file %s (%s)", path, e)
    texts = self_calibration_texts(model, tok, **kw)
    try:  # temp file + rename: a run killed mid-write leaves no half file for the next one
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
        with os.fdopen(fd, "w") as f:
            json.dump({"texts": texts}, f)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("self-calibration: could not keep the replies in %s (%s)", path.parent, e)
    return texts
