"""Helpers for tests and the load benchmark: a tiny word-level tokenizer with a chat template (pico models have
none), a cache-free greedy reference, merged reference models, and a running in-process server."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: Llama's default bos=1, eos=2
CHAT_WORDS = ["system", "user", "assistant", ":", "hello", "world", "the", "a", "of", "and"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant :{% endif %}"
)


def make_word_tokenizer(path: str | Path, vocab_size: int) -> list[str]:
    """Save a whitespace word-level tokenizer of exactly `vocab_size` tokens (specials, chat words, then "w<i>")
    with a chat template into `path`. Returns the vocabulary in id order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + CHAT_WORDS
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    vocab = {w: i for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return words


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for the bytes 0..255 (GPT-2's table), in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def make_byte_tokenizer(path: str | Path) -> int:
    """Save a byte-level tokenizer (specials, then one token per byte: any text, JSON included, can be spelled)
    with the chat template into `path`. Returns its vocabulary size (260); give the model a larger one to have
    padding columns, as real models do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS)}
    for ch in _byte_chars():
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return len(vocab)


def to_float32(path: str | Path) -> Path:
    """Re-save a checkpoint in float32 (tests' fine-tunes come out bf16; merging a delta into a bf16 fine-tune rounds
    the merged weights to bf16, which the server, adding the delta in fp32, does not do)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    for f in Path(path).glob("*.safetensors"):
        f.unlink()
    m.save_pretrained(str(path), safe_serialization=True)
    return Path(path)


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by re-running the whole sequence each step (no KV cache: an independent reference)."""
    ids = list(prompt)
    dev = next(model.parameters()).device
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids], device=dev)).logits[0, -1]
            ids.append(int(logits.float().argmax()))
    return ids[len(prompt) :]


def merged_model(base: str | Path, delta: str | Path, dtype=torch.float32, merge_dtype: torch.dtype | None = None):
    """The fine-tune rebuilt in memory (base + decoded delta), in `dtype`. Changed tensors are first rounded to the
    fine-tune's dtype as `deltapack merge` writes them, unless `merge_dtype` (float32: the unrounded sum)."""
    from transformers import AutoConfig

    from deltapack import api
    from deltapack.format.directory import DeltaDir

    d = DeltaDir.open(delta)
    cfg_dir = d.path / "hf" if (d.path / "hf" / "config.json").exists() else Path(base)
    sd = api.merged_state_dict(str(base), d, merge_dtype=merge_dtype)
    return api.model_from_state_dict(AutoConfig.from_pretrained(str(cfg_dir)), sd, dtype=dtype)


@contextlib.contextmanager
def running_server(base, deltas=(), http=None, **kw):
    """`with running_server(base, [(name, path)], ...) as (state, url):` an in-process server on 127.0.0.1;
    `http`: its HTTPOptions (API key, limits)."""
    from deltapack.serve.app import ServerThread, build_server, create_app

    kw.setdefault("served_model_name", "base")
    state = build_server(str(base), [(n, str(p)) for n, p in deltas], **kw)
    try:
        with ServerThread(create_app(state, http)) as srv:
            yield state, srv.url
    finally:
        state.close()


def stop_process(proc, timeout: float = 30.0) -> None:
    """Stop a `deltapack serve` subprocess as Ctrl-C would (SIGINT), killing it if it does not exit in time."""
    import signal
    import subprocess

    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def sse_events(lines) -> list:
    """Parse `data: ...` lines of an SSE stream: JSON objects, and the final "[DONE]" marker as a string."""
    out = []
    for line in lines:
        if not line.startswith("data: "):
            continue
        payload = line[len("data: ") :]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


ERROR_KEYS = {"message", "type", "param", "code"}


def api_error(response, status: int) -> dict:
    """Assert an HTTP response is `status` with OpenAI's error shape; return its error object."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def admitted_together(state, calls: list, timeout: float = 60.0) -> list:
    """Run `calls` (functions of no argument that each send one request) on threads while the engine is held, so
    that their requests are admitted into one batch when it is released. Returns each call's result, or the
    exception it raised."""
    out: list = [None] * len(calls)

    def run(i: int) -> None:
        try:
            out[i] = calls[i]()
        except Exception as e:  # handed to the caller, whose asserts report it
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    state.tiers.lock.acquire()
    try:
        for t in threads:
            t.start()
        t0 = time.monotonic()
        while state.engine.snapshot()["waiting"] < len(calls):
            failed = [r for r in out if isinstance(r, Exception)]
            assert not failed and time.monotonic() - t0 < timeout, f"requests did not queue: {failed}"
            time.sleep(0.01)
    finally:
        state.tiers.lock.release()
    for t in threads:
        t.join(timeout * 2)
    return out
