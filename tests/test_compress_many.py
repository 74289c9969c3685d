"""compress-many: every output directory equals, byte for byte, the single-fine-tune `compress` of that fine-tune; an
interrupted run resumes without redoing finished units. On a local process pool, on a local Ray cluster, and in
process (workers=0) for methods with cross-tensor state (calibration statistics, global budgets, refine)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from deltapack import api
from deltapack.errors import DeltapackError
from deltapack.methods import METHODS
from deltapack.scale.many import FAIL_AFTER_ENV, RunInterrupted, compress_many

from conftest import make_finetune, make_llama

# identical bytes need the same torch thread count on both sides and a fixed `created` stamp
ENV = {"DELTAPACK_THREADS": "1", "SOURCE_DATE_EPOCH": "1700000000"}
METHOD, RATIO = "lowrank", 1.5


@pytest.fixture(scope="module", autouse=True)
def _env():
    with pytest.MonkeyPatch.context() as mp:
        for k, v in ENV.items():
            mp.setenv(k, v)
        mp.delenv(FAIL_AFTER_ENV, raising=False)
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A pico base and three fine-tunes: one leaves a tensor unchanged, one grows the vocabulary."""
    d = tmp_path_factory.mktemp("many")
    make_llama(d / "base", hidden=64, layers=2, vocab=256, inter=256)
    fts = {}
    for name, kw in {"alpha": {"skip": ("layers.1.mlp.up_proj",)}, "beta": {"grow_vocab": 8}, "gamma": {}}.items():
        make_finetune(d / "base", d / name, seed=len(fts) + 7, scale=0.05, **kw)
        fts[name] = str(d / name)
    return d / "base", fts


@pytest.fixture(scope="module")
def singles(models, tmp_path_factory):
    base, fts = models
    d = tmp_path_factory.mktemp("single")
    return {n: api.compress(base, p, d / n, method=METHOD, ratio=RATIO, progress=False) for n, p in fts.items()}


def assert_same_tree(a: Path, b: Path) -> None:
    fa = sorted(p.relative_to(a) for p in Path(a).rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in Path(b).rglob("*") if p.is_file())
    assert fa == fb
    for rel in fa:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs"


def encoded_in_log(out: Path) -> list[tuple[str, int]]:
    lines = (out / ".work" / "units.log").read_text().splitlines()
    return [(ln.split()[1], int(ln.split()[2])) for ln in lines if ln.startswith("encode ")]


def interrupted_then_resumed(base, fts, out, monkeypatch, **kw) -> tuple[list, dict]:
    monkeypatch.setenv(FAIL_AFTER_ENV, "3")
    with pytest.raises(RunInterrupted):
        compress_many(base, fts, out, method=METHOD, ratio=RATIO, progress=False, **kw)
    first = encoded_in_log(out)
    monkeypatch.delenv(FAIL_AFTER_ENV)
    summary = compress_many(base, fts, out, method=METHOD, ratio=RATIO, progress=False, **kw)
    return first, summary


def check_resume(first: list, summary: dict) -> None:
    second = summary["encoded_units"]
    assert len(first) >= 3 and second, (first, second)
    assert len(set(first)) == len(first)  # nothing encoded twice within a run either
    assert not set(first) & set(second), "finished units were encoded again"
    assert sorted(summary["skipped_units"]) == sorted(first)
    assert not (Path(summary["outputs"]["alpha"]).parent / ".work").exists()  # cleaned up once everything is done


def test_process_pool_matches_single_and_resumes(models, singles, tmp_path, monkeypatch):
    base, fts = models
    first, summary = interrupted_then_resumed(base, fts, tmp_path / "out", monkeypatch, workers=2)
    check_resume(first, summary)
    assert summary["backend"] == "pool"
    for n in fts:
        assert_same_tree(tmp_path / "out" / n, singles[n])
    # a third run finds every fine-tune finished and does nothing
    again = compress_many(base, fts, tmp_path / "out", method=METHOD, ratio=RATIO, progress=False, workers=2)
    assert sorted(again["finished_before"]) == sorted(fts) and not again["encoded_units"]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_matches_single_and_resumes(models, singles, ray_cluster, tmp_path, monkeypatch):
    base, fts = models
    first, summary = interrupted_then_resumed(base, fts, tmp_path / "out", monkeypatch, ray=True)
    check_resume(first, summary)
    assert summary["backend"] == "ray"
    for n in fts:
        assert_same_tree(tmp_path / "out" / n, singles[n])


