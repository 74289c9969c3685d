"""Prompt/answer task files and how a prompt becomes tokens.

A task file is JSON Lines, one record per line: {"prompt": "...", "answer": "..."} (extra keys are kept and ignored).
The task's name is the file's stem.

Answer match rule (exact match): the decoded greedy completion and the reference answer are both stripped of leading
and trailing whitespace and compared character for character. With `first_line=True` only the first non-empty line
of the completion is compared (for models that add an explanation after the answer). Nothing else is normalised: no
case folding, no punctuation removal, no number parsing; a JSON answer must match byte for byte.

Prompt formatting: when the tokenizer has a chat template (and `chat` is not False) the prompt is sent as one user
message with the generation prompt appended; otherwise the raw prompt text is used. The completion a model is scored
on (KL, fine-tuning loss) is the answer followed by the tokenizer's end-of-sequence token, tokenized separately from
the prompt so that prompt and completion tokens never merge across the boundary.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from deltapack.errors import InputError


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass
class Task:
    name: str
    examples: list[Example]
    path: Path | None = None
    meta: dict = field(default_factory=dict)

    def head(self, limit: int | None) -> "Task":
        """The first `limit` examples (all when None)."""
        if limit is None or limit >= len(self.examples):
            return self
        return Task(self.name, self.examples[:limit], self.path, dict(self.meta))


def load_task(path: str | os.PathLike, name: str | None = None) -> Task:
    """Read a prompt/answer JSONL file. Bad lines raise InputError naming the line."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"task file not found: {p}")
    examples = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or "prompt" not in rec or "answer" not in rec:
                raise InputError(f"{p}:{lineno}: each line needs \"prompt\" and \"answer\"")
            examples.append(Example(str(rec["prompt"]), str(rec["answer"])))
    if not examples:
        raise InputError(f"task file {p} holds no examples")
    return Task(name or p.stem, examples, p)


def load_tasks(paths: Iterable[str | os.PathLike]) -> list[Task]:
    tasks = [load_task(p) for p in paths]
    names = [t.name for t in tasks]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise InputError(f"two task files share the name {sorted(dup)[0]!r} (the file stem names the task)")
    return tasks


def write_jsonl(path: str | os.PathLike, records: Sequence[dict | Example]) -> Path:
    """Write records as JSONL atomically (temp file then rename)."""
    from deltapack.io.writer import write_bytes_atomic

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in records:
        d = {"prompt": r.prompt, "answer": r.answer} if isinstance(r, Example) else r
        lines.append(json.dumps(d, ensure_ascii=False))
    write_bytes_atomic(p, ("\n".join(lines) + "\n").encode())
    return p


# ---- matching -------------------------------------------------------------------------------------------------------
def first_nonempty_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def answer_matches(prediction: str, answer: str, first_line: bool = False) -> bool:
    """The documented match rule: strip, then exact comparison (of the first non-empty line when `first_line`)."""
    pred = first_nonempty_line(prediction) if first_line else prediction.strip()
    return pred == answer.strip()


# ---- prompt formatting --------------------------------------------------------------------------------------------
def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def use_chat(tok, chat: bool | None) -> bool:
    """chat=None: use the chat template when the tokenizer has one."""
    if chat is None:
        return has_chat_template(tok)
    if chat and not has_chat_template(tok):
        raise InputError("chat formatting asked for, but the tokenizer has no chat template")
    return chat


def prompt_text(tok, prompt: str, chat: bool) -> str:
    if not chat:
        return prompt
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def prompt_ids(tok, prompt: str, chat: bool) -> list[int]:
    # a chat template already writes its own special tokens; a raw prompt gets the tokenizer's usual ones (BOS)
    return list(tok(prompt_text(tok, prompt, chat), add_special_tokens=not chat)["input_ids"])


def completion_ids(tok, answer: str) -> list[int]:
    """Tokens the model should produce after the prompt: the answer, then end-of-sequence (when the tokenizer has
    one), so a model learns and is scored on stopping too."""
    ids = list(tok(answer, add_special_tokens=False)["input_ids"])
    if tok.eos_token_id is not None:
        ids.append(int(tok.eos_token_id))
    return ids


def encode_example(tok, example: Example, chat: bool) -> tuple[list[int], list[int]]:
    """(prompt tokens, completion tokens) of one example."""
    return prompt_ids(tok, example.prompt, chat), completion_ids(tok, example.answer)


def encode_examples(tok, examples: Sequence[Example], chat: bool) -> list[tuple[list[int], list[int]]]:
    """`encode_example` of many examples with one batched tokenizer call per side (the same ids; a fast tokenizer
    does the batch in Rust, several times quicker than one call per example on thousands of training records)."""
    if not examples:
        return []
    texts = [prompt_text(tok, e.prompt, chat) for e in examples]
    prompts = tok(texts, add_special_tokens=not chat)["input_ids"]
    answers = tok([e.answer for e in examples], add_special_tokens=False)["input_ids"]
    eos = [int(tok.eos_token_id)] if tok.eos_token_id is not None else []
    return [(list(p), list(a) + eos) for p, a in zip(prompts, answers)]
