"""The quality benchmark's non-GPU logic (issue 24): the six task generators (determinism, disjoint splits, answers
checked by independent means: the `code` programs are executed here, and only here; the other families' prompts are
parsed back and solved), the evaluation's scoring helpers and job plan, and the report (merge, worst task,
intervals, generated blocks, and --check against the committed files so that CI fails when they drift)."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import sys
from pathlib import Path

import pytest

QUALITY = Path(__file__).resolve().parents[1] / "bench" / "quality"


@pytest.fixture(scope="module")
def q():
    """The bench/quality modules (they import their siblings by name)."""
    sys.path.insert(0, str(QUALITY))
    try:
        mods = {name: importlib.import_module(name) for name in ("tasks", "common", "eval_task", "report")}
    finally:
        sys.path.remove(str(QUALITY))
    return type("Q", (), mods)


SMALL = dict(n_train=400, n_dev=32, n_test=96)


# ---- generators -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["arithmetic", "strings", "extract", "code", "classify", "chat"])
def test_splits_are_deterministic_and_disjoint(q, task):
    a = q.tasks.make_splits(task, **SMALL)
    b = q.tasks.make_splits(task, **SMALL)
    assert a == b
    assert [len(a[s]) for s in ("train", "dev", "test")] == [400, 32, 96]
    test, dev = {r.prompt for r in a["test"]}, {r.prompt for r in a["dev"]}
    assert len(test) == 96 and len(dev) == 32 and not test & dev
    assert not {r.prompt for r in a["train"]} & (test | dev)  # no test or dev prompt is ever trained on
    assert len({(r.prompt, r.answer) for r in a["train"]}) == 400
    # the test split does not depend on how much training data is drawn after it
    assert q.tasks.make_splits(task, n_train=50, n_dev=32, n_test=96)["test"] == a["test"]
    assert all(r.answer and r.answer == r.answer.strip() for s in a.values() for r in s)


def test_full_size_splits_generate_in_seconds(q):
    import time

    t0 = time.perf_counter()
    s = q.tasks.make_splits("arithmetic")
    assert len(s["test"]) == 512 and len(s["dev"]) == 128 and len(s["train"]) == q.tasks.N_TRAIN["arithmetic"]
    assert time.perf_counter() - t0 < 30  # ~0.4 s on an idle core


def test_code_programs_print_what_the_generator_says(q):
    """The generator computes the output itself; here (and nowhere else) the program is run to check it."""
    recs = q.tasks.make_splits("code", n_train=600, n_dev=0, n_test=200)
    seen_templates = set()
    for r in recs["test"] + recs["train"]:
        program = r.prompt.split("\n\n", 1)[1]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(program, "<generated>", "exec"), {})  # noqa: S102 - the test's own generated programs
        assert out.getvalue().rstrip("\n") == r.answer, program
        seen_templates.add(program.splitlines()[0].split(" ")[0])
    assert len(seen_templates) >= 6  # many templates, not one


_ARITH = [
    (r"(\w+) has (\d+) \w+", lambda v, a: int(a[1])),
    (r"\w+ buys (\d+) \w+ with (\d+) \w+ in each", lambda v, a: v + int(a[0]) * int(a[1])),
    (r"(?:\w+ buys|Then \w+ finds|\w+ wins) (\d+)", lambda v, a: v + int(a[0])),
    (r"A friend gives \w+ (\d+)", lambda v, a: v + int(a[0])),
    (r"\w+ (?:sells|gives) (\d+)% of them", lambda v, a: v - v * int(a[0]) // 100),
    (r"\w+ gets (\d+)% more", lambda v, a: v + v * int(a[0]) // 100),
    (r"\w+ (?:gives away|loses|sells|uses) (\d+)", lambda v, a: v - int(a[0])),
    (r"\w+'s pile of \w+ (?:doubles|grows to twice its size)", lambda v, a: v * 2),
    (r"\w+'s pile of \w+ triples", lambda v, a: v * 3),
    (r"\w+ puts the \w+ into bags of (\d+)", lambda v, a: v - v % int(a[0])),
    (r"\w+ splits them into (\d+) equal piles", lambda v, a: v // int(a[0])),
]


def _solve_arithmetic(prompt: str) -> tuple[int, int]:
    """Read the story back sentence by sentence: (final count, number of steps after the first sentence)."""
    sentences = [s for s in re.split(r"(?<=\.) ", prompt) if not s.startswith("How many")]
    v, steps = None, -1
    for s in sentences:
        for pattern, apply in _ARITH:
            m = re.match(pattern, s)
            if m:
                v = apply(v, m.groups())
                steps += 1
                break
        else:
            raise AssertionError(f"unparsed sentence {s!r}")
    return v, steps


def test_arithmetic_answers_solve_the_story(q):
    recs = q.tasks.make_splits("arithmetic", n_train=1000, n_dev=0, n_test=300)
    kinds = set()
    for r in recs["test"] + recs["train"]:
        v, steps = _solve_arithmetic(r.prompt)
        assert str(v) == r.answer, r.prompt
        assert 3 <= steps <= 5 and 0 <= v <= q.tasks.KNOBS["arithmetic"]["max_value"]
        assert r.kind == f"{steps} steps"
        kinds |= {k for k in ("%", "piles", "bags of", "in each", "triples") if k in r.prompt}
    assert kinds == {"%", "piles", "bags of", "in each", "triples"}  # every mixed operation occurs
    # difficulty is a knob: three steps exactly
    for r in q.tasks.make_splits("arithmetic", 0, 0, 50, knobs=q.tasks.parse_knobs(["arithmetic.max_steps=3"]))["test"]:
        assert _solve_arithmetic(r.prompt)[1] == 3


def _solve_strings(prompt: str) -> str:
    head, steps_line = prompt.split("\n")[:2]
    words = head.removeprefix("Words: ").split(", ")
    body = steps_line.removeprefix("Steps: ")[:-1]  # the final "."
    steps = [re.sub(r"^\d+\. ", "", s) for s in re.split(r"; (?=\d+\. )", body)]
    assert 2 <= len(steps) <= 3
    cur = words
    for s in steps:
        if s.startswith("reverse"):
            cur = cur[::-1]
        elif s == "sort the words alphabetically, ignoring case":
            cur = sorted(cur, key=lambda w: (w.lower(), w))
        elif s.startswith("sort the words in reverse"):
            cur = sorted(cur, key=lambda w: (w.lower(), w), reverse=True)
        elif m := re.fullmatch(r"keep only the words (longer|shorter) than (\d) letters", s):
            n = int(m[2])
            cur = [w for w in cur if (len(w) > n if m[1] == "longer" else len(w) < n)]
        elif m := re.fullmatch(r"keep only the words that contain the letter '(\w)'", s):
            cur = [w for w in cur if m[1] in w.lower()]
        elif s == "keep only the words that start with a letter from a to m":
            cur = [w for w in cur if "a" <= w[0].lower() <= "m"]
        elif s.startswith(("remove repeated", "drop duplicates")):
            cur = list(dict.fromkeys(cur))
        elif m := re.fullmatch(r"keep every (second|third) word, starting with the first", s):
            cur = cur[:: 2 if m[1] == "second" else 3]
        elif m := re.fullmatch(r"keep the (first|last) (\d) words", s):
            cur = cur[: int(m[2])] if m[1] == "first" else cur[-int(m[2]):]
        elif s == "write every word in capital letters":
            cur = [w.upper() for w in cur]
        elif s == "write every word in lower case":
            cur = [w.lower() for w in cur]
        elif m := re.fullmatch(r"join the words with '(.+)'", s):
            return m[1].join(cur)
        elif s == "count the words that are left":
            return str(len(cur))
        else:
            raise AssertionError(f"unparsed step {s!r}")
    assert prompt.endswith('Answer with the words separated by ", ".')
    return ", ".join(cur)


def test_strings_answers_follow_the_steps(q):
    recs = q.tasks.make_splits("strings", n_train=1000, n_dev=0, n_test=300)
    for r in recs["test"] + recs["train"]:
        assert _solve_strings(r.prompt) == r.answer, r.prompt


def test_extract_answers_are_canonical_and_grounded(q):
    for r in q.tasks.make_splits("extract", n_train=0, n_dev=0, n_test=300)["test"]:
        fields = r.prompt.split("\n")[0].removeprefix("Extract these fields as JSON: ").rstrip(".").split(", ")
        text = r.prompt.split("\nText: ", 1)[1]
        obj = json.loads(r.answer)
        assert sorted(obj) == sorted(fields) and 3 <= len(fields) <= 5
        assert r.answer == json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert set(fields) & q.tasks.STRUCTURED and set(fields) & q.tasks.NORMALISED
        sentences = len(re.findall(r"[.)] (?=[A-Z])", text)) + 1
        assert 5 <= sentences <= 11  # 6-9 facts, some sentences hold two, the subject is named first
        for key, value in obj.items():
            if isinstance(value, list):
                assert all(v in text for v in value)
            elif isinstance(value, dict):
                assert value["city"] in text and value["country"] in text
            elif key in ("founded", "born", "release_date"):
                y, m, d = value.split("-")
                assert y in text and (value in text or q.tasks.MONTHS[int(m) - 1] in text)
            elif isinstance(value, str):
                assert value in text


def test_classify_label_follows_the_rule(q):
    tasks = q.tasks
    for r in tasks.make_splits("classify", n_train=0, n_dev=0, n_test=300)["test"]:
        doc = r.prompt.split("\n\n", 1)[1]
        named = re.search(r"I am writing about my (\w+)\.", doc)
        issue = next(i for i, group in enumerate(tasks.ISSUE_SENTENCES)
                     for s in group if re.search(re.escape(s.format(p="PRODUCT")).replace("PRODUCT", r"(\w+)"), doc))
        product = named[1] if named else next(
            m[1] for s in tasks.ISSUE_SENTENCES[issue]
            if (m := re.search(re.escape(s.format(p="PRODUCT")).replace("PRODUCT", r"(\w+)"), doc)))
        plan = next(i for i, group in enumerate(tasks.PLAN_SENTENCES) for s in group if s in doc)
        assert r.answer == tasks.LABELS[tasks.PRODUCT_FAMILY[product]][issue][plan]
        assert 110 <= len(doc.split()) <= 300  # ~150-350 tokens (measured with the real tokenizer: --lengths)
    assert len(tasks.CLASSIFY_LABELS) == 8


def test_chat_questions_are_new_phrasings_about_trained_entities(q):
    tasks = q.tasks
    world = tasks.chat_world(tasks.KNOBS["chat"])
    assert len(world) == 96 and all(5 <= len(e["attrs"]) <= 6 for e in world)
    splits = tasks.make_splits("chat", n_train=4000, n_dev=32, n_test=200)
    by_name = {e["name"]: e for e in world}

    def template(prompt: str) -> tuple[str, str]:
        name = next(n for n in sorted(by_name, key=len, reverse=True) if n in prompt)
        return name, prompt.replace(name, "{e}")

    held = {t for kind in tasks.CHAT_SCHEMA.values() for (_, _, h) in kind.values() for t in h}
    trained = {t for kind in tasks.CHAT_SCHEMA.values() for (_, tr, _) in kind.values() for t in tr}
    assert not held & trained
    train_entities = set()
    for r in splits["train"]:
        name, t = template(r.prompt)
        assert t[0].lower() + t[1:] in trained or t in trained
        train_entities.add(name)
    for r in splits["test"] + splits["dev"]:
        name, t = template(r.prompt)
        assert t in held or t[0].lower() + t[1:] in held
        assert name in train_entities
        assert r.facts and all(f.lower() in r.answer.lower() for f in r.facts)
        assert 1 <= r.answer.count(". ") + 1 <= 3


def test_knobs_are_typed_and_checked(q):
    k = q.tasks.parse_knobs(["arithmetic.max_steps=4", "classify.other_product_rate=0.1", "code.templates=nested;func_loop"])
    assert k == {"arithmetic": {"max_steps": 4}, "classify": {"other_product_rate": 0.1},
                 "code": {"templates": "nested,func_loop"}}
    with pytest.raises(ValueError, match="unknown knob"):
        q.tasks.parse_knobs(["arithmetic.steps=4"])
    with pytest.raises(ValueError, match="task.key=value"):
        q.tasks.parse_knobs(["max_steps=4"])
    recs = q.tasks.make_splits("code", 0, 0, 40, knobs=k)["test"]
    assert all(r.prompt.split("\n\n")[1].startswith(("count = 0", "def ")) for r in recs)


@pytest.mark.smollm
def test_token_lengths_with_the_real_tokenizer(q):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(q.common.embedded_base_dir()))
    lengths = q.tasks.token_lengths(tok, list(q.tasks.TASKS), n=128)
    assert lengths["classify"]["prompt"]["min"] > 150 and lengths["classify"]["prompt"]["max"] < 450
    assert lengths["chat"]["answer"]["max"] <= q.tasks.CHAT_MAX_NEW_TOKENS  # the cap holds every reference answer
    for r in q.tasks.make_splits("classify", 0, 0, 128)["test"]:
        assert 150 <= len(tok(r.prompt.split("\n\n", 1)[1])["input_ids"]) <= 350


# ---- evaluation helpers ---------------------------------------------------------------------------------------------
def test_scoring_helpers(q):
    ev = q.eval_task
    assert ev.token_agreement([[1, 2, 3], [1, 2], [], [5]], [[1, 2, 3], [1, 2, 9, 9], [], [6]]) == pytest.approx(
        (1 + 0.5 + 1 + 0) / 4)
    assert ev.self_items([" The  cat\nsat ", "a"], ["The cat sat", "b"]) == [True, False]
    rec = q.tasks.Record("Q?", "The x is blue.", ("blue",))
    assert ev.fact_items(["It is Blue.", "red"], [rec, rec]) == [True, False]


def test_job_plan_orders_default_first_and_skips_what_cannot_run(q, monkeypatch):
    ev, common = q.eval_task, q.common
    specs = common.select_methods("all")
    notes = []
    monkeypatch.setattr(ev, "heal_supported", lambda: False)
    jobs = ev.plan_jobs(specs, [16.0, 32.0], ["default", "task"], lambda **kw: notes.append(kw))
    from deltapack.methods import METHODS

    labels = [s.label for s, _, _ in jobs]
    if "auto" not in METHODS:
        assert any(n["method"] == "auto" and "not registered" in n["note"] for n in notes)
        assert "auto" not in labels
    assert any(n["method"] == "auto+heal" for n in notes)  # no heal parameter, or no auto
    cals = [c for _, _, c in jobs]
    assert cals == sorted(cals, key=["default", "task"].index)  # every default job before any task-calibrated one
    assert [(s.label, r) for s, r, c in jobs if c == "default"][:2] == [(labels[0], 16.0), (labels[1], 16.0)]
    task_labels = {s.label for s, _, c in jobs if c == "task"}
    assert {"delta-come", "deltadq"} <= task_labels and not {"dare", "lowrank", "bitdelta"} & task_labels
    assert {n["method"] for n in notes if n.get("calibration") == "task"} == {"dare", "lowrank", "bitdelta"}


def test_budget_estimates_a_job_kind_from_its_own_timings_only(q):
    """A slow job of one kind must not keep a cheap job of another kind from starting (it did: one 160-s auto job
    made every 3-s dare job's estimate 163 s, and none ran in that GPU call)."""
    import time

    b = q.common.Budget(time.time() + 100)
    b.record("auto|default", 160.0)
    assert b.estimate("auto|default", 30.0) == 160.0
    assert b.estimate("dare|default", 30.0) == 30.0
    assert b.fits("dare|default", 30.0) and not b.fits("auto|default", 30.0)


def test_explicit_plan_keeps_its_order_and_refuses_bad_entries(q):
    ev = q.eval_task
    notes = []
    jobs = ev.plan_from_text("dare@32,delta-come@16:task,auto-min-gain-3pct@16,dare@16:task,dare@64",
                             lambda **kw: notes.append(kw))
    # dare uses no calibration: its task-calibrated entry is dropped with a note, the rest keep the order given
    assert [(s.label, r, c) for s, r, c in jobs] == [
        ("dare", 32.0, "default"), ("delta-come", 16.0, "task"), ("auto-min-gain-3pct", 16.0, "default"),
        ("dare", 64.0, "default")]
    assert any(n["method"] == "dare" and n.get("calibration") == "task" for n in notes)
    for bad in ("dare", "dare@x", "dare@1", "dare@16:other", "@16", " , "):
        with pytest.raises(SystemExit):
            ev.parse_plan(bad)
    with pytest.raises(SystemExit, match="unknown method label"):
        ev.plan_from_text("nosuch@16", lambda **kw: None)


def test_paired_intervals(q):
    c = q.common
    ft = [i < 600 for i in range(1024)]
    rebuilt = [i < 590 for i in range(1024)]
    lo, hi = c.paired_interval(rebuilt, ft)
    assert lo < 590 / 600 < hi <= 1.0 and hi - lo < 0.03
    assert c.paired_interval(rebuilt, ft) == (lo, hi)  # fixed seed
    same = c.paired_interval(ft, ft)
    assert same == (1.0, 1.0)
    d, dlo, dhi = c.paired_difference_interval(ft, rebuilt, ft)
    assert d == pytest.approx(10 / 600) and 0 < dlo < d < dhi  # 10 items better, never worse: clearly positive
    d0, lo0, hi0 = c.paired_difference_interval(rebuilt, rebuilt, ft)
    assert (d0, lo0, hi0) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        c.paired_interval([True], [True, False])


# ---- report ---------------------------------------------------------------------------------------------------------
def _record(c, task, label, ratio, cal, right, n=64, ft_right=60, measured="2026-12-07T10:00:00+00:00"):
    items = [i < right for i in range(n)]
    ft = [i < ft_right for i in range(n)]
    lo, hi = c.paired_interval(items, ft)
    return {"task": task, "label": label, "method": label.split("+")[0], "target_ratio": ratio, "calibration": cal,
            "heldout": task in ("strings", "chat"), "accuracy": right / n, "finetuned_accuracy": ft_right / n,
            "kept": right / ft_right, "kept_interval": [lo, hi], "true_ratio": ratio * 0.98, "nominal_ratio": ratio,
            "kl": 0.01, "seconds": 1.0, "eval_seconds": 1.0, "n_eval": n, "correct_items": c.items_to_hex(items),
            "finetune_id": f"{task}-1", "measured": measured}


def _part(c, path: Path, date: str, results, notes=()):
    fts = {t: {"finetune_id": f"{t}-1", "finetuned_accuracy": 60 / 64, "base_accuracy": 0.0, "n_eval": 64,
               "finetuned_items": c.items_to_hex([i < 60 for i in range(64)]), "steps": 10, "steps_planned": 10,
               "final_loss": 0.1, "train_seconds": 5.0, "dev": {"accuracy": 0.9}}
           for t in {r["task"] for r in results}}
    path.write_text(json.dumps({"command": f"run {path.name}", "device": "GPU X", "date": date, "results": results,
                                "finetunes": fts, "notes": list(notes)}))
    return path


def test_report_merge_worst_task_and_blocks(q, tmp_path):
    c, rep, tasks = q.common, q.report, q.tasks.TASKS
    first = [_record(c, t, lab, 16.0, "default", 58 if t == "code" else 59) for t in tasks for lab in ("dare", "auto")]
    first.append(_record(c, "code", "deltadq", 16.0, "task", 50))
    note = {"task": "code", "method": "deltadq", "target_ratio": 32.0, "calibration": "default",
            "note": "time budget: not started"}
    a = _part(c, tmp_path / "a.json", "2026-12-07T10:00:00", first, [note])
    later = [_record(c, "code", "dare", 16.0, "default", 60, measured="2026-12-07T11:00:00+00:00"),
             _record(c, "code", "deltadq", 32.0, "default", 40, measured="2026-12-07T11:00:00+00:00")]
    b = _part(c, tmp_path / "b.json", "2026-12-07T11:00:00", later)
    merged = rep.merge([b, a])  # order on the command line does not matter: dates do
    by = {rep.record_key(r): r for r in merged["results"]}
    assert by[("code", "dare", 16.0, "default")]["kept"] == 1.0 and by[("code", "dare", 16.0, "default")]["part"] == "b.json"
    assert ("code", "deltadq", 16.0, "task") in by
    assert not merged["notes"]  # the job the note said was not started was measured later
    (repeat,) = merged["repeats"]
    assert repeat["kept"] == [58 / 60, 1.0]
    cells = rep.by_cell(merged["results"])
    worst, complete = rep.worst(cells[("auto", 16.0, "default")], tasks)
    assert worst["task"] == "code" and complete
    worst, complete = rep.worst(cells[("dare", 16.0, "default")], q.tasks.TUNING)
    assert worst["kept"] == pytest.approx(59 / 60) and complete
    assert rep.worst(cells[("deltadq", 32.0, "default")], tasks)[1] is False  # one family only: marked †

    md = rep.quality_markdown(merged, "q.json")
    assert "### Worst task, held-out families (strings, chat)" in md
    auto_row = next(ln for ln in md.splitlines() if ln.startswith("| auto |"))
    lo, hi = by[("code", "auto", 16.0, "default")]["kept_interval"]
    assert f"0.967 [{lo:.3f}, {hi:.3f}] code" in auto_row
    assert "n/a" in next(ln for ln in md.splitlines() if ln.startswith("| dare |"))  # data-free: no task column
    assert "**auto against the best single method**" in md
    which = rep.which_method_markdown(merged, "q.json")
    assert "| dare | **0.983**" in which  # worst of six at 16x: 59/60, the best of the column

    # blocks: replaced in place, or inserted once before the anchor; nothing else changes
    text = f"# T\n\nintro\n\n{rep.README_ANCHOR} of a small model.\n\nrest\n"
    once = rep.with_block(text, "which-method", which, insert_before=rep.README_ANCHOR)
    assert once.replace(f"<!-- table:which-method -->\n{which.strip()}\n<!-- /table:which-method -->\n\n", "") == text
    assert rep.with_block(once, "which-method", which, insert_before=rep.README_ANCHOR) == once
    assert rep.with_block(once, "which-method", "new", insert_before=rep.README_ANCHOR).count("table:which-method -->") == 2


def test_cells_from_an_earlier_finetune_are_marked(q, tmp_path):
    """A task fine-tuned again: its newest fine-tune is current; a cell measured only on the earlier one keeps its
    record, marked ‡ wherever it is printed, and a smoke run's render never writes the package's table."""
    c, rep = q.common, q.report
    old = [_record(c, "code", lab, 16.0, "default", 58) for lab in ("dare", "auto")]
    a = _part(c, tmp_path / "a.json", "2026-12-07T10:00:00", old)
    new = _record(c, "code", "dare", 16.0, "default", 60, measured="2026-12-07T11:00:00+00:00")
    new["finetune_id"] = "code-2"
    b = _part(c, tmp_path / "b.json", "2026-12-07T11:00:00", [new])
    doc = json.loads(b.read_text())
    doc["finetunes"]["code"].update(finetune_id="code-2", created="2026-12-07T10:30:00Z")
    b.write_text(json.dumps(doc))
    merged = rep.merge([a, b])
    by = {rep.record_key(r): r for r in merged["results"]}
    assert by[("code", "auto", 16.0, "default")].get("earlier_finetune") is True
    assert "earlier_finetune" not in by[("code", "dare", 16.0, "default")]
    assert rep.kept_text(by[("code", "auto", 16.0, "default")]).endswith(" ‡")
    assert not rep.kept_text(by[("code", "dare", 16.0, "default")]).endswith("‡")
    assert {f["finetune_id"] for f in merged["finetunes"]["code"]} == {"code-1", "code-2"}  # both listed
    # a paired comparison never pairs records of different fine-tunes: auto (code-1) has no partner here
    assert "**auto against the best single method**" not in rep.quality_markdown(merged, "q.json")

    path = tmp_path / "quality.json"
    path.write_text(json.dumps(merged))
    docs, readme = tmp_path / "benchmarks.md", tmp_path / "README.md"
    docs.write_text(rep.DOCS.read_text())
    readme.write_text(rep.README.read_text())
    outputs = rep.render(path, rep.SUPERSEDED_JSON, docs, readme, tmp_path / "which.md")
    assert rep.PACKAGE_WHICH_MD not in outputs
    by_family = outputs[tmp_path / "quality-by-family.md"]
    auto_row = next(ln for ln in by_family.splitlines() if ln.startswith("| auto |"))  # families with results only
    assert auto_row.startswith("| auto | 0.967 [") and auto_row.endswith("‡ |")


def test_committed_quality_tables_match_their_json(q, tmp_path):
    """docs/benchmarks.md's generated blocks, README.md's which-method block and bench/results/which-method.md are
    what bench/quality/report.py makes of the committed JSON files: CI fails when they drift."""
    rep = q.report
    outputs = rep.render(rep.JSON_PATH, rep.SUPERSEDED_JSON, rep.DOCS, rep.README, rep.WHICH_MD)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        bad = rep.check(outputs)
    assert not bad, f"regenerate with `python bench/quality/report.py`:\n{out.getvalue()}"
    # and the check can fail: a hand edit inside a generated block is caught
    docs = tmp_path / "benchmarks.md"
    docs.write_text(rep.DOCS.read_text().replace("<!-- /table:quality -->", "hand edit\n<!-- /table:quality -->"))
    readme = tmp_path / "README.md"
    readme.write_text(rep.README.read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        bad = rep.check(rep.render(rep.JSON_PATH, rep.SUPERSEDED_JSON, docs, readme, rep.WHICH_MD))
        assert rep.main(["--check", "--docs", str(docs), "--readme", str(readme)]) == 1
    assert bad == [str(docs)]


@pytest.mark.smollm
def test_answer_only_loss_equals_the_full_vocabulary_loss(q, tmp_path):
    """finetune.Trainer applies the head to the completion positions only; the loss is the usual one."""
    import torch

    sys.path.insert(0, str(QUALITY))
    try:
        finetune = importlib.import_module("finetune")
    finally:
        sys.path.remove(str(QUALITY))
    tr = finetune.Trainer(q.common.smoke_base_dir(tmp_path), device=torch.device("cpu"))
    items = tr.encode(q.tasks.make_splits("extract", 6, 0, 0)["train"])
    ids, mask, labels = tr._batch(items)
    with torch.no_grad():
        full = tr.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert float(tr.loss(ids, mask, labels)) == pytest.approx(float(full), rel=1e-5)
    # micro-batches of at most max_tokens padded tokens accumulate the full batch's gradient
    grads = []
    for max_tokens in (10_000, 300):
        tr.max_tokens = max_tokens
        tr.model.zero_grad(set_to_none=True)
        loss = tr.step_gradients(items, contextlib.nullcontext())
        assert float(loss) == pytest.approx(float(full), rel=1e-5)
        grads.append(torch.cat([p.grad.flatten() for p in tr.model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_deterministic_finetunes_are_named_by_their_weights(q, tmp_path):
    """Two runs of one recipe give the same weights and so the same finetune_id (results of different device
    sessions on it then pair in the report); a run stopped by its deadline keeps a time-based id."""
    import json as _json

    import torch

    sys.path.insert(0, str(QUALITY))
    try:
        finetune = importlib.import_module("finetune")
    finally:
        sys.path.remove(str(QUALITY))
    base = q.common.smoke_base_dir(tmp_path)
    data = {"n_train": 24, "n_dev": 4, "n_test": 4, "knobs": {}}
    ids = []
    for i in range(2):
        info = finetune.finetune_task("extract", base, tmp_path / f"ft{i}", steps=3, lr=1e-3, batch_size=4, data=data,
                                      device=torch.device("cpu"), deadline=None, eval_batch=4, nondeterministic=[])
        saved = _json.loads((tmp_path / f"ft{i}" / "finetune.json").read_text())
        assert saved["finetune_id"] == info["finetune_id"]
        ids.append(info["finetune_id"])
    assert ids[0] == ids[1] and ids[0].startswith("extract-w"), ids
    late = finetune.finetune_task("extract", base, tmp_path / "late", steps=3, lr=1e-3, batch_size=4, data=data,
                                  device=torch.device("cpu"), deadline=0.0, eval_batch=4, nondeterministic=[])
    assert late["stopped_early"] and not late["finetune_id"].startswith("extract-w")


def test_targets_prefer_a_row_measured_on_the_latest_finetunes(q):
    """The targets table: a row that mixes fine-tune sets loses to one measured wholly on the latest fine-tunes,
    even where its worst task is higher, and is marked ‡ when it is all there is."""
    c, rep, tasks = q.common, q.report, q.tasks.TASKS
    latest = [_record(c, t, "dare", 16.0, "default", 50) for t in tasks]
    mixed = [_record(c, t, "auto", 16.0, "default", 58) for t in tasks]
    mixed[0]["earlier_finetune"] = True
    row = next(ln for ln in rep.targets_lines(latest + mixed) if ln.startswith("| 16x"))
    assert "| dare: 0.833" in row and "‡" not in row
    row = next(ln for ln in rep.targets_lines(mixed) if ln.startswith("| 16x"))
    assert "| auto: 0.967" in row and row.count("‡") == 1
