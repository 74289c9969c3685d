"""Incremental detokenization with stop strings, run by the engine after every sampled token.

Text is released only when it is final: an incomplete UTF-8 sequence (decoded as U+FFFD) and any tail that could
still grow into a stop string are held back, so a streamed client never sees text that a stop string later cuts.
"""

from __future__ import annotations

CONTEXT_TOKENS = 4  # prompt tokens decoded in front of the output, so tokenizers that strip a leading space do not


class TextStream:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str] | None = None, skip_special_tokens: bool = True,
                 include_stop: bool = False):
        self.tok = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.skip = skip_special_tokens
        self.include_stop = include_stop  # the stop string itself ends the returned text (vLLM's include_stop_str_in_output)
        self.stop_from = 0  # stop strings count only when they end past this character (min_tokens)
        self.context = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_text = self._decode(self.context)
        self.ids: list[int] = []
        self.emitted = 0  # characters of the output text already released
        self.text = ""
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip) if ids else ""

    def _output_text(self) -> str:
        full = self._decode(self.context + self.ids)
        if full.startswith(self.prefix_text):
            return full[len(self.prefix_text) :]
        return self._decode(self.ids)

    def push(self, token_id: int, may_stop: bool = True) -> tuple[str, bool]:
        """Add a token; returns (newly final text, whether a stop string ended the output). With may_stop False
        (before min_tokens) stop strings are not looked for, and none ending in the text so far will count."""
        if self.stopped:
            return "", True
        self.ids.append(token_id)
        text = self._output_text()
        self.text = text
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
        text = self.text
        delta = text[self.emitted :]
        self.emitted = len(text)
        return delta


def token_text(tokenizer, token_id: int) -> str:
    """A token's text as OpenAI's logprobs show it (special tokens included)."""
    if tokenizer is None:
        return f"<{token_id}>"
    return tokenizer.decode([token_id], skip_special_tokens=False)
