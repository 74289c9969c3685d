"""Small prompt/answer tasks with known answers, for checking that a compressed model still answers what the
original answered. Items are generated from fixed word lists with a seeded RNG (same items on every machine);
a response counts as correct when an accepted answer appears as a whole word in its first line, before any
listed distractor (e.g. the smaller number in "which is larger").

Each item also lists `choices` (its family's possible answers, the right one at `choice`) for the scoring the
DeltaLLM paper reports (zero-shot tasks through lm-eval-harness): the answer is the choice the model gives the
highest log-likelihood as the start of its reply, so a model that still ranks the right answer first counts even when
its greedy reply would not match.
"""

from __future__ import annotations

import random
import re

import torch

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("the United Kingdom", "London"), ("Russia", "Moscow"), ("China", "Beijing"), ("Egypt", "Cairo"),
            ("Canada", "Ottawa"), ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"),
            ("Austria", "Vienna"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"),
            ("Australia", "Canberra"), ("Kenya", "Nairobi"), ("Turkey", "Ankara"), ("Thailand", "Bangkok"),
            ("South Korea", "Seoul"), ("the Netherlands", "Amsterdam"), ("Belgium", "Brussels"),
            ("Denmark", "Copenhagen"), ("Finland", "Helsinki"), ("Hungary", "Budapest"), ("Cuba", "Havana")]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
OPPOSITES = [("hot", ["cold"]), ("big", ["small", "little"]), ("up", ["down"]), ("day", ["night"]),
             ("fast", ["slow"]), ("happy", ["sad", "unhappy"]), ("open", ["closed", "close", "shut"]),
             ("left", ["right"]), ("black", ["white"]), ("wet", ["dry"]), ("early", ["late"]), ("full", ["empty"]),
             ("high", ["low"]), ("rich", ["poor"]), ("win", ["lose"]), ("tall", ["short"]), ("good", ["bad", "evil"]),
             ("light", ["dark", "heavy"]), ("push", ["pull"]), ("north", ["south"])]
LEGS = [("dog", 4), ("cat", 4), ("spider", 8), ("bird", 2), ("horse", 4), ("chicken", 2), ("cow", 4), ("ant", 6),
        ("duck", 2), ("lion", 4), ("human", 2), ("elephant", 4)]
COLORS = [("the sky on a clear day", ["blue"]), ("grass", ["green"]), ("snow", ["white"]), ("a banana", ["yellow"]),
          ("coal", ["black"]), ("a ripe tomato", ["red"]), ("milk", ["white"]), ("an orange", ["orange"])]


def _num(n: int) -> list[str]:
    return [str(n)] + ([NUMBER_WORDS[n]] if n < len(NUMBER_WORDS) else [])


def make_items(seed: int = 0, per_task: int = 64) -> list[dict]:
    """[{task, prompt, answers, distractors}] — a few families of one-fact questions, fixed by `seed`. No prompt
    repeats (a repeated item would count twice and make the accuracy look more certain than it is); the families
    with a fixed list (capitals, days, months, opposites, legs, colours) hold at most that list."""
    rng = random.Random(seed)
    items: list[dict] = []

    def add(task, prompt, answers, distractors=(), choices=()):
        choices = list(choices)
        items.append({"task": task, "prompt": prompt, "answers": list(answers), "distractors": list(distractors),
                      "choices": choices, "choice": choices.index(answers[0])})

    for a, b in rng.sample([(a, b) for a in range(1, 10) for b in range(1, 10)], min(per_task, 81)):
        add("add", f"What is {a} + {b}? Answer with just the number.", _num(a + b), choices=[str(n) for n in range(2, 19)])
    for a, b in rng.sample([(a, b) for a in range(2, 99) for b in range(2, 99) if a != b], per_task):
        add("larger", f"Which number is larger, {a} or {b}? Answer with just the number.", _num(max(a, b)), _num(min(a, b)),
            choices=[str(a), str(b)])
    for country, city in rng.sample(CAPITALS, min(per_task, len(CAPITALS))):
        add("capital", f"What is the capital of {country}?", [city], choices=[c for _, c in CAPITALS])
    for i, d in enumerate(DAYS):
        add("next-day", f"Which day of the week comes after {d}?", [DAYS[(i + 1) % 7]], choices=DAYS)
    for i, m in enumerate(MONTHS):
        add("next-month", f"Which month comes after {m}?", [MONTHS[(i + 1) % 12]], choices=MONTHS)
    for w, ans in OPPOSITES:
        add("opposite", f"What is the opposite of '{w}'? Answer with one word.", ans, choices=[a[0] for _, a in OPPOSITES])
    for animal, n in LEGS:
        add("legs", f"How many legs does a {animal} have? Answer with a number.", _num(n),
            [x for k in (2, 4, 6, 8) if k != n for x in _num(k)], choices=["2", "4", "6", "8"])
    for thing, ans in COLORS:
        add("color", f"What color is {thing}? Answer with one word.", ans,
            choices=list(dict.fromkeys(a[0] for _, a in COLORS)))
    return items


