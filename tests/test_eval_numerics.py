"""eval --numerics: `served` computes a delta as the server does (base(x) + delta(x), unrounded), `merged` as the
checkpoint `deltapack merge` writes (base + delta rounded to the fine-tune's bf16)."""

from __future__ import annotations

import pytest
import torch

from deltapack import api
from deltapack.eval.models import load_target
from deltapack.serve.testing import merged_model

IDS = torch.tensor([[1, 5, 9, 2, 33, 17, 60, 3], [7, 7, 0, 63, 12, 40, 41, 2]])


@pytest.fixture(scope="module")
def delta(tmp_path_factory):
    from conftest import make_finetune, make_llama
    from deltapack.serve.testing import make_word_tokenizer

    d = tmp_path_factory.mktemp("num")
    make_llama(d / "base")
    make_word_tokenizer(d / "base", 64)
    make_finetune(d / "base", d / "ft", scale=0.3)
    return d / "base", api.compress(d / "base", d / "ft", d / "d", method="lowrank", ratio=1.5, progress=False)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def test_served_and_merged_numerics(delta):
    base, d = delta
    cpu = torch.device("cpu")
    served = _logits(load_target(base, d, device=cpu, dtype=torch.float32, numerics="served").model)
    merged = _logits(load_target(base, d, device=cpu, dtype=torch.float32, numerics="merged").model)
    unrounded = _logits(merged_model(base, d, merge_dtype=torch.float32))
    rounded = _logits(merged_model(base, d))
    torch.testing.assert_close(served, unrounded, rtol=1e-4, atol=1e-4)  # the server's numbers
    torch.testing.assert_close(merged, rounded, rtol=1e-5, atol=1e-5)  # merge's numbers
    assert (served - merged).abs().max() > 1e-4  # bf16 rounding of the merge shows: the switch matters


def test_eval_cli_default_is_served(delta, tmp_path):
    import json

    from click.testing import CliRunner

    from deltapack.cli import main

    base, d = delta
    ppl = tmp_path / "t.txt"
    ppl.write_text(" ".join(f"w{i}" for i in range(40)))
    outs = {}
    for flag in ([], ["--numerics", "merged"]):
        out = tmp_path / f"r{len(flag)}.json"
        res = CliRunner().invoke(main, ["eval", str(base), str(d), "--ppl-text", str(ppl), "--json", str(out),
                                        "--device", "cpu", "--quiet", *flag])
        assert res.exit_code == 0, res.output
        outs[tuple(flag)] = json.loads(out.read_text())
    assert outs[()]["numerics"] == "served" and outs[("--numerics", "merged")]["numerics"] == "merged"
