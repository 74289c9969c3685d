"""Incremental detokenization (deltapack.serve.text.TextStream): the streamed pieces add up to the full decode of the
output (after the prompt's context), text split inside a UTF-8 sequence or before a possible stop string is held
back, stop strings cut where they start, and each token decodes a few recent tokens only (not the whole output)."""

from __future__ import annotations

import pytest

from deltapack.serve.text import CONTEXT_TOKENS, TextStream

MIXED = ("Déjà vu: naïve café — 東京 and 🙂🚀 emoji; code: `x = f(y) + 1`\n\n  indented  spaces, tabs\t"
         "and punctuation ... !? End. ") * 6


@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    from deltapack.io.embedded import embedded_model_dir

    return AutoTokenizer.from_pretrained(str(embedded_model_dir()))


def _stream_all(tok, prompt, out, stop=None, may_stop_from=0):
    s = TextStream(tok, prompt, stop)
    pieces, stopped = [], False
    for i, t in enumerate(out):
        piece, stopped = s.push(t, may_stop=i >= may_stop_from)
        pieces.append(piece)
        if stopped:
            break
    if not stopped:
        pieces.append(s.flush())
    return pieces, stopped


def _full_output_text(tok, prompt, out):
    ctx = prompt[-CONTEXT_TOKENS:]
    full, pre = tok.decode(ctx + out, skip_special_tokens=True), tok.decode(ctx, skip_special_tokens=True)
    return full[len(pre):] if full.startswith(pre) else tok.decode(out, skip_special_tokens=True)


@pytest.mark.smollm
def test_streamed_text_is_the_full_decode(smol_tok):
    ids = smol_tok(MIXED)["input_ids"]
    for cut in (7, 31, 60):  # prompt / output boundaries at different places (inside words, emoji bytes...)
        prompt, out = ids[:cut], ids[cut:]
        pieces, stopped = _stream_all(smol_tok, prompt, out)
        assert not stopped
        assert "".join(pieces) == _full_output_text(smol_tok, prompt, out)
        assert not any(p.endswith("\ufffd") for p in pieces)  # half a character is never released


@pytest.mark.smollm
def test_emoji_bytes_are_held_until_the_character_is_complete(smol_tok):
    ids = smol_tok("ok 🙂🚀🙂 fine")["input_ids"]
    pieces, _ = _stream_all(smol_tok, ids[:1], ids[1:])
    assert "".join(pieces) == _full_output_text(smol_tok, ids[:1], ids[1:])
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces)  # some tokens were bytes of a character, released with the next token


@pytest.mark.smollm
def test_stop_strings_cut_the_text_and_nothing_after_is_released(smol_tok):
    ids = smol_tok(MIXED)["input_ids"]
    prompt, out = ids[:5], ids[5:]
    full = _full_output_text(smol_tok, prompt, out)
    for stop in ("café", "東京", "🚀", "End. Déjà"):
        pieces, stopped = _stream_all(smol_tok, prompt, out, stop=[stop, "never-there"])
        assert stopped
        assert "".join(pieces) == full[: full.index(stop)], stop
    # before min_tokens a stop string does not count, and one already in the text never fires later
    first = full.index("café")
    n_before = next(i for i in range(1, len(out)) if "café" in _full_output_text(smol_tok, prompt, out[:i]))
    pieces, stopped = _stream_all(smol_tok, prompt, out, stop=["café"], may_stop_from=n_before + 5)
    assert stopped and "".join(pieces) == full[: full.index("café", first + 1)]


def test_each_token_decodes_a_bounded_window():
    """The cost of a token does not grow with the output: the tokenizer is asked to decode a few tokens each time,
    not the whole output again (which made a 2048-token output cost O(n^2))."""

    class CountingTokenizer:
        def __init__(self):
            self.longest = 0

        def decode(self, ids, skip_special_tokens=True):
            self.longest = max(self.longest, len(ids))
            return "".join(f" w{i}" for i in ids)

    tok = CountingTokenizer()
    s = TextStream(tok, [1, 2, 3], ["zz"])
    text = []
    for i in range(2000):
        text.append(s.push(10 + i)[0])
    text.append(s.flush())
    assert "".join(text) == "".join(f" w{10 + i}" for i in range(2000))
    assert tok.longest <= CONTEXT_TOKENS + 2


def test_tokens_that_never_form_a_character_are_released_bounded():
    """Bytes that never complete a character (a model may emit any token) are released as the tokenizer decodes them
    once a bounded window is exceeded, and at the end; nothing is lost."""

    class ByteTokenizer:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(i % 256 for i in ids).decode("utf-8", errors="replace")

    tok = ByteTokenizer()
    out = [ord("a"), 0xF0, 0x9F] * 3 + [0xF0] * 40 + [ord("b")]
    s = TextStream(tok, [ord("x")])
    pieces = [s.push(t)[0] for t in out] + [s.flush()]
    joined = "".join(pieces)
    assert joined.replace("\ufffd", "") == "aaab"
