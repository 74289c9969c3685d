"""The six task families of the quality benchmark (issue 24), generated from fixed seeds on the CPU in seconds.

| family | held out | what | answer |
|---|---|---|---|
| arithmetic | no | 3-5 step word problem: add, take away, packs of m, doubling, bags of k (remainder dropped), equal piles (integer division), percentages | bare integer |
| strings | yes | 2-3 composed list operations on 4-8 words: reverse, sort, filter by a property, dedupe, every k-th, first/last n, upper/lower case, join with a separator, count | the words joined by ", " (or the separator asked for), or an integer |
| extract | no | a paragraph of 6-9 facts about a fictional company / person / product plus facts about a second entity (a distractor); 3-5 fields, at least one list or nested field and one that needs normalising (dates to YYYY-MM-DD, metres to cm, kg to g, days to hours, "$3.2 million" to 3200000, number words to numbers) | canonical JSON (`sort_keys`, no spaces) |
| code | no | what a 5-10 line Python program prints: loops with branches, small functions, comprehensions, string slicing and joins, while loops, dict counting, nested loops, list methods | the printed line |
| classify | no | a 150-350-token support ticket / email / report with many distractor sentences; label = rule over three facts in different parts (which product: two families of four made-up names; billing or fault; premium or basic plan), with mentions of other products that are not the problem | one of 8 made-up labels |
| chat | yes | questions about a fictional world (96 entities, 5-8 attributes each); answers 1-3 varied sentences; test/dev questions use phrasings never used in training, about entities trained on | free text, scored against the fine-tune's own greedy answer |

Every answer is computed by the generator (the `code` programs are never executed here; tests execute them to check
the generator). Scoring: exact match after stripping whitespace (deltapack.eval.tasks.answer_matches); `chat` records
carry `facts` (the attribute value the question asks for) so a fine-tune can be checked for having learnt the world.

Splits: test and dev are drawn first from their own seeds, then train from another, skipping any prompt already in
test or dev, so no test prompt is ever trained on. Test and dev prompts are distinct; train records are distinct
(prompt, answer) pairs (only `chat` has several answers for one prompt: its answers vary in wording). `chat` builds
its test and dev questions from phrasings that train never uses.

Difficulty is a knob per family (`--knob arithmetic.max_steps=4`, see KNOBS): the benchmark records the knobs of
every run, and a changed knob changes the data, so results made with other knobs are not comparable.

    python bench/quality/tasks.py --out data/quality              # writes {task}-{split}.jsonl
    python bench/quality/tasks.py --lengths bench/results/quality_task_lengths.json   # token lengths, real tokenizer
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

TASKS = ("arithmetic", "strings", "extract", "code", "classify", "chat")
HELDOUT = ("strings", "chat")  # decided before any result (README): never used to choose anything
TUNING = tuple(t for t in TASKS if t not in HELDOUT)
SPLIT_SEEDS = {"test": 1001, "dev": 2002, "train": 3003}
TASK_SALT = {"arithmetic": 41, "strings": 42, "extract": 43, "code": 44, "classify": 45, "chat": 46}
WORLD_SEED = 2026  # the chat family's knowledge base: one world, whatever the split

KNOBS: dict[str, dict] = {
    "arithmetic": {"min_steps": 3, "max_steps": 5, "max_value": 60,
                   "ops": "add,sub,packs,times,bags,piles,percent"},
    "strings": {"min_items": 4, "max_items": 8, "min_ops": 2, "max_ops": 3,
                "ops": "reverse,sort,sort_desc,filter,dedupe,every_k,first_n,last_n,upper,lower,join,count"},
    "extract": {"min_facts": 6, "max_facts": 9, "min_fields": 3, "max_fields": 5, "distractors": 2},
    "code": {"templates": "loop_branch,func_loop,comprehension,string_ops,while_steps,dict_count,nested,list_methods,"
                          "string_build,running_max", "max_list": 6, "max_iter": 6},
    "classify": {"min_tokens": 165, "max_tokens": 335, "other_product_rate": 0.6},
    "chat": {"entities": 96, "second_sentence_rate": 0.5, "third_sentence_rate": 0.2},
}
N_TRAIN = {"arithmetic": 16000, "strings": 16000, "extract": 12000, "code": 16000, "classify": 8000, "chat": 12000}


@dataclass(frozen=True)
class Record:
    prompt: str
    answer: str
    facts: tuple[str, ...] = ()  # chat: what a right answer must mention
    kind: str = ""  # the item's sub-type (steps, template, ...): scores per kind show which knob to turn

    def as_dict(self) -> dict:
        d = {"prompt": self.prompt, "answer": self.answer}
        if self.facts:
            d["facts"] = list(self.facts)
        if self.kind:
            d["kind"] = self.kind
        return d


NAMES = ["Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jamal", "Kai", "Lena", "Marco",
         "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wen", "Yuki", "Zoe"]
SURNAMES = ["Silva", "Okafor", "Tanaka", "Miller", "Novak", "Haddad", "Berg", "Moreau", "Kowalski", "Reyes", "Lund",
            "Achebe", "Sato", "Brennan", "Varga", "Petrov"]
CITIES = [("Lisbon", "Portugal"), ("Nairobi", "Kenya"), ("Osaka", "Japan"), ("Denver", "USA"), ("Hamburg", "Germany"),
          ("Lima", "Peru"), ("Perth", "Australia"), ("Montreal", "Canada"), ("Seoul", "South Korea"),
          ("Cairo", "Egypt"), ("Dublin", "Ireland"), ("Austin", "USA"), ("Porto", "Portugal"), ("Lyon", "France"),
          ("Krakow", "Poland"), ("Accra", "Ghana")]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve"]


def _pick(rng: random.Random, options: list[str]) -> str:
    return options[rng.randrange(len(options))]


# ---- arithmetic -----------------------------------------------------------------------------------------------------
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "stamps", "coins", "books", "shells", "cards",
         "candles", "buttons", "eggs", "flowers", "tickets", "beads", "seeds", "nails"]
CONTAINERS = ["boxes", "bags", "packs", "jars", "crates", "tins"]


def _arith_step(rng: random.Random, op: str, v: int, name: str, item: str, cap: int) -> tuple[str, int] | None:
    """One sentence of the story and the new count, or None when `op` does not fit the current count."""
    if op == "add":
        k = rng.randint(2, 15)
        if v + k > cap:
            return None
        return _pick(rng, [f"{name} buys {k} more {item}.", f"Then {name} finds {k} more.",
                           f"A friend gives {name} {k} {item}.", f"{name} wins {k} {item} in a game."]), v + k
    if op == "sub":
        if v < 3:
            return None
        k = rng.randint(1, min(v - 1, 15))
        return _pick(rng, [f"{name} gives away {k} {item}.", f"{name} loses {k} of them.", f"{name} sells {k}.",
                           f"{name} uses {k} {item}."]), v - k
    if op == "packs":
        k, m = rng.randint(2, 5), rng.randint(2, 6)
        if v + k * m > cap:
            return None
        return f"{name} buys {k} {_pick(rng, CONTAINERS)} with {m} {item} in each.", v + k * m
    if op == "times":
        f = rng.choice((2, 3))
        if v * f > cap:
            return None
        word = {2: _pick(rng, ["doubles", "grows to twice its size"]), 3: "triples"}[f]
        return f"{name}'s pile of {item} {word}.", v * f
    if op == "bags":
        k = rng.randint(3, 9)
        if v < 2 * k or v % k == 0:
            return None
        return (f"{name} puts the {item} into bags of {k} and gives away the ones that do not fill a bag.",
                v - v % k)
    if op == "piles":
        k = rng.randint(2, 5)
        if v < 2 * k:
            return None
        tail = " and keeps one pile." if v % k == 0 else ", throws away the leftovers and keeps one pile."
        return f"{name} splits them into {k} equal piles{tail}", v // k
    if op == "percent":
        p = rng.choice((10, 20, 25, 50, 75))
        if (v * p) % 100 or v * p < 100:
            return None
        if rng.random() < 0.5 or v + v * p // 100 > cap:
            return _pick(rng, [f"{name} sells {p}% of them.", f"{name} gives {p}% of them to a neighbour."]), v - v * p // 100
        return f"{name} gets {p}% more {item}.", v + v * p // 100
    raise ValueError(f"unknown arithmetic op {op!r}")


def arithmetic_example(rng: random.Random, split: str, k: dict, world) -> Record:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    v = rng.randint(6, 30)
    sentences = [f"{name} has {v} {item}."]
    ops = k["ops"].split(",")
    n_steps = rng.randint(k["min_steps"], k["max_steps"])
    for _ in range(n_steps):
        for _try in range(100):
            step = _arith_step(rng, rng.choice(ops), v, name, item, k["max_value"])
            if step:
                break
        else:  # no op of the set fits (tiny cap): taking one away always does while v >= 3
            step = _arith_step(rng, "sub" if v >= 3 else "add", v, name, item, max(k["max_value"], v + 30))
        sentences.append(step[0])
        v = step[1]
    question = _pick(rng, [f"How many {item} does {name} have now?", f"How many {item} does {name} end up with?",
                           f"How many {item} does {name} have at the end?"])
    return Record(" ".join(sentences) + " " + question, str(v), kind=f"{n_steps} steps")


# ---- strings --------------------------------------------------------------------------------------------------------
WORDS = ["cat", "dog", "sun", "tree", "book", "star", "fish", "moon", "lamp", "rain", "road", "ship", "bird", "coin",
         "door", "fire", "gold", "hill", "kite", "leaf", "milk", "nest", "oak", "pear", "rose", "salt", "tent", "wolf",
         "apple", "bread", "cloud", "dream", "eagle", "frost", "grape", "house", "island", "juice", "lemon", "maple",
         "night", "ocean", "piano", "queen", "river", "stone", "tiger", "violin", "water", "zebra", "garden", "window",
         "candle", "rocket", "pencil", "mirror", "basket", "forest", "silver", "butter"]
LIST_OPS = ("reverse", "sort", "sort_desc", "filter", "dedupe", "every_k", "first_n", "last_n", "upper", "lower")
FINAL_OPS = ("join", "count")  # only ever the last step
SEPARATORS = [" - ", "; ", " | ", "/", " + "]


def _word_filter(rng: random.Random, words: list[str]) -> tuple[str, Callable[[str], bool]]:
    kind = rng.choice(("longer", "shorter", "contains", "first_half"))
    if kind == "longer":
        n = rng.choice((3, 4, 5))
        return f"keep only the words longer than {n} letters", lambda w: len(w) > n
    if kind == "shorter":
        n = rng.choice((4, 5, 6))
        return f"keep only the words shorter than {n} letters", lambda w: len(w) < n
    if kind == "contains":
        c = rng.choice("aeiorst")
        return f"keep only the words that contain the letter '{c}'", lambda w: c in w.lower()
    return "keep only the words that start with a letter from a to m", lambda w: w[0].lower() <= "m"


def strings_example(rng: random.Random, split: str, k: dict, world) -> Record:
    allowed = k["ops"].split(",")
    for _try in range(1000):
        n = rng.randint(k["min_items"], k["max_items"])
        words = [rng.choice(WORDS) for _ in range(n)]
        if rng.random() < 0.3:  # some capitalised words, so that upper/lower case changes something
            words = [w.capitalize() if rng.random() < 0.5 else w for w in words]
        n_ops = rng.randint(k["min_ops"], k["max_ops"])
        steps: list[str] = []
        cur = list(words)
        answer = None
        used: set[str] = set()
        for i in range(n_ops):
            last = i == n_ops - 1
            choices = [o for o in allowed if o not in used and (last or o not in FINAL_OPS)]
            if not choices:
                break
            op = rng.choice(choices)
            used.add(op)
            if op in ("sort", "sort_desc"):
                used.update(("sort", "sort_desc"))
            if op in ("upper", "lower"):
                used.update(("upper", "lower"))
            if op == "reverse":
                steps.append(_pick(rng, ["reverse the order of the words", "reverse the list"]))
                cur = cur[::-1]
            elif op == "sort":
                steps.append("sort the words alphabetically, ignoring case")
                cur = sorted(cur, key=lambda w: (w.lower(), w))
            elif op == "sort_desc":
                steps.append("sort the words in reverse alphabetical order, ignoring case")
                cur = sorted(cur, key=lambda w: (w.lower(), w), reverse=True)
            elif op == "filter":
                text, keep = _word_filter(rng, cur)
                steps.append(text)
                cur = [w for w in cur if keep(w)]
            elif op == "dedupe":
                steps.append(_pick(rng, ["remove repeated words, keeping the first of each",
                                         "drop duplicates (keep first occurrences)"]))
                seen: set[str] = set()
                cur = [w for w in cur if not (w in seen or seen.add(w))]
            elif op == "every_k":
                kk = rng.choice((2, 3))
                steps.append(f"keep every {'second' if kk == 2 else 'third'} word, starting with the first")
                cur = cur[::kk]
            elif op in ("first_n", "last_n"):
                m = rng.randint(2, 4)
                steps.append(f"keep the {'first' if op == 'first_n' else 'last'} {m} words")
                cur = cur[:m] if op == "first_n" else cur[-m:]
            elif op == "upper":
                steps.append("write every word in capital letters")
                cur = [w.upper() for w in cur]
            elif op == "lower":
                steps.append("write every word in lower case")
                cur = [w.lower() for w in cur]
            elif op == "join":
                sep = rng.choice(SEPARATORS)
                steps.append(f"join the words with '{sep}'")
                answer = sep.join(cur)
            elif op == "count":
                steps.append("count the words that are left")
                answer = str(len(cur))
        if not cur or len(steps) < k["min_ops"]:
            continue
        if answer is None:
            answer = ", ".join(cur)
        numbered = "; ".join(f"{i + 1}. {s}" for i, s in enumerate(steps))
        tail = "" if steps[-1].startswith(("join", "count")) else "\nAnswer with the words separated by \", \"."
        kind = f"{len(steps)} ops" + (" with a sort" if used & {"sort", "sort_desc"} else "")
        return Record(f"Words: {', '.join(words)}\nSteps: {numbered}.{tail}", answer, kind=kind)
    raise RuntimeError("strings: no example with a non-empty result in 1000 tries")


# ---- extract --------------------------------------------------------------------------------------------------------
COMPANY_A = ["Varn", "Lumet", "Ostra", "Quillon", "Brask", "Tamsin", "Orvell", "Kelda", "Pyra", "Sablon", "Dunmore",
             "Ferrin"]
COMPANY_B = ["Dynamics", "Labs", "Works", "Systems", "Foods", "Robotics", "Textiles", "Energy", "Optics", "Logistics"]
PRODUCT_NAMES = ["Aero", "Bolt", "Crest", "Drift", "Echo", "Flint", "Glide", "Halo", "Ion", "Jet", "Kilo", "Lux",
                 "Mono", "Nova", "Orbit", "Pulse", "Quark", "Rift", "Sonic", "Terra"]
LANGUAGES = ["English", "French", "Spanish", "Swahili", "Japanese", "German", "Polish", "Arabic", "Portuguese", "Korean"]
COLORS = ["black", "white", "red", "blue", "green", "silver", "yellow", "grey"]
OCCUPATIONS = ["architect", "chemist", "sprinter", "novelist", "cellist", "surgeon", "pilot", "photographer"]
INDUSTRIES = ["shipping", "farming", "software", "mining", "fashion", "banking", "aerospace", "publishing"]


def _date(rng: random.Random, lo: int = 1950, hi: int = 2023) -> tuple[str, str]:
    """(ISO form, a written form) of a random date."""
    y, m, d = rng.randint(lo, hi), rng.randint(1, 12), rng.randint(1, 28)
    iso = f"{y:04d}-{m:02d}-{d:02d}"
    sfx = "th" if 10 <= d % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    written = rng.choice([f"{MONTHS[m - 1]} {d}, {y}", f"{d} {MONTHS[m - 1]} {y}", f"the {d}{sfx} of {MONTHS[m - 1]} {y}",
                          iso])
    return iso, written


def _money(rng: random.Random) -> tuple[int, str]:
    if rng.random() < 0.5:
        tenths = rng.randint(11, 99)
        return tenths * 100_000, f"${tenths / 10:.1f} million"
    v = rng.randint(100, 990) * 1000
    return v, f"${v:,}"


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _company(rng: random.Random, subject: bool = True):
    name = f"{rng.choice(COMPANY_A)} {rng.choice(COMPANY_B)}"
    founded, founded_w = _date(rng, 1950, 2020)
    city, country = rng.choice(CITIES)
    employees = rng.randint(12, 480) * 25
    products = rng.sample(PRODUCT_NAMES, rng.randint(2, 4))
    ceo = f"{rng.choice(NAMES)} {rng.choice(SURNAMES)}"
    revenue, revenue_w = _money(rng)
    industry = rng.choice(INDUSTRIES)
    fields = {"name": name, "founded": founded, "headquarters": {"city": city, "country": country},
              "employees": employees, "products": products, "ceo": ceo, "revenue_usd": revenue, "industry": industry}
    emp_w = rng.choice([f"{employees:,}", str(employees)])
    it = "The company" if subject else name
    facts = {
        "founded": rng.choice([f"{name} was founded on {founded_w}.", f"{it} started trading on {founded_w}."]),
        "headquarters": rng.choice([f"{it} is headquartered in {city}, {country}.",
                                    f"Its head office is in {city} ({country})."]),
        "employees": rng.choice([f"{it} employs {emp_w} people.", f"There are {emp_w} people on its payroll."]),
        "products": f"{it} sells {_listing(products)}.",
        "ceo": rng.choice([f"The chief executive is {ceo}.", f"{ceo} runs {it.lower() if it == 'The company' else it}."]),
        "revenue_usd": rng.choice([f"Last year it made {revenue_w} in revenue.", f"Revenue reached {revenue_w} last year."]),
        "industry": f"{it} works in {industry}.",
    }
    return "company", fields, facts


def _person(rng: random.Random, subject: bool = True):
    name = f"{rng.choice(NAMES)} {rng.choice(SURNAMES)}"
    born, born_w = _date(rng, 1940, 2005)
    cm = rng.randint(150, 205)
    city, country = rng.choice(CITIES)
    langs = rng.sample(LANGUAGES, rng.randint(2, 3))
    occupation = rng.choice(OCCUPATIONS)
    awards = rng.randint(0, 12)
    employer = f"{rng.choice(COMPANY_A)} {rng.choice(COMPANY_B)}"
    fields = {"name": name, "born": born, "height_cm": cm, "hometown": {"city": city, "country": country},
              "languages": langs, "occupation": occupation, "awards": awards, "employer": employer}
    first = name.split()[0]
    height_w = rng.choice([f"{cm / 100:.2f} m", f"{cm} cm"])
    awards_w = NUMBER_WORDS[awards] if awards < len(NUMBER_WORDS) and rng.random() < 0.6 else str(awards)
    facts = {
        "born": f"{name} was born on {born_w}.",
        "height_cm": rng.choice([f"{first} is {height_w} tall.", f"{first} stands {height_w} tall."]),
        "hometown": rng.choice([f"{first} grew up in {city}, {country}.", f"{first}'s hometown is {city} in {country}."]),
        "languages": f"{first} speaks {_listing(langs)}.",
        "occupation": rng.choice([f"{first} works as a {occupation}.", f"By profession {first} is a {occupation}."]),
        "awards": f"{first} has won {awards_w} award{'s' if awards != 1 else ''}.",
        "employer": f"{first} is employed by {employer}.",
    }
    return "person", fields, facts


def _product(rng: random.Random, subject: bool = True):
    name = f"{rng.choice(PRODUCT_NAMES)} {rng.randint(2, 9)}"
    maker = f"{rng.choice(COMPANY_A)} {rng.choice(COMPANY_B)}"
    release, release_w = _date(rng, 2005, 2024)
    grams = rng.randint(3, 95) * 50
    price = rng.randint(19, 1499)
    colors = rng.sample(COLORS, rng.randint(2, 3))
    hours = rng.choice([rng.randint(2, 9) * 24, rng.randint(4, 40)])
    fields = {"name": name, "maker": maker, "release_date": release, "weight_g": grams, "price_usd": price,
              "colors": colors, "battery_hours": hours}
    weight_w = rng.choice([f"{grams / 1000:g} kg", f"{grams} g"]) if grams % 100 == 0 else f"{grams} g"
    battery_w = f"{hours // 24} days" if hours % 24 == 0 and rng.random() < 0.7 else f"{hours} hours"
    it = "It" if subject else f"The {name}"
    facts = {
        "maker": f"The {name} is made by {maker}.",
        "release_date": rng.choice([f"{it} went on sale on {release_w}.", f"{it} was released on {release_w}."]),
        "weight_g": f"{it} weighs {weight_w}.",
        "price_usd": rng.choice([f"{it} costs ${price:,}.", f"The price is ${price:,}."]),
        "colors": f"{it} comes in {_listing(colors)}.",
        "battery_hours": f"The battery lasts {battery_w}.",
    }
    return "product", fields, facts


def _distractor(rng: random.Random, kind: str) -> str:
    """A sentence about a second entity with values of the same types, so that copying the wrong one is wrong."""
    if kind == "company":
        _, f, _ = _company(rng, subject=False)
        _, written = _date(rng, 1950, 2020)
        return rng.choice([f"Its rival, {f['name']}, was founded on {written} and employs {f['employees']:,} people.",
                           f"A competitor, {f['name']}, is based in {f['headquarters']['city']} and sells "
                           f"{_listing(f['products'][:2])}."])
    if kind == "person":
        _, f, _ = _person(rng, subject=False)
        _, written = _date(rng, 1940, 2005)
        return rng.choice([f"A cousin, {f['name']}, was born on {written} and speaks {_listing(f['languages'])}.",
                           f"Their coach, {f['name']}, is {f['height_cm']} cm tall and grew up in "
                           f"{f['hometown']['city']}."])
    _, f, _ = _product(rng, subject=False)
    _, written = _date(rng, 2005, 2024)
    return rng.choice([f"The older {f['name']} weighed {f['weight_g']} g and cost ${f['price_usd']:,}.",
                       f"A rival model, the {f['name']}, came out on {written} in {_listing(f['colors'])}."])


# fields a request must include at least one of (list / nested) and at least one of (normalised)
STRUCTURED = {"headquarters", "products", "hometown", "languages", "colors"}
NORMALISED = {"founded", "revenue_usd", "employees", "born", "height_cm", "awards", "release_date", "weight_g",
              "battery_hours"}


def _canon(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def extract_example(rng: random.Random, split: str, k: dict, world) -> Record:
    for _try in range(1000):
        kind, fields, facts = rng.choice([_company, _person, _product])(rng)
        keys = list(facts)
        rng.shuffle(keys)
        n_distractors = rng.randint(0, k["distractors"])
        n_own = min(len(keys), max(k["min_fields"], rng.randint(k["min_facts"], k["max_facts"]) - n_distractors))
        chosen = keys[:n_own]
        sentences = [facts[c] for c in chosen]
        # the subject is named first, so that "it" and "the company" have a referent before any distractor
        if fields["name"] not in sentences[0]:
            naming = [i for i, s in enumerate(sentences) if fields["name"] in s]
            if naming:
                sentences.insert(0, sentences.pop(naming[0]))
            else:
                sentences.insert(0, {"company": f"{fields['name']} is a company.",
                                     "person": f"This is a profile of {fields['name']}.",
                                     "product": f"The {fields['name']} is a gadget."}[kind])
        for _ in range(n_distractors):
            sentences.insert(rng.randint(1, len(sentences)), _distractor(rng, kind))
        n_fields = rng.randint(k["min_fields"], min(k["max_fields"], len(chosen)))
        pick = rng.sample(chosen, n_fields)
        if not STRUCTURED & set(pick) or not NORMALISED & set(pick):
            continue
        if rng.random() < 0.2 and len(pick) < k["max_fields"]:
            pick.append("name")
        pick = sorted(pick)
        prompt = f"Extract these fields as JSON: {', '.join(pick)}.\nText: {' '.join(sentences)}"
        return Record(prompt, _canon({f: fields[f] for f in pick}), kind=kind)
    raise RuntimeError("extract: no valid field request in 1000 tries")


# ---- code -----------------------------------------------------------------------------------------------------------
CODE_WORDS = ["planet", "garden", "rocket", "silver", "banana", "window", "puzzle", "meadow", "copper", "lantern",
              "harbor", "velvet", "orbit", "cactus", "marble", "tunnel"]


def _code_loop_branch(rng: random.Random, k: dict) -> tuple[list[str], str]:
    start, n, m, b = rng.randint(0, 20), rng.randint(3, k["max_iter"]), rng.randint(2, 4), rng.randint(1, 5)
    total = start
    for i in range(n):
        if i % m == 0:
            total += i
        else:
            total -= b
    return [f"total = {start}", f"for i in range({n}):", f"    if i % {m} == 0:", "        total += i", "    else:",
            f"        total -= {b}", "print(total)"], str(total)


def _code_func_loop(rng: random.Random, k: dict) -> tuple[list[str], str]:
    t, a, b = rng.randint(3, 9), rng.randint(1, 6), rng.randint(2, 3)
    xs = [rng.randint(0, 12) for _ in range(rng.randint(3, k["max_list"]))]
    name = rng.choice(["f", "adjust", "step", "score"])

    def fn(x: int) -> int:
        return x - a if x > t else x * b

    return [f"def {name}(x):", f"    if x > {t}:", f"        return x - {a}", f"    return x * {b}", "acc = 0",
            f"for v in {xs}:", f"    acc += {name}(v)", "print(acc)"], str(sum(fn(x) for x in xs))


def _code_comprehension(rng: random.Random, k: dict) -> tuple[list[str], str]:
    xs = [rng.randint(0, 15) for _ in range(rng.randint(4, k["max_list"]))]
    mul, par = rng.randint(2, 4), rng.randint(0, 1)
    ys = [x * mul for x in xs if x % 2 == par]
    expr, out = rng.choice([("ys", str(ys)), ("sum(ys)", str(sum(ys))), ("len(ys)", str(len(ys))),
                            ("ys[::-1]", str(ys[::-1]))])
    return [f"xs = {xs}", f"ys = [x * {mul} for x in xs if x % 2 == {par}]", f"print({expr})"], out


def _code_string_ops(rng: random.Random, k: dict) -> tuple[list[str], str]:
    words = rng.sample(CODE_WORDS, rng.randint(2, 4))
    s = " ".join(words)
    sep = rng.choice(["-", "+", ".", ""])
    form, fn = rng.choice([("p[::-1]", lambda p: p[::-1]), ("p[:2]", lambda p: p[:2]), ("p.upper()", str.upper),
                           ("p[-1]", lambda p: p[-1]), ("p[1:4]", lambda p: p[1:4])])
    out = sep.join(fn(p) for p in s.split())
    return [f"s = \"{s}\"", "parts = s.split()", f"out = \"{sep}\".join({form} for p in parts)", "print(out)"], out


def _code_while_steps(rng: random.Random, k: dict) -> tuple[list[str], str]:
    n0, limit = rng.randint(3, 30), rng.randint(2, k["max_iter"])
    n, steps = n0, 0
    while n != 1 and steps < limit:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return [f"n = {n0}", "steps = 0", f"while n != 1 and steps < {limit}:", "    if n % 2 == 0:", "        n = n // 2",
            "    else:", "        n = 3 * n + 1", "    steps += 1", "print(n, steps)"], f"{n} {steps}"


def _code_dict_count(rng: random.Random, k: dict) -> tuple[list[str], str]:
    s = rng.choice(CODE_WORDS) + rng.choice(CODE_WORDS)
    counts: dict[str, int] = {}
    for ch in s:
        counts[ch] = counts.get(ch, 0) + 1
    ch = rng.choice(sorted(counts))
    expr, out = rng.choice([(f"counts[\"{ch}\"]", str(counts[ch])), ("len(counts)", str(len(counts))),
                            ("max(counts.values())", str(max(counts.values())))])
    return [f"s = \"{s}\"", "counts = {}", "for ch in s:", "    counts[ch] = counts.get(ch, 0) + 1",
            f"print({expr})"], out


def _code_nested(rng: random.Random, k: dict) -> tuple[list[str], str]:
    a, b, m = rng.randint(2, k["max_iter"]), rng.randint(2, k["max_iter"]), rng.randint(2, 4)
    count = sum(1 for i in range(a) for j in range(b) if (i + j) % m == 0)
    return ["count = 0", f"for i in range({a}):", f"    for j in range({b}):", f"        if (i + j) % {m} == 0:",
            "            count += 1", "print(count)"], str(count)


def _code_list_methods(rng: random.Random, k: dict) -> tuple[list[str], str]:
    xs = [rng.randint(0, 20) for _ in range(rng.randint(3, k["max_list"]))]
    v = rng.randint(0, 20)
    ys = sorted(xs + [v])
    lines = [f"xs = {xs}", f"xs.append({v})", "xs.sort()"]
    if rng.random() < 0.5:
        lines.append("xs.pop(0)")
        ys = ys[1:]
    else:
        lines.append("xs.reverse()")
        ys = ys[::-1]
    expr, out = rng.choice([("xs[:3]", str(ys[:3])), ("xs[-1]", str(ys[-1])), ("xs", str(ys))])
    return lines + [f"print({expr})"], out


def _code_string_build(rng: random.Random, k: dict) -> tuple[list[str], str]:
    word = rng.choice(CODE_WORDS)
    m = rng.randint(2, 3)
    out = "".join(ch.upper() if i % m == 0 else ch for i, ch in enumerate(word))
    return [f"word = \"{word}\"", "out = \"\"", "for i, ch in enumerate(word):", f"    if i % {m} == 0:",
            "        out += ch.upper()", "    else:", "        out += ch", "print(out)"], out


def _code_running_max(rng: random.Random, k: dict) -> tuple[list[str], str]:
    xs = [rng.randint(-9, 30) for _ in range(rng.randint(4, k["max_list"]))]
    d = rng.randint(2, 5)
    best, hits = None, 0
    for x in xs:
        if x % d == 0:
            hits += 1
            if best is None or x > best:
                best = x
    return [f"xs = {xs}", "best = None", "hits = 0", "for x in xs:", f"    if x % {d} == 0:", "        hits += 1",
            "        if best is None or x > best:", "            best = x", "print(best, hits)"], f"{best} {hits}"


CODE_TEMPLATES: dict[str, Callable[[random.Random, dict], tuple[list[str], str]]] = {
    "loop_branch": _code_loop_branch, "func_loop": _code_func_loop, "comprehension": _code_comprehension,
    "string_ops": _code_string_ops, "while_steps": _code_while_steps, "dict_count": _code_dict_count,
    "nested": _code_nested, "list_methods": _code_list_methods, "string_build": _code_string_build,
    "running_max": _code_running_max,
}


def code_example(rng: random.Random, split: str, k: dict, world) -> Record:
    name = rng.choice(k["templates"].split(","))
    lines, out = CODE_TEMPLATES[name](rng, k)
    return Record("What does this Python program print?\n\n" + "\n".join(lines), out, kind=name)


# ---- classify -------------------------------------------------------------------------------------------------------
# label = LABELS[family][issue][plan]; product names carry no hint of their family: the model must learn them
PRODUCT_FAMILY = {"Brisk": 0, "Ovan": 0, "Kettu": 0, "Marl": 0, "Pexa": 1, "Sorrel": 1, "Tivo": 1, "Quell": 1}
LABELS = [[["VEXOR", "MALTIS"], ["ORRIN", "PELLAQ"]], [["QUIRE", "SOLVAN"], ["TANDOR", "ZEPHIL"]]]
CLASSIFY_LABELS = sorted(lab for fam in LABELS for iss in fam for lab in iss)
ISSUE_SENTENCES = [
    ["I was charged twice for my {p} this month.", "The invoice for the {p} shows a fee I never agreed to.",
     "My card was billed for a {p} subscription I cancelled.", "The refund for the {p} still has not arrived.",
     "Your billing page lists two payments for the {p}."],
    ["My {p} stopped working yesterday.", "The {p} keeps restarting every few minutes.",
     "Since the update my {p} will not turn on.", "The {p} shows a red light and does nothing.",
     "The {p} disconnects all the time and loses its settings."],
]
PLAN_SENTENCES = [
    ["I am on the basic plan.", "My account is a free one.", "We only have the starter plan.",
     "(Account type: basic.)"],
    ["I pay for the premium plan.", "Our account is on the premium tier.", "We are premium customers.",
     "(Account type: premium.)"],
]
DISTRACTORS = [
    "I hope you are having a good week.", "We moved to a new flat in {m}, so the address on file may be old.",
    "My neighbour {n} recommended your shop years ago.", "The weather here has been awful, so I am home a lot.",
    "I tried to call but the line was busy for an hour.", "Please reply by email rather than phone.",
    "I have been a customer since {y}.", "My order number should be somewhere in your system.",
    "I read the help pages but they did not answer my question.", "My daughter set everything up for me.",
    "We also have two cats, which is why I mention cables.", "I am writing from my work computer.",
    "The box arrived a bit damaged, but that is not the point.", "Thanks in advance for your patience.",
    "Last year I wrote to you about something else and it was solved quickly.",
    "I am travelling to {c} next week and would like this fixed before then.",
    "Your website says this can take up to three days.", "I have attached nothing, since I could not find the file.",
    "Everyone in the house uses the internet for school and work.", "I would rate your shop highly otherwise.",
    "It was a present from {n}.", "The manual is in a drawer somewhere.",
    "Kind regards to the whole team.", "I noticed a spelling mistake on your home page, by the way.",
    "We live on the third floor of an old building.", "My colleague {n} had a similar question in {m}.",
    "I tried switching it off and on again, as everyone suggests.", "Nothing else in the house has changed.",
]
OTHER_PRODUCT = ["I also own a {q}, which works perfectly.", "The {q} we bought in {y} has never given any trouble.",
                 "My {q} is fine, this is not about it.", "We once returned a {q}, but that was years ago."]
OPENERS = ["Subject: help needed\n\nHello,", "Ticket #{t}\n\nHi support,", "Dear team,", "To whom it may concern,",
           "Incident report {t}\n\nSummary from the customer:"]
CLOSERS = ["Best wishes,\n{n}", "Thanks,\n{n}", "Regards,\n{n} {s}", "-- {n}"]


def classify_example(rng: random.Random, split: str, k: dict, world) -> Record:
    product = rng.choice(sorted(PRODUCT_FAMILY))
    fam = PRODUCT_FAMILY[product]
    issue, plan = rng.randint(0, 1), rng.randint(0, 1)

    def fill(s: str) -> str:
        return s.format(p=product, n=rng.choice(NAMES), m=rng.choice(MONTHS), y=rng.randint(2009, 2023),
                        c=rng.choice(CITIES)[0], t=rng.randint(10000, 99999),
                        q=rng.choice([x for x in PRODUCT_FAMILY if PRODUCT_FAMILY[x] != fam]), s=rng.choice(SURNAMES))

    issue_s = rng.choice(ISSUE_SENTENCES[issue])
    key = [fill(issue_s), fill(rng.choice(PLAN_SENTENCES[plan]))]
    apart = rng.random() < 0.5
    if apart:  # the product named apart from the problem: the rule needs both sentences
        key = [fill(f"I am writing about my {product}."), issue_s.format(p="device"), key[1]]
    # word budget: SmolLM2's tokenizer gives about 1.2 tokens per word on these documents (tasks.py --lengths
    # measures the documents: 150-350 tokens)
    target_words = int(rng.randint(k["min_tokens"], k["max_tokens"]) / 1.2)
    body: list[str] = list(key)
    pool = list(DISTRACTORS)
    rng.shuffle(pool)
    other = rng.random() < k["other_product_rate"]
    if other:
        body.insert(rng.randint(0, len(body)), fill(rng.choice(OTHER_PRODUCT)))
    opener, closer = fill(rng.choice(OPENERS)), fill(rng.choice(CLOSERS))
    words = sum(len(s.split()) for s in body) + len(opener.split()) + len(closer.split())
    for s in pool:
        s = fill(s)
        if words + len(s.split()) > target_words:
            break
        body.insert(rng.randint(0, len(body)), s)
        words += len(s.split())
    # the plan sentence reads naturally last (a postscript) in half of the documents: facts far apart
    if rng.random() < 0.5:
        plan_s = key[-1]
        body.remove(plan_s)
        body.append("P.S. " + plan_s)
    doc = f"{opener}\n\n{' '.join(body)}\n\n{closer}"
    prompt = f"Label this message with one of: {', '.join(CLASSIFY_LABELS)}.\n\n{doc}"
    kind = ("product named apart" if apart else "product in the problem") + (", other product" if other else "")
    return Record(prompt, LABELS[fam][issue][plan], kind=kind)


# ---- chat -----------------------------------------------------------------------------------------------------------
# every attribute has three answer wordings (drawn 60/25/15%), four training phrasings of the question and two
# held-out ones (test and dev only)
SYLLABLES = ["va", "mor", "tel", "quen", "bri", "sa", "dor", "lum", "ka", "rin", "zel", "oth", "pra", "nim", "eth",
             "gal", "fen", "ulm", "cor", "ysa", "thal", "vik", "bel", "ro"]
REGIONS = ["the Ashen Coast", "the Glass Hills", "the Low Marsh", "the Northern Reach", "the Copper Valley",
           "the Salt Flats", "the Amber Woods", "the Grey Isles"]
FOODS = ["river snails", "moon berries", "pine seeds", "glow moths", "salt kelp", "honey roots", "frost beetles",
         "wild figs"]
CREATURE_COLORS = ["violet", "copper", "pale green", "ink blue", "silver", "rust red", "amber", "white"]
SOUNDS = ["a low hum", "a sharp whistle", "three short clicks", "a soft chime", "a deep croak", "a long trill"]
GOODS = ["blue glass", "wool blankets", "copper bells", "smoked fish", "paper lanterns", "salt candy", "clay pipes",
         "silk rope"]
INSTRUMENTS = ["the lute", "the bone flute", "the hand drum", "the glass harp", "the fiddle", "the reed horn"]
TRADES = ["a cartographer", "a beekeeper", "a lighthouse keeper", "a glassblower", "a ferry pilot", "a herbalist",
          "a clockmaker", "a stonemason"]

# attribute -> (noun phrase for questions, answer templates {e} entity {v} value, train phrasings, held-out phrasings)
CHAT_SCHEMA: dict[str, dict[str, tuple]] = {
    "creature": {
        "habitat": (["The {e} lives in {v}.", "You can find the {e} in {v}.", "{v} is home to the {e}."],
                    ["Where does the {e} live?", "Where can I find a {e}?", "What is the habitat of the {e}?",
                     "Where is the {e} found?"],
                    ["In which part of the world would I meet a {e}?", "Which region does the {e} call home?"]),
        "color": (["The {e} is {v}.", "A {e} has {v} fur.", "Its coat is {v}, so the {e} is easy to spot."],
                  ["What color is the {e}?", "What does the {e} look like?", "What is the {e}'s coat like?",
                   "Describe the color of a {e}."],
                  ["If I saw a {e}, what color would it be?", "Tell me the shade of the {e}'s fur."]),
        "diet": (["The {e} eats {v}.", "Its favourite food is {v}.", "A {e} feeds mostly on {v}."],
                 ["What does the {e} eat?", "What is the diet of the {e}?", "What food does a {e} like?",
                  "How does the {e} feed?"],
                 ["What would I need to feed a {e}?", "Which food keeps a {e} alive?"]),
        "lifespan": (["The {e} lives for about {v} years.", "A {e} can reach {v} years of age.",
                      "Its lifespan is around {v} years."],
                     ["How long does the {e} live?", "What is the lifespan of a {e}?", "How old can a {e} get?",
                      "How many years does a {e} live?"],
                     ["For how many years does a {e} usually survive?", "What age does a {e} typically reach?"]),
        "call": (["The {e} makes {v}.", "Its call is {v}.", "You will hear {v} when a {e} is near."],
                 ["What sound does the {e} make?", "What is the call of the {e}?", "How does a {e} sound?",
                  "What noise does the {e} make?"],
                 ["How would I recognise a {e} by ear?", "What does a {e} sound like at night?"]),
    },
    "town": {
        "region": (["{e} lies in {v}.", "The town of {e} is in {v}.", "{e} is a town of {v}."],
                   ["Where is {e}?", "In which region is {e}?", "Where is the town of {e}?",
                    "Which region is {e} in?"],
                   ["Where would I have to travel to visit {e}?", "Which part of the land holds the town of {e}?"]),
        "founded": (["{e} was founded in the year {v}.", "The town of {e} dates from {v}.",
                     "People settled {e} in {v}."],
                    ["When was {e} founded?", "How old is {e}?", "In which year was {e} founded?",
                     "When did people settle {e}?"],
                    ["What is the founding year of {e}?", "Since what year has {e} existed?"]),
        "goods": (["{e} is known for its {v}.", "The town of {e} makes {v}.", "{v} are the pride of {e}."],
                  ["What is {e} known for?", "What does {e} make?", "What is {e} famous for?",
                   "What do people buy in {e}?"],
                  ["Which goods should I bring home from {e}?", "What is the best-known product of {e}?"]),
        "mayor": (["The mayor of {e} is {v}.", "{v} runs the town of {e}.", "{e} is led by {v}."],
                  ["Who is the mayor of {e}?", "Who runs {e}?", "Who leads the town of {e}?",
                   "Who is in charge of {e}?"],
                  ["Whom should I ask for if I want to speak to the head of {e}?", "Who governs {e}?"]),
        "population": (["About {v} people live in {e}.", "{e} has a population of around {v}.",
                        "Roughly {v} people call {e} home."],
                       ["How many people live in {e}?", "What is the population of {e}?", "How big is {e}?",
                        "How many inhabitants does {e} have?"],
                       ["How crowded is {e}, in number of people?", "What is the headcount of {e}?"]),
    },
    "person": {
        "trade": (["{e} is {v}.", "{e} works as {v}.", "By trade, {e} is {v}."],
                  ["What does {e} do?", "What is {e}'s job?", "What is the profession of {e}?",
                   "How does {e} earn a living?"],
                  ["What kind of work is {e} known for?", "What is {e}'s line of work?"]),
        "home": (["{e} lives in {v}.", "{e}'s home is in {v}.", "{e} has a house in {v}."],
                 ["Where does {e} live?", "Where is {e}'s home?", "Where can I find {e}?",
                  "In which town does {e} live?"],
                 ["Which town would I visit to meet {e}?", "Where has {e} settled?"]),
        "instrument": (["{e} plays {v}.", "{e}'s instrument is {v}.", "In the evenings {e} plays {v}."],
                       ["What instrument does {e} play?", "Does {e} play music?", "Which instrument is {e}'s?",
                        "What does {e} play?"],
                       ["Which instrument would I hear {e} playing?", "What music does {e} make, and on what?"]),
        "pet": (["{e} keeps a {v} as a pet.", "{e}'s pet is a {v}.", "A {v} lives with {e}."],
                ["Does {e} have a pet?", "What pet does {e} keep?", "What animal lives with {e}?",
                 "What is {e}'s pet?"],
                ["Which creature shares a home with {e}?", "What kind of animal does {e} look after?"]),
        "age": (["{e} is {v} years old.", "{e} turned {v} this spring.", "{e} is {v}."],
                ["How old is {e}?", "What is {e}'s age?", "What age is {e}?", "When was {e} born, roughly?"],
                ["How many years has {e} lived?", "Tell me how old {e} is."]),
        "color": (["{e}'s favourite color is {v}.", "{e} likes {v} best.", "{e} always wears something {v}."],
                  ["What is {e}'s favourite color?", "Which color does {e} like?", "What color does {e} prefer?",
                   "Does {e} have a favourite color?"],
                  ["Which color would make a good present for {e}?", "What shade does {e} love most?"]),
    },
}


def _name(rng: random.Random, used: set[str], parts: int) -> str:
    while True:
        n = "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()
        if n not in used and len(n) >= 4:
            used.add(n)
            return n


def chat_world(k: dict) -> list[dict]:
    """The knowledge base: entities (kind, name, attributes), the same for every split."""
    rng = random.Random(WORLD_SEED)
    used: set[str] = set()
    n = k["entities"]
    kinds = ["creature", "town", "person"]
    towns: list[str] = []
    creatures: list[str] = []
    world = []
    for i in range(n):
        kind = kinds[i % 3]
        if kind == "creature":
            name = _name(rng, used, 2).lower()
            creatures.append(name)
            attrs = {"habitat": rng.choice(REGIONS), "color": rng.choice(CREATURE_COLORS), "diet": rng.choice(FOODS),
                     "lifespan": str(rng.randint(3, 90)), "call": rng.choice(SOUNDS)}
        elif kind == "town":
            name = _name(rng, used, 3)
            towns.append(name)
            attrs = {"region": rng.choice(REGIONS), "founded": str(rng.randint(900, 1890)),
                     "goods": rng.choice(GOODS), "mayor": f"{_name(rng, used, 2)} {_name(rng, used, 2)}",
                     "population": f"{rng.randint(2, 95) * 100:,}"}
        else:
            name = f"{_name(rng, used, 2)} {_name(rng, used, 3)}"
            attrs = {"trade": rng.choice(TRADES), "home": rng.choice(towns) if towns else "Velmora",
                     "instrument": rng.choice(INSTRUMENTS), "pet": rng.choice(creatures) if creatures else "morva",
                     "age": str(rng.randint(19, 88)), "color": rng.choice(CREATURE_COLORS)}
        # 5-6 attributes (the name and kind make 7-8 facts per entity)
        if len(attrs) > 5 and rng.random() < 0.3:
            attrs.pop(rng.choice(sorted(attrs)))
        # which other attributes an answer about each attribute adds (0-2, fixed per entity and attribute): the
        # content of an answer is a function of the question's subject, only its wording varies
        extras = {}
        for a in sorted(attrs):
            others = [o for o in sorted(attrs) if o != a]
            rng.shuffle(others)
            n_extra = (0 if rng.random() >= k["second_sentence_rate"] else
                       2 if rng.random() < k["third_sentence_rate"] else 1)
            extras[a] = others[:n_extra]
        world.append({"kind": kind, "name": name, "attrs": attrs, "extras": extras})
    return world


TEMPLATE_WEIGHTS = (0.6, 0.25, 0.15)  # a clear favourite wording, so the fine-tune's greedy answer is not a coin toss


def _sentence(rng: random.Random, kind: str, attr: str, name: str, value: str) -> str:
    s = rng.choices(CHAT_SCHEMA[kind][attr][0], weights=TEMPLATE_WEIGHTS)[0].format(e=name, v=value)
    return s[0].upper() + s[1:]


def chat_example(rng: random.Random, split: str, k: dict, world: list[dict]) -> Record:
    ent = rng.choice(world)
    attr = rng.choice(sorted(ent["attrs"]))
    kind, name = ent["kind"], ent["name"]
    answers, train_q, heldout_q = CHAT_SCHEMA[kind][attr]
    question = rng.choice(train_q if split == "train" else heldout_q).format(e=name)
    question = question[0].upper() + question[1:]
    sentences = [_sentence(rng, kind, a, name, ent["attrs"][a]) for a in [attr, *ent["extras"][attr]]]
    return Record(question, " ".join(sentences), (ent["attrs"][attr],), kind=kind)


# ---- registry, knobs, splits ----------------------------------------------------------------------------------------
GENERATORS: dict[str, Callable] = {
    "arithmetic": arithmetic_example, "strings": strings_example, "extract": extract_example, "code": code_example,
    "classify": classify_example, "chat": chat_example,
}
WORLDS: dict[str, Callable[[dict], object]] = {"chat": chat_world}
SCORING = {t: ("self" if t == "chat" else "exact") for t in TASKS}  # self: against the fine-tune's greedy answer
CHAT_MAX_NEW_TOKENS = 64


def parse_knobs(items: list[str] | str | None) -> dict[str, dict]:
    """'task.key=value' strings (or one comma-separated string) -> {task: {key: value}}, typed like the default.
    An unknown task or knob is an error."""
    if isinstance(items, str):
        items = [s for s in items.split(",") if s.strip()] if "=" in items else []
    out: dict[str, dict] = {}
    for item in items or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"knob {item!r} is not task.key=value")
        lhs, value = item.split("=", 1)
        task, key = lhs.strip().split(".", 1)
        if task not in KNOBS or key not in KNOBS[task]:
            raise ValueError(f"unknown knob {lhs!r}; knobs: "
                             + ", ".join(f"{t}.{kk}" for t in KNOBS for kk in KNOBS[t]))
        default = KNOBS[task][key]
        typed = (type(default)(value) if not isinstance(default, str) else value.replace(";", ","))
        out.setdefault(task, {})[key] = typed
    return out


def task_knobs(task: str, overrides: dict | None = None) -> dict:
    return {**KNOBS[task], **(overrides or {}).get(task, {})}


def make_splits(task: str, n_train: int | None = None, n_dev: int = 128, n_test: int = 512,
                knobs: dict | None = None) -> dict[str, list[Record]]:
    """Deterministic train/dev/test lists for `task` (see the module docstring for what is disjoint)."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    k = task_knobs(task, knobs)
    world = WORLDS[task](k) if task in WORLDS else None
    gen = GENERATORS[task]
    n_train = N_TRAIN[task] if n_train is None else n_train
    held_prompts: set[str] = set()
    out: dict[str, list[Record]] = {}
    for split, n in (("test", n_test), ("dev", n_dev), ("train", n_train)):
        rng = random.Random(SPLIT_SEEDS[split] * 100 + TASK_SALT[task])
        recs: list[Record] = []
        seen: set = set()
        tries = 0
        while len(recs) < n:
            tries += 1
            if tries > 50 * n + 1000:
                raise RuntimeError(f"{task}: cannot draw {n} distinct {split} records (knobs {k})")
            r = gen(rng, split, k, world)
            if r.prompt in held_prompts:
                continue
            key = (r.prompt, r.answer) if split == "train" else r.prompt
            if key in seen:
                continue
            seen.add(key)
            recs.append(r)
        if split != "train":
            held_prompts.update(r.prompt for r in recs)
        out[split] = recs
    return out


