"""Three synthetic prompt/answer tasks for the quality benchmark, generated from fixed seeds.

- arithmetic: two- or three-step word problems about a person's items (add, take away, buy k packs of m); the answer
  is the final count as a bare integer.
- python: predict what a short Python program prints. Programs are built from a small set of statement templates and
  the generator computes the printed output itself while building them (no exec/eval of anything, ever).
- json: pull 2-3 named fields out of a sentence holding 4-5 facts; the answer is canonical JSON
  (json.dumps(sort_keys=True, separators=(",", ":"))), integers as numbers.

Answers are short (a few tokens; JSON ~20-40) so a 135M model can learn them in a few hundred steps. The base
instruct model answers in prose, so its exact-match accuracy is near zero; a fine-tune learns format and content.

Splits: test and dev are drawn first from their own seeds, train after from another, skipping any prompt already in
test or dev, so no test prompt is ever trained on.

    python bench/quality/tasks.py --out data/quality       # writes {task}-{split}.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

TASKS = ("arithmetic", "python", "json")
SPLIT_SEEDS = {"test": 1001, "dev": 2002, "train": 3003}
TASK_SALT = {"arithmetic": 11, "python": 22, "json": 33}

NAMES = ["Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jamal", "Kai", "Lena", "Marco",
         "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wen", "Yuki", "Zoe"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "stamps", "coins", "books", "shells", "cards",
         "candles", "buttons", "eggs", "flowers", "tickets"]
CONTAINERS = ["boxes", "bags", "packs", "jars", "crates"]


@dataclass(frozen=True)
class Record:
    prompt: str
    answer: str

    def as_dict(self) -> dict:
        return {"prompt": self.prompt, "answer": self.answer}


# ---- arithmetic -----------------------------------------------------------------------------------------------------
def arithmetic_example(rng: random.Random) -> Record:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(3, 30)
    sentences = [f"{name} has {value} {item}."]
    steps = rng.choice((2, 2, 3))
    used_packs = False
    for _ in range(steps):
        kinds = ["add", "add", "sub", "sub"] + ([] if used_packs else ["packs"])
        kind = rng.choice(kinds)
        if kind == "sub" and value < 2:
            kind = "add"
        if kind == "add":
            k = rng.randint(2, 20)
            verb = rng.choice(["buys", "finds", "gets", "is given"])
            sentences.append(f"{'Then ' if len(sentences) > 1 else ''}{name} {verb} {k} more {item}.")
            value += k
        elif kind == "sub":
            k = rng.randint(1, min(value, 15))
            verb = rng.choice(["gives away", "loses", "uses", "sells"])
            sentences.append(f"{name} {verb} {k} {item}.")
            value -= k
        else:
            used_packs = True
            k, m = rng.randint(2, 5), rng.randint(2, 6)
            sentences.append(f"{name} buys {k} {rng.choice(CONTAINERS)} with {m} {item} in each.")
            value += k * m
    question = f"How many {item} does {name} have now?"
    return Record(" ".join(sentences) + " " + question, str(value))


# ---- python output --------------------------------------------------------------------------------------------------
VARS = ["a", "b", "c", "n", "x", "y", "total", "count"]
WORDS = ["cat", "dog", "sun", "tree", "book", "star", "fish", "moon", "code", "blue", "lamp", "rain"]


def _py_arith(rng: random.Random) -> tuple[list[str], str]:
    a, b = rng.randint(1, 12), rng.randint(1, 12)
    va, vb = rng.sample(VARS[:6], 2)
    ops = [
        (f"{va} + {vb}", a + b), (f"{va} * {vb}", a * b), (f"{va} - {vb}", a - b), (f"({va} + {vb}) * 2", (a + b) * 2),
        (f"{va} // {vb}", a // b), (f"{va} % {vb}", a % b), (f"{va} * 2 + {vb}", a * 2 + b),
    ]
    expr, val = rng.choice(ops)
    return [f"{va} = {a}", f"{vb} = {b}", f"print({expr})"], str(val)


def _py_loop(rng: random.Random) -> tuple[list[str], str]:
    start, n, k = rng.randint(0, 10), rng.randint(2, 5), rng.randint(1, 6)
    v = rng.choice(["total", "count", "x"])
    if rng.random() < 0.5:
        lines = [f"{v} = {start}", f"for i in range({n}):", f"    {v} += {k}", f"print({v})"]
        val = start + n * k
    else:
        lines = [f"{v} = {start}", f"for i in range({n}):", f"    {v} += i", f"print({v})"]
        val = start + sum(range(n))
    return lines, str(val)


def _py_list(rng: random.Random) -> tuple[list[str], str]:
    xs = [rng.randint(0, 20) for _ in range(rng.randint(3, 5))]
    i = rng.randrange(len(xs))
    ops = [("sum(xs)", str(sum(xs))), ("max(xs)", str(max(xs))), ("min(xs)", str(min(xs))), ("len(xs)", str(len(xs))),
           (f"xs[{i}]", str(xs[i])), ("xs[-1]", str(xs[-1])), ("sorted(xs)", str(sorted(xs))),
           ("xs[:2]", str(xs[:2]))]
    expr, out = rng.choice(ops)
    return [f"xs = {xs}", f"print({expr})"], out


def _py_string(rng: random.Random) -> tuple[list[str], str]:
    s, t = rng.sample(WORDS, 2)
    ops = [("s.upper()", s.upper()), ("len(s)", str(len(s))), ("s[0]", s[0]), ("s + t", s + t), ("s * 2", s * 2),
           ("s[1:3]", s[1:3]), ("t + '-' + s", t + "-" + s)]
    expr, out = rng.choice(ops)
    return [f"s = '{s}'", f"t = '{t}'", f"print({expr})"], out


def _py_branch(rng: random.Random) -> tuple[list[str], str]:
    x, t, a, b = rng.randint(0, 20), rng.randint(5, 15), rng.randint(1, 9), rng.randint(1, 9)
    lines = [f"x = {x}", f"if x > {t}:", f"    x = x - {a}", "else:", f"    x = x + {b}", "print(x)"]
    return lines, str(x - a if x > t else x + b)


def _py_function(rng: random.Random) -> tuple[list[str], str]:
    a, b, v = rng.randint(2, 5), rng.randint(0, 9), rng.randint(1, 9)
    name = rng.choice(["f", "g", "step", "calc"])
    return [f"def {name}(v):", f"    return v * {a} + {b}", f"print({name}({v}))"], str(v * a + b)


def _py_while(rng: random.Random) -> tuple[list[str], str]:
    n, k = rng.randint(5, 30), rng.randint(2, 7)
    count, m = 0, n
    while m > 0:  # the program's semantics, computed here
        m -= k
        count += 1
    return [f"n = {n}", "steps = 0", "while n > 0:", f"    n -= {k}", "    steps += 1", "print(steps)"], str(count)


PY_TEMPLATES: list[Callable[[random.Random], tuple[list[str], str]]] = [
    _py_arith, _py_loop, _py_list, _py_string, _py_branch, _py_function, _py_while,
]


def python_example(rng: random.Random) -> Record:
    lines, out = rng.choice(PY_TEMPLATES)(rng)
    code = "\n".join(lines)
    return Record(f"What does this Python program print?\n\n{code}", out)


# ---- JSON extraction ------------------------------------------------------------------------------------------------
CITIES = ["Lisbon", "Nairobi", "Osaka", "Denver", "Hamburg", "Lima", "Perth", "Montreal", "Seoul", "Cairo", "Dublin",
          "Austin"]
JOBS = ["teacher", "nurse", "pilot", "chef", "engineer", "painter", "farmer", "lawyer", "baker", "dentist"]
PRODUCTS = ["desk lamp", "backpack", "kettle", "monitor", "chair", "keyboard", "tent", "blender", "jacket", "camera"]
EVENTS = ["concert", "workshop", "marathon", "book fair", "film festival", "chess tournament", "science fair"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def _canon(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _person(rng):
    f = {"name": f"{rng.choice(NAMES)} {rng.choice(['Silva', 'Okafor', 'Tanaka', 'Miller', 'Novak', 'Haddad', 'Berg'])}",
         "age": rng.randint(19, 79), "city": rng.choice(CITIES), "job": rng.choice(JOBS)}
    texts = [
        f"{f['name']} is a {f['age']}-year-old {f['job']} who lives in {f['city']}.",
        f"Living in {f['city']}, {f['name']} works as a {f['job']} and is {f['age']} years old.",
        f"Our new member, {f['name']} ({f['age']}), is a {f['job']} from {f['city']}.",
    ]
    return f, rng.choice(texts)


def _order(rng):
    f = {"customer": rng.choice(NAMES), "order_id": rng.randint(1000, 9999), "product": rng.choice(PRODUCTS),
         "quantity": rng.randint(1, 9), "city": rng.choice(CITIES)}
    texts = [
        f"Order {f['order_id']}: {f['customer']} bought {f['quantity']} x {f['product']}, shipped to {f['city']}.",
        f"{f['customer']} from {f['city']} placed order {f['order_id']} for {f['quantity']} {f['product']} units.",
        f"Ship {f['quantity']} units of {f['product']} to {f['customer']} in {f['city']} (order {f['order_id']}).",
    ]
    return f, rng.choice(texts)


def _event(rng):
    f = {"event": rng.choice(EVENTS), "city": rng.choice(CITIES), "month": rng.choice(MONTHS),
         "day": rng.randint(1, 28), "attendees": rng.randint(20, 900)}
    texts = [
        f"The {f['event']} in {f['city']} on {f['month']} {f['day']} drew {f['attendees']} people.",
        f"About {f['attendees']} guests came to the {f['event']}, held in {f['city']} on {f['month']} {f['day']}.",
        f"On {f['month']} {f['day']}, {f['city']} hosted a {f['event']} with {f['attendees']} attendees.",
    ]
    return f, rng.choice(texts)


def json_example(rng: random.Random) -> Record:
    fields, text = rng.choice([_person, _order, _event])(rng)
    keys = sorted(rng.sample(sorted(fields), rng.choice((2, 3))))
    prompt = f"Extract {', '.join(keys)} from the text as JSON.\nText: {text}"
    return Record(prompt, _canon({k: fields[k] for k in keys}))


GENERATORS: dict[str, Callable[[random.Random], Record]] = {
    "arithmetic": arithmetic_example, "python": python_example, "json": json_example,
}


# ---- splits ---------------------------------------------------------------------------------------------------------
def make_splits(task: str, n_train: int = 8000, n_dev: int = 128, n_test: int = 256) -> dict[str, list[Record]]:
    """Deterministic train/dev/test lists for `task`; prompts never repeat across (or within) splits."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    gen = GENERATORS[task]
    seen: set[str] = set()
    out: dict[str, list[Record]] = {}
    for split, n in (("test", n_test), ("dev", n_dev), ("train", n_train)):
        rng = random.Random(SPLIT_SEEDS[split] * 100 + TASK_SALT[task])
        recs: list[Record] = []
        tries = 0
        while len(recs) < n:
            tries += 1
            if tries > 50 * n + 1000:
                raise RuntimeError(f"{task}: cannot draw {n} distinct {split} prompts")
            r = gen(rng)
            if r.prompt in seen:
                continue
            seen.add(r.prompt)
            recs.append(r)
        out[split] = recs
    return out


def write_jsonl(path: Path, records: list[Record]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text("".join(json.dumps(r.as_dict(), ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data/quality"))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--n-dev", type=int, default=128)
    ap.add_argument("--n-test", type=int, default=256)
    args = ap.parse_args(argv)
    for task in args.tasks.split(","):
        splits = make_splits(task, args.n_train, args.n_dev, args.n_test)
        for split, recs in splits.items():
            p = write_jsonl(args.out / f"{task}-{split}.jsonl", recs)
            print(f"{p}: {len(recs)} records, e.g. {recs[0].as_dict()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
