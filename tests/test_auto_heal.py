"""`auto` (the default method) and healing on pico models: what auto stores is only its candidates' encodings, chosen
by whole-model KL (never worse than the best single candidate on its own calibration text); healing moves float
parts only (every integer part — codes, masks — stays bit-identical) and never makes the held-out fit worse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltapack import api
from deltapack.compress import compress
from deltapack.errors import DeltapackError
from deltapack.methods.base import PENDING_CODEC


def _manifest(path) -> dict:
    return json.loads((Path(path) / "delta_config.json").read_text())


def _stored(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def auto_delta(pico_pair, tmp_path_factory):
    base, ft = pico_pair
    return compress(str(base), str(ft), str(tmp_path_factory.mktemp("auto") / "d"), method="auto", ratio=1.4,
                    progress=False)


def test_auto_is_the_default_and_stores_only_candidate_encodings(auto_delta, pico_pair):
    import inspect

    from deltapack import cli

    assert inspect.signature(compress).parameters["method"].default == "auto"
    assert next(p for p in cli.compress.params if p.name == "method").default == "auto"
    m = _manifest(auto_delta)
    assert m["method"] == "auto"
    entries = m["tensors"].values()
    assert all(e["codec"] != PENDING_CODEC for e in entries)
    assert {e["method"] for e in entries} <= {"dare", "deltadq", "delta-come", "dense"}
    choice = m["calibration"]["auto"]
    assert set(choice["whole_model_kl"]) == {"dare", "deltadq", "delta-come"}
    # the choice starts from the best candidate and only switches groups that lower the KL
    assert choice["kl"] <= min(choice["whole_model_kl"].values()) * (1 + 1e-3)
    assert api.verify(str(pico_pair[0]), str(auto_delta))["ok"]
    assert api.inspect(str(auto_delta))["true_ratio"] >= 1.4 * 0.97


def test_auto_with_one_candidate_is_that_method(pico_pair, tmp_path):
    base, ft = pico_pair
    out = compress(str(base), str(ft), str(tmp_path / "d"), method="auto", ratio=1.4, progress=False,
                   params={"candidates": ["dare"]})
    assert {e["method"] for e in _manifest(out)["tensors"].values()} <= {"dare", "dense"}


def test_auto_can_choose_by_changed_top_tokens(pico_pair, tmp_path):
    """objective "flips" (the share of calibration tokens whose most likely next token changes) scores with the same
    forwards as the KL, records which objective chose, and never ends above its best single candidate."""
    base, ft = pico_pair
    out = compress(str(base), str(ft), str(tmp_path / "d"), method="auto", ratio=1.4, progress=False,
                   params={"objective": "flips"})
    choice = _manifest(out)["calibration"]["auto"]
    assert choice["objective"] == "flips"
    assert all(0 <= v <= 1 + 1e-3 for v in choice["whole_model_kl"].values())  # shares of tokens (+ 1e-6 KL)
    assert choice["kl"] <= min(choice["whole_model_kl"].values())
    assert api.verify(str(base), str(out))["ok"]
    assert _manifest(compress(str(base), str(ft), str(tmp_path / "k"), method="auto", ratio=1.4,
                              progress=False))["calibration"]["auto"]["objective"] == "kl"


def test_heal_moves_float_parts_only_and_never_worsens_the_held_out_fit(auto_delta, pico_pair, tmp_path):
    base, ft = pico_pair
    healed = compress(str(base), str(ft), str(tmp_path / "h"), method="auto", ratio=1.4, progress=False,
                      heal={"steps": 15, "seed": 0})
    rec = _manifest(healed)["calibration"]["heal"]
    assert rec["steps_done"] == 15 and rec["trainable"] > 0
    assert rec["kl_after"] <= rec["kl_before"] or not rec["applied"]
    plain, after = _stored(auto_delta), _stored(healed)
    assert plain.keys() == after.keys()
    moved = 0
    for k, v in plain.items():
        if v.is_floating_point():
            moved += int(not torch.equal(v, after[k]))
        else:
            assert torch.equal(v, after[k]), f"healing changed integer part {k}"
    assert moved > 0 or not rec["applied"]
    # same stored bytes (the manifest only grows by the heal record)
    size = lambda d: sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))  # noqa: E731
    assert size(healed) == size(auto_delta)
    from deltapack.format.directory import DeltaDir
    from deltapack.io import open_model

    merged = api.merged_state_dict(open_model(str(base)), DeltaDir.open(healed))
    assert all(torch.isfinite(t.float()).all() for t in merged.values())


def test_heal_keeps_its_best_held_out_state_when_training_diverges(pico_pair, tmp_path):
    """A learning rate far too large throws the fit off after a step or two: what is stored is the best state the
    held-out scores saw (or the un-healed delta), never the diverged last one. (Before: only the last state was
    compared with the un-healed one, so a run that improved and then overshot kept nothing of its gain.)"""
    base, ft = pico_pair
    out = compress(str(base), str(ft), str(tmp_path / "d"), method="dare", ratio=1.4, progress=False,
                   heal={"steps": 10, "lr": 3.0, "eval_every": 1, "seed": 0})
    rec = _manifest(out)["calibration"]["heal"]
    curve = rec["held_out_curve"]
    assert [s for s, _ in curve] == list(range(11)), "scored before training and after every step"
    best_step, best_kl = min(curve, key=lambda sk: (sk[1], sk[0]))
    assert rec["kl_after"] == pytest.approx(best_kl, rel=1e-5) and rec["best_step"] == best_step
    assert rec["applied"] == (best_step > 0)
    assert rec["kl_last"] > rec["kl_after"], "the diverged last state was not the one kept"


def test_heal_refuses_lossless_methods_and_unknown_settings(pico_pair, tmp_path):
    base, ft = pico_pair
    with pytest.raises(DeltapackError, match="lossless"):
        compress(str(base), str(ft), str(tmp_path / "r"), method="raw", heal=True, progress=False)
    with pytest.raises(DeltapackError, match="unknown settings"):
        compress(str(base), str(ft), str(tmp_path / "u"), method="dare", ratio=1.4, heal={"stpes": 3}, progress=False)
    assert not (tmp_path / "r").exists() and not (tmp_path / "u").exists()


def test_cli_heal_seconds_needs_heal(pico_pair, tmp_path):
    from click.testing import CliRunner

    from deltapack.cli import main

    base, ft = pico_pair
    res = CliRunner().invoke(main, ["compress", str(base), str(ft), "-o", str(tmp_path / "d"), "--heal-seconds", "5"])
    assert res.exit_code != 0 and "--heal-seconds needs --heal" in res.output
    # a zero time limit is refused, not replaced by the default
    res = CliRunner().invoke(main, ["compress", str(base), str(ft), "-o", str(tmp_path / "z"), "-m", "dare",
                                    "--ratio", "1.4", "--heal", "--heal-seconds", "0"])
    assert res.exit_code != 0 and "max_seconds must be positive" in res.output
    assert not (tmp_path / "z").exists()


def test_heal_that_does_not_help_keeps_autos_choice(auto_delta, pico_pair, tmp_path, monkeypatch):
    """heal returns its input unchanged when the held-out KL did not drop: assemble must then write auto's chosen
    encodings (it used to drop them and fail on auto's provisional entries)."""
    import deltapack.calib.heal as heal_mod

    def not_better(encoded, ctx, cfg, fit=None):
        return encoded, {"steps_done": 0, "applied": False}

    monkeypatch.setattr(heal_mod, "heal", not_better)
    base, ft = pico_pair
    out = compress(str(base), str(ft), str(tmp_path / "n"), method="auto", ratio=1.4, progress=False, heal={"steps": 1})
    plain, after = _stored(auto_delta), _stored(out)
    assert plain.keys() == after.keys()
    assert all(torch.equal(v, after[k]) for k, v in plain.items())


def test_auto_phases_name_each_candidates_coded_fit(pico_pair, tmp_path):
    """Under auto every candidate fits its own coded size, timed as encode.coded_fit.<method>; auto's provisional
    entry (all candidates together) is not fitted again (it would only be zstd-coded to find it over budget)."""
    from deltapack.compress import record_phases

    base, ft = pico_pair
    with record_phases() as phases:
        compress(str(base), str(ft), str(tmp_path / "d"), method="auto", ratio=1.4, progress=False)
    fits = {k.rsplit(".", 1)[1] for k in phases if k.startswith("encode.coded_fit.")}
    assert {"dare", "deltadq", "delta-come"} <= fits and "auto" not in fits


@pytest.mark.parametrize("candidate", ["dare", "deltadq"])
def test_heal_keeps_seeded_masks_and_heals_the_same(pico_pair, tmp_path, monkeypatch, candidate):
    """Healing decodes every tensor at every step; the seeded masks of dare and deltadq codes are kept instead of
    rehashed (format/masks.memoized_masks): the healed delta is byte for byte the one healed without keeping them."""
    import deltapack.calib.heal as heal_mod

    base, ft = pico_pair
    params = {"candidates": [candidate]}

    def healed(out, memo_bytes):
        monkeypatch.setattr(heal_mod, "MASK_MEMO_CPU_BYTES", memo_bytes)
        path = compress(str(base), str(ft), str(tmp_path / out), method="auto", ratio=1.4, progress=False,
                        params=params, heal={"steps": 4, "seed": 0})
        return path, _manifest(path)["calibration"]["heal"]["mask_memo"]

    kept, memo = healed("kept", 1 << 30)
    fresh, none = healed("fresh", 0)
    assert memo["hits"] > 0 and memo["bytes"] > 0 and none["hits"] == 0 and none["bytes"] == 0
    a, b = _stored(kept), _stored(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