STATEFUL = [
    # calibration statistics sliced per unit, a global (spectrum-driven) budget, unspent bytes rolled over
    ("delta-come", 4.0, {"quantizer": "gptq", "calib_source": "random", "n_calib_seqs": 4, "calib_seq_len": 16,
                         "budget": "global"}),
    ("bitdelta", 4.0, {"distill": True, "distill_steps": 3, "distill_batch": 2, "distill_seq_len": 16}),  # refine
    ("raw", None, {}),
]


@pytest.mark.parametrize("method,ratio,params", STATEFUL, ids=[s[0] for s in STATEFUL])
def test_stateful_methods_in_process_match_single(models, tmp_path, method, ratio, params):
    if method not in METHODS:
        pytest.skip(f"{method} not registered")
    base, fts = models
    summary = compress_many(base, fts, tmp_path / "many", method=method, ratio=ratio, params=params, workers=0,
                            progress=False)
    assert summary["backend"] == "inline"
    for n, p in fts.items():  # "beta" grows the vocabulary
        single = api.compress(base, p, tmp_path / f"single-{n}", method=method, ratio=ratio, params=params, progress=False)
        assert_same_tree(tmp_path / "many" / n, single)


def test_other_settings_do_not_resume(models, tmp_path, monkeypatch):
    base, fts = models
    monkeypatch.setenv(FAIL_AFTER_ENV, "1")
    with pytest.raises(RunInterrupted):
        compress_many(base, fts, tmp_path / "o", method=METHOD, ratio=RATIO, workers=0, progress=False)
    monkeypatch.delenv(FAIL_AFTER_ENV)
    with pytest.raises(DeltapackError, match="--restart"):
        compress_many(base, fts, tmp_path / "o", method=METHOD, ratio=2.0, workers=0, progress=False)
    summary = compress_many(base, fts, tmp_path / "o", method=METHOD, ratio=2.0, workers=0, progress=False, restart=True)
    assert not summary["skipped_units"]
    # finished outputs made with other settings are not silently kept
    with pytest.raises(DeltapackError, match="--overwrite"):
        compress_many(base, fts, tmp_path / "o", method=METHOD, ratio=3.0, workers=0, progress=False)


def test_unreachable_ratio_then_another_needs_no_restart(models, tmp_path):
    from deltapack.errors import BudgetError

    base, fts = models
    with pytest.raises(BudgetError, match="not reachable"):
        compress_many(base, fts, tmp_path / "o", method=METHOD, ratio=500.0, workers=0, progress=False)
    summary = compress_many(base, fts, tmp_path / "o", method=METHOD, ratio=RATIO, workers=0, progress=False)
    assert sorted(summary["true_ratio"]) == sorted(fts)


def test_names(models, tmp_path):
    base, fts = models
    with pytest.raises(DeltapackError, match="two fine-tunes"):
        compress_many(base, [fts["alpha"], "alpha=" + fts["beta"]], tmp_path / "x", workers=0, progress=False)
    with pytest.raises(DeltapackError, match="not usable"):
        compress_many(base, {"../up": fts["alpha"]}, tmp_path / "x", workers=0, progress=False)


def test_cli(models, singles, tmp_path):
    from deltapack.cli import main

    base, fts = models
    args = ["compress-many", str(base), f"a={fts['alpha']}", fts["gamma"], "-o", str(tmp_path / "o"), "-m", METHOD,
            "-r", str(RATIO), "--workers", "0", "--quiet"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "a: " in r.output and "gamma: " in r.output
    assert_same_tree(tmp_path / "o" / "a", singles["alpha"])
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "2 fine-tunes already finished" in r.output
    r = CliRunner().invoke(main, ["compress-many", str(base), fts["alpha"], "-o", str(tmp_path / "p"), "-m", "nope"])
    assert r.exit_code == 2 and "unknown method" in r.output
    assert os.environ["DELTAPACK_THREADS"] == "1"
