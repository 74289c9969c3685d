"""Incremental detokenization with stop strings, run by the engine after every sampled token.

Text is released only when it is final: an incomplete UTF-8 sequence (decoded as U+FFFD) and any tail that could
still grow into a stop string are held back, so a streamed client never sees text that a stop string later cuts.

Each token costs a decode of a few recent tokens, not of the whole output: decoding everything again at every token
made a step of 64 rows cost 27 ms of detokenization at 2048 output tokens (SmolLM2's tokenizer, this project's CPU
machine), more than a 7B model's decode step on an H100. The window (`prefix_offset:`) starts one finalized token
before the new ones, and only the text past that token's own decode is added, so tokenizers that strip a word's
leading space at the start of a decode, and UTF-8 sequences split over tokens, come out as in a full decode.
"""

from __future__ import annotations

CONTEXT_TOKENS = 4  # prompt tokens decoded in front of the output, so tokenizers that strip a leading space do not
# strip the output's first one
MAX_PENDING_TOKENS = 16  # tokens that have not formed a character yet, at most, before their text is taken as it is


class TextStream:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str] | None = None, skip_special_tokens: bool = True,
                 include_stop: bool = False):
        # a fast tokenizer's own (Rust) decode is what its decode() returns when it cleans up no spaces, without
        # ~10 us of Python argument handling a call (two calls per token of every row)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        clean_up = getattr(tokenizer, "clean_up_tokenization_spaces", True)
        self._decoder = backend.decode if backend is not None and clean_up is False else tokenizer.decode
        self.stop = [s for s in (stop or []) if s]
        self.skip = skip_special_tokens
        self.include_stop = include_stop  # the stop string itself ends the returned text (vLLM's include_stop_str_in_output)
        self.stop_from = 0  # stop strings count only when they end past this character (min_tokens)
        self.all_ids = list(prompt_ids[-CONTEXT_TOKENS:])  # the context, then the output's tokens
        # all_ids[prefix_offset:read_offset]: tokens already turned into text, decoded again in front of the new ones
        self.prefix_offset, self.read_offset = 0, len(self.all_ids)
        self.emitted = 0  # characters of the output text already released
        self.text = ""  # the output's text so far: final characters only (see _pending)
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._decoder(ids, skip_special_tokens=self.skip) if ids else ""

    def _pending(self) -> tuple[str, bool]:
        """(text of the tokens past read_offset, whether it is final): not final while it ends in an incomplete
        UTF-8 sequence or adds no character yet (a token may be part of one, or a special token skipped)."""
        window = self.all_ids[self.prefix_offset :]
        prefix = self._decode(self.all_ids[self.prefix_offset : self.read_offset])
        new = self._decode(window)
        if not new.startswith(prefix):  # a decode that rewrote its start (whitespace cleanup): fall back to the
            prefix = ""  # window's own text, as the full decode would have it from here
            new = self._decode(self.all_ids[self.read_offset :])
        added = new[len(prefix) :]
        return added, bool(added) and not added.endswith("\ufffd")

    def _output_text(self) -> str:
        added, final = self._pending()
        # past MAX_PENDING_TOKENS, text that never becomes final (bytes that form no character, a run of skipped
        # special tokens) is taken as decoded: the window stays bounded
        if final or len(self.all_ids) - self.read_offset > MAX_PENDING_TOKENS:
            self.text += added
            self.prefix_offset, self.read_offset = self.read_offset, len(self.all_ids)
            return self.text
        return self.text + added  # the caller holds back a trailing U+FFFD

    def push(self, token_id: int, may_stop: bool = True) -> tuple[str, bool]:
        """Add a token; returns (newly final text, whether a stop string ended the output). With may_stop False
        (before min_tokens) stop strings are not looked for, and none ending in the text so far will count."""
        if self.stopped:
            return "", True
        self.all_ids.append(token_id)
        text = self._output_text()  # final text + the pending tail (a trailing U+FFFD is held back below)
        if self.stop and not may_stop:
            self.stop_from = len(text)
        elif self.stop:
            # search only where a new match can start: a stop string fully inside old text would have fired before
            # (and, after min_tokens, only a match ending past stop_from)
            start = max(0, self.emitted - max(len(s) for s in self.stop) + 1)
            hits = [(i, s) for s in self.stop for i in [text.find(s, max(start, self.stop_from - len(s) + 1))] if i >= 0]
            if hits:
                cut = min(i + (len(s) if self.include_stop else 0) for i, s in hits)
                delta = text[self.emitted : cut] if cut > self.emitted else ""
                self.emitted = max(self.emitted, cut)
                self.text = text[:cut]
                self.stopped = True
                return delta, True
        safe = len(text)
        if text.endswith("\ufffd"):
            safe = len(text.rstrip("\ufffd"))
        hold = 0
        for s in self.stop:  # hold back the longest tail that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, safe), hold, -1):
                if text[safe - k : safe] == s[:k]:
                    hold = k
                    break
        safe -= hold
        if safe <= self.emitted:
            return "", False
        delta = text[self.emitted : safe]
        self.emitted = safe
        return delta, False

    def flush(self) -> str:
        """Text held back when the output ends without a stop string."""
        if self.stopped:
            return ""
        text = self.text = self.text + self._pending()[0]
        delta = text[self.emitted :]
        self.emitted = len(text)
        return delta


def token_text(tokenizer, token_id: int) -> str:
    """A token's text as OpenAI's logprobs show it (special tokens included)."""
    if tokenizer is None:
        return f"<{token_id}>"
    return tokenizer.decode([token_id], skip_special_tokens=False)