def is_correct(response: str, item: dict) -> bool:
    line = response.strip().split("\n")[0].lower()

    def first(words):
        hits = [m.start() for w in words for m in re.finditer(rf"(?<![\w]){re.escape(w.lower())}(?![\w])", line)]
        return min(hits) if hits else None

    pos = first(item["answers"])
    if pos is None:
        return False
    bad = first(item["distractors"]) if item["distractors"] else None
    return bad is None or pos < bad


def _prompt_text(tok, prompt: str) -> str:
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return f"Question: {prompt}\nAnswer:"


@torch.no_grad()
def answer(model, tok, items: list[dict], *, batch: int = 64, max_new_tokens: int = 16) -> list[str]:
    """Greedy responses to each item's prompt (batched, left-padded)."""
    device = next(model.parameters()).device
    side, tok.padding_side = tok.padding_side, "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    out = []
    try:
        for i in range(0, len(items), batch):
            texts = [_prompt_text(tok, it["prompt"]) for it in items[i : i + batch]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            out += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return out


def score(model, tok, items: list[dict], **kw) -> list[bool]:
    return [is_correct(r, it) for r, it in zip(answer(model, tok, items, **kw), items)]


@torch.no_grad()
def choice_logprobs(model, tok, items: list[dict], *, batch: int = 64) -> list[list[float]]:
    """Per item, the summed log-probability of each of its `choices` as the start of the model's reply."""
    device = next(model.parameters()).device
    seqs, spans = [], []  # one sequence per (item, choice); span = the choice's token positions
    for it in items:
        prompt = tok(_prompt_text(tok, it["prompt"]), add_special_tokens=False)["input_ids"]
        for c in it["choices"]:
            ids = tok(c, add_special_tokens=False)["input_ids"]
            seqs.append(prompt + ids)
            spans.append((len(prompt), len(prompt) + len(ids)))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    scores = []
    for i in range(0, len(seqs), batch):
        chunk, sp = seqs[i : i + batch], spans[i : i + batch]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, s in enumerate(chunk):  # right padding: positions stay those of the unpadded sequence
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
        logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
        for j, (a, b) in enumerate(sp):
            tgt = ids[j, a:b].to(device)
            scores.append(float(logp[j, a - 1 : b - 1].gather(-1, tgt[:, None]).sum()))
    out, k = [], 0
    for it in items:
        out.append(scores[k : k + len(it["choices"])])
        k += len(it["choices"])
    return out


def score_choices(model, tok, items: list[dict], **kw) -> list[bool]:
    """Right when the item's answer has the highest log-likelihood among its choices (ties count as wrong)."""
    res = []
    for it, lp in zip(items, choice_logprobs(model, tok, items, **kw)):
        best = max(lp)
        res.append(lp[it["choice"]] == best and lp.count(best) == 1)
    return res


def answer_intervals(kept: float | None, n_kept: int, choice_accuracy: float | None = None, n_items: int = 0,
                     original_choice_accuracy: float | None = None) -> dict[str, tuple[float, float] | None]:
    """95% sampling intervals of the two 'kept' figures, so that differences between runs can be read against the
    noise of a few hundred items.

    kept: share of the n_kept items the original answers that the model answers too (the original is right on all
    of them, so this is a plain binomial: Wilson). choice_kept = choice_accuracy / the original's over the same
    n_items: the model's Wilson interval divided by the original's accuracy, which ignores that both models answer
    the same items (wider than a paired interval)."""
    from deltapack.eval.metrics import wilson

    out: dict[str, tuple[float, float] | None] = {"kept": None, "choice_kept": None}
    if kept is not None and n_kept > 0:
        out["kept"] = wilson(round(kept * n_kept), n_kept)
    if choice_accuracy is not None and n_items > 0 and original_choice_accuracy:
        lo, hi = wilson(round(choice_accuracy * n_items), n_items)
        out["choice_kept"] = (lo / original_choice_accuracy, hi / original_choice_accuracy)
    return out


def percent(value: float | None, interval: tuple[float, float] | None = None, *, bound_unit: str = "") -> str:
    """'41.2% (32–51)' (or with bound_unit="%": '41.2% (32%–51%)'); 'n/a' for a missing value; for the tables."""
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" + (f" ({100 * interval[0]:.0f}{bound_unit}–{100 * interval[1]:.0f}{bound_unit})"
                                    if interval else "")


def result_intervals(original: dict, result: dict) -> dict[str, tuple[float, float] | None]:
    """answer_intervals of one result record of bench/share/run.py, with the counts of its file's `original` block
    (files written before a field existed give None for the figures that need it), plus the Wilson interval of
    choice_kept_paired over the items the original ranks right."""
    from deltapack.eval.metrics import wilson

    out = answer_intervals(result.get("kept"), original.get("task_items_kept", 0), result.get("choice_accuracy"),
                           original.get("task_items", 0), original.get("choice_accuracy"))
    paired, n = result.get("choice_kept_paired"), original.get("choice_items_right", 0)
    out["choice_kept_paired"] = wilson(round(paired * n), n) if paired is not None and n > 0 else None
    return out