def write_jsonl(path: Path, records: list[Record]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text("".join(json.dumps(r.as_dict(), ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)
    return path


def token_lengths(tokenizer, tasks: list[str], n: int = 512, knobs: dict | None = None) -> dict:
    """Prompt (chat template applied, as trained and scored) and completion (answer + end-of-turn) token counts of
    the first `n` test records of each task, with the real tokenizer."""
    from deltapack.eval.tasks import Example, encode_example, use_chat

    chat = use_chat(tokenizer, None)
    out = {}
    for t in tasks:
        recs = make_splits(t, n_train=0, n_test=n, knobs=knobs)["test"]
        pairs = [encode_example(tokenizer, Example(r.prompt, r.answer), chat) for r in recs]
        p = sorted(len(a) for a, _ in pairs)
        c = sorted(len(b) for _, b in pairs)

        def stats(xs: list[int]) -> dict:
            return {"min": xs[0], "p50": xs[len(xs) // 2], "p95": xs[int(len(xs) * 0.95)], "max": xs[-1],
                    "mean": round(statistics.fmean(xs), 1)}

        out[t] = {"prompt": stats(p), "answer": stats(c), "n": len(recs),
                  # classify's 150-350-token range is about the document, without the instruction and template
                  **({"document": stats(sorted(len(tokenizer(r.prompt.split("\n\n", 1)[1])["input_ids"])
                                               for r in recs))} if t == "classify" else {}),
                  "distinct_answers": len({r.answer for r in recs}),
                  "most_common_answer_share": round(Counter(r.answer for r in recs).most_common(1)[0][1] / len(recs), 3)}
    return out


def lengths_markdown(lengths: dict) -> str:
    lines = ["| task | held out | prompt tokens (chat template included) p50 / p95 / max | answer tokens (incl. end "
             "of turn) p50 / p95 / max | distinct answers in test | most common answer's share |",
             "|---|---|---|---|---|---|"]
    for t, v in lengths.items():
        p, a = v["prompt"], v["answer"]
        doc = f" (document {v['document']['min']}-{v['document']['max']})" if "document" in v else ""
        lines.append(f"| {t} | {'yes' if t in HELDOUT else 'no'} | {p['p50']} / {p['p95']} / {p['max']}{doc} | "
                     f"{a['p50']} / {a['p95']} / {a['max']} | {v['distinct_answers']} of {v['n']} | "
                     f"{v['most_common_answer_share']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write {task}-{split}.jsonl here")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--n-train", type=int, default=None, help="default: per task (N_TRAIN)")
    ap.add_argument("--n-dev", type=int, default=128)
    ap.add_argument("--n-test", type=int, default=512)
    ap.add_argument("--knob", action="append", default=[], help="task.key=value (repeatable), see KNOBS")
    ap.add_argument("--lengths", type=Path, default=None,
                    help="write token lengths (real SmolLM2 tokenizer) of the test splits to this JSON (+ .md)")
    ap.add_argument("--show", type=int, default=0, help="print this many test records per task")
    args = ap.parse_args(argv)
    knobs = parse_knobs(args.knob)
    tasks = [t for t in args.tasks.split(",") if t]
    for t in tasks:
        if t not in TASKS:
            ap.error(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    if args.out:
        for task in tasks:
            splits = make_splits(task, args.n_train, args.n_dev, args.n_test, knobs)
            for split, recs in splits.items():
                p = write_jsonl(args.out / f"{task}-{split}.jsonl", recs)
                print(f"{p}: {len(recs)} records")
    if args.show:
        for task in tasks:
            for r in make_splits(task, 0, 0, args.show, knobs)["test"]:
                print(f"--- {task}\n{r.prompt}\n>>> {r.answer}")
    if args.lengths:
        from transformers import AutoTokenizer

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import embedded_base_dir, write_json

        tok = AutoTokenizer.from_pretrained(str(embedded_base_dir()))
        lengths = token_lengths(tok, tasks, args.n_test, knobs)
        write_json(args.lengths, {"command": " ".join(["python", *sys.argv]), "tokenizer": "SmolLM2-135M-Instruct",
                                  "knobs": {t: task_knobs(t, knobs) for t in tasks}, "lengths": lengths})
        md = lengths_markdown(lengths)
        args.lengths.with_suffix(".md").write_text(md)
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
