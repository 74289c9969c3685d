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

from deltapack.serve.sampling import to_device

MAX_SPEC_CHARS = 65536  # schema / regex / grammar text a request may send
MAX_CHOICES = 256
_compilers: weakref.WeakKeyDictionary[object, dict] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


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


class GrammarMasks:
    """The token bitmasks of one engine's constrained rows, split in two phases so that the host's work overlaps the
    device's: `fill` (host only: each matcher writes its row's next-token mask) runs right after the decode forward
    was queued, and `apply` (a non-blocking copy and one masking kernel per vocabulary size) once the logits exist.
    The mask for step t+1 depends only on the tokens accepted at step t, so nothing in the fill waits for the GPU.

    Buffers persist across steps: per vocabulary size one host bitmask (pinned for a CUDA device, so the copy is
    truly asynchronous) with one row per batch row, and its device copy. Row b of the logits is masked by row b of
    the bitmask (xgrammar's `indices`), so no rows are gathered, made contiguous and scattered back. A row whose
    matcher fails to fill is reported in `errors` and left out of the masks: it fails alone.

    Not thread-safe: one instance per engine thread (the engine owns one; `default_masks` gives one per thread)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._host: dict[int, torch.Tensor] = {}  # vocab -> (capacity, ceil(vocab/32)) int32 on the host
        self._dev: dict[int, torch.Tensor] = {}  # vocab -> its device copy (CUDA only)
        self._copied = None  # CUDA event after the last host->device copy: the host buffers are free to refill
        self._batch = None  # xgrammar BatchGrammarMatcher (its thread pool), made on first use
        self.groups: dict[int, list[int]] = {}  # vocab -> the rows filled for it (this step)
        self.errors: dict[int, Exception] = {}  # row -> why its fill failed (this step)

    def _buffer(self, vocab: int, rows: int) -> torch.Tensor:
        buf = self._host.get(vocab)
        if buf is None or buf.shape[0] < rows:
            cap = max(8, 1 << (rows - 1).bit_length())  # grow by powers of two: a batch's size changes every step
            # the caching host allocator keeps a pinned block alive until copies queued from it are done
            buf = torch.empty((cap, (vocab + 31) // 32), dtype=torch.int32, pin_memory=self._cuda)
            self._host[vocab] = buf
            if self._cuda:
                self._dev[vocab] = torch.empty(buf.shape, dtype=torch.int32, device=self.device)
        return buf

    def fill(self, rows: list) -> GrammarMasks:
        """Fill the masks of rows (each with .matcher, None when free, and .vocab; row b of the batch is rows[b])
        on the host. Per vocabulary size one multi-threaded fill; a failure there is retried row by row so that
        only the failing rows land in `errors`."""
        xgr = _xgr()
        self.groups, self.errors = {}, {}
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copy has long finished (its tokens were read); never races
            self._copied = None
        by_vocab: dict[int, list[int]] = {}
        for b, r in enumerate(rows):
            if getattr(r, "matcher", None) is not None:
                by_vocab.setdefault(int(r.vocab), []).append(b)
        for vocab, idx in sorted(by_vocab.items()):
            buf = self._buffer(vocab, idx[-1] + 1)
            matchers = [rows[b].matcher for b in idx]
            try:
                if len(idx) > 1:
                    if self._batch is None:
                        self._batch = xgr.BatchGrammarMatcher(max_threads="auto")
                    self._batch.batch_fill_next_token_bitmask(matchers, buf, idx)
                else:
                    matchers[0].fill_next_token_bitmask(buf, idx[0])
                ok = idx
            except Exception:  # find the row(s) that broke it; the others keep their masks
                ok = []
                for b, m in zip(idx, matchers):
                    try:
                        m.fill_next_token_bitmask(buf, b)
                        ok.append(b)
                    except Exception as e:
                        self.errors[b] = e
            if ok:
                self.groups[vocab] = ok
        return self

    def apply(self, x: torch.Tensor, first: int = 0) -> None:
        """Mask logits x in place with the filled rows: x's row i is batch row first + i (first > 0: the sampler's
        row-by-row retry). Columns past a row's vocabulary are left as they are (the caller masks them)."""
        xgr = _xgr()
        n, W = x.shape
        stream = torch.cuda.current_stream(self.device) if self._cuda else None
        for vocab, idx in self.groups.items():
            sel = [b - first for b in idx if first <= b < first + n]
            if not sel:
                continue
            host = self._host[vocab]
            if self._cuda:
                dev = self._dev[vocab]
                top = idx[-1] + 1
                dev[:top].copy_(host[:top], non_blocking=True)  # pinned: queued behind the forward, host goes on
                mask = dev[first:first + n]
                # the row list as a device tensor, also without a blocking (pageable) copy
                ind = to_device(sel, self.device, torch.int32)
            else:
                mask, ind = host[first:first + n], sel
            xgr.apply_token_bitmask_inplace(x, mask, vocab_size=min(vocab, W), indices=ind)
        if self._cuda and self.groups:
            self._copied = torch.cuda.Event()
            self._copied.record(stream)


_local = threading.local()


def default_masks(device: torch.device | str) -> GrammarMasks:
    """This thread's GrammarMasks for device (for callers that own none: tests, one-off sampling)."""
    per = getattr(_local, "masks", None)
    if per is None:
        per = _local.masks = {}
    dev = torch.device(device)
    m = per.get(dev)
    if m is None:
        m = per[dev] = GrammarMasks(dev)
    return m
