"""Structured output: a request's JSON schema, JSON object, regex, choice list or EBNF grammar, compiled with
xgrammar into a token-level automaton; each constrained request keeps its own matcher, which masks the logits of its
row before sampling and advances with every accepted token.

Why xgrammar (docs/serving.md says more): a pip wheel with a CPU implementation (the server runs on CPUs too),
JSON schema / regex / EBNF front ends, and a token-bitmask API made for batched engines: `fill_next_token_bitmask`
per row, `apply_token_bitmask_inplace` on the rows that asked only, so constrained and free rows share a batch.

Compiling is done on an HTTP worker thread before the request is queued (an invalid schema is the client's 400,
and the engine thread never waits on a compile); compilers are cached per tokenizer, and each caches the grammars
it compiled, so repeated schemas compile once.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from dataclasses import dataclass

import torch

MAX_SPEC_CHARS = 65536  # schema / regex / grammar text a request may send
MAX_CHOICES = 256
_compilers: weakref.WeakKeyDictionary[object, dict] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_batch_matcher = None


class GrammarError(ValueError):
    """The request's grammar cannot be compiled (the client's error: a 400 naming `param`)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GrammarSpec:
    """What a request asked for: kind is json_schema | json_object | regex | choice | grammar; param names the
    request field it came from (for errors)."""

    kind: str
    value: object
    param: str


def _xgr():
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover - xgrammar is in the serve extra
        raise GrammarError(f"structured output needs the xgrammar package (pip install 'deltapack[serve]'): {e}", "response_format") from None
    return xgrammar


def _compiler(tokenizer, vocab: int, stop_ids: tuple[int, ...]):
    xgr = _xgr()
    with _lock:
        per_tok = _compilers.setdefault(tokenizer, {})
        key = (vocab, stop_ids)
        comp = per_tok.get(key)
        if comp is None:
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=list(stop_ids) or None)
            comp = per_tok[key] = xgr.GrammarCompiler(info, max_threads=2, cache_limit_bytes=256 << 20)
        return comp


def _ebnf_string(s: str) -> str:
    """A double-quoted EBNF literal matching exactly s."""
    out = []
    for ch in s:
        o = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\x{o:02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def compile_spec(spec: GrammarSpec, tokenizer, vocab: int, stop_ids) -> object:
    """Compile a request's grammar for this tokenizer; GrammarError (a 400) when it is not a valid one."""
    if tokenizer is None:
        raise GrammarError("structured output needs a tokenizer; this model serves token ids only", spec.param)
    comp = _compiler(tokenizer, vocab, tuple(sorted(stop_ids)))
    v = spec.value
    try:
        if spec.kind == "json_schema":
            text = v if isinstance(v, str) else json.dumps(v)
            if len(text) > MAX_SPEC_CHARS:
                raise GrammarError(f"the JSON schema is longer than {MAX_SPEC_CHARS} characters", spec.param)
            if isinstance(v, str):
                try:
                    parsed = json.loads(v)
                except json.JSONDecodeError as e:
                    raise GrammarError(f"the JSON schema is not valid JSON: {e}", spec.param) from None
                if not isinstance(parsed, (dict, bool)):
                    raise GrammarError("the JSON schema must be a JSON object", spec.param)
            # compact JSON: with free whitespace small models fill their budget with blank lines
            return comp.compile_json_schema(text, any_whitespace=False, strict_mode=True)
        if spec.kind == "json_object":
            return comp.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if spec.kind == "regex":
            if len(v) > MAX_SPEC_CHARS:
                raise GrammarError(f"the regex is longer than {MAX_SPEC_CHARS} characters", spec.param)
            return comp.compile_regex(v)
        if spec.kind == "choice":
            if not v or len(v) > MAX_CHOICES or any(not c for c in v):
                raise GrammarError(f"give 1 to {MAX_CHOICES} non-empty choices", spec.param)
            return comp.compile_grammar("root ::= " + " | ".join(_ebnf_string(c) for c in v))
        if spec.kind == "grammar":
            if len(v) > MAX_SPEC_CHARS:
                raise GrammarError(f"the grammar is longer than {MAX_SPEC_CHARS} characters", spec.param)
            return comp.compile_grammar(v)
    except GrammarError:
        raise
    except (RuntimeError, ValueError, TypeError) as e:
        # xgrammar's message starts with a time and a C++ source location: keep what tells the user what is wrong
        lines = str(e).strip().splitlines() or [e.__class__.__name__]
        msg = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", lines[0])
        raise GrammarError(f"cannot compile the {spec.kind.replace('_', ' ')}: {msg[:500]}", spec.param) from None
    raise GrammarError(f"unknown structured output kind {spec.kind!r}", spec.param)


def new_matcher(compiled) -> object:
    return _xgr().GrammarMatcher(compiled)


def apply_grammar_masks(x: torch.Tensor, rows: list[int], matchers: list, vocabs: list[int]) -> None:
    """Mask logits x (B, W) in place: row rows[i] keeps only the tokens matchers[i] (compiled for a vocabulary of
    vocabs[i] tokens) allows next; columns past a row's vocabulary are left as they are (the caller masks them).
    Other rows are not touched. Per vocabulary size, one multi-threaded fill and one masked write."""
    global _batch_matcher
    xgr = _xgr()
    if _batch_matcher is None:
        _batch_matcher = xgr.BatchGrammarMatcher(max_threads="auto")
    for vocab in sorted(set(vocabs)):
        idx = [i for i, v in enumerate(vocabs) if v == vocab]
        group = [matchers[i] for i in idx]
        bitmask = xgr.allocate_token_bitmask(len(group), vocab)
        if len(group) > 1:
            _batch_matcher.batch_fill_next_token_bitmask(group, bitmask)
        else:
            group[0].fill_next_token_bitmask(bitmask, 0)
        sel = torch.tensor([rows[i] for i in idx], device=x.device)
        sub = x.index_select(0, sel)[:, :vocab].contiguous()
        xgr.apply_token_bitmask_inplace(sub, bitmask.to(x.device))
        x[sel, :vocab] = sub
