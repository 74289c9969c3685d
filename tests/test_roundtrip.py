"""compress -> merge round trips for every method, and the true-ratio contract."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from deltapack import api
from deltapack.cli import main
from deltapack.methods import METHODS

from conftest import make_finetune, make_llama

CORE = ["raw", "lowrank", "bitdelta", "dare"]


def _load_dir(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _rel_err(a, b):
    num = sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in b)
    den = sum(float(b[k].float().pow(2).sum()) for k in b)
    return (num / den) ** 0.5


@pytest.mark.parametrize("method", sorted(METHODS))
def test_roundtrip_every_method_pico(pico_pair, tmp_path, method):
    base, ft = pico_pair
    ratio = None if METHODS[method].lossless else 1.5
    delta = api.compress(base, ft, tmp_path / "d", method=method, ratio=ratio, progress=False)
    out = api.merge(base, delta, tmp_path / "m", progress=False)
    got, want, b = _load_dir(out), _load_dir(ft), _load_dir(base)
    assert set(got) == set(want)
    assert all(got[k].dtype == want[k].dtype and got[k].shape == want[k].shape for k in want)
    # the rebuilt model is closer to the fine-tune than the base is
    assert _rel_err(got, want) < _rel_err(b, want)
    # transformers loads it (config + weights)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_raw_is_bit_exact(pico_pair, tmp_path):
    base, ft = pico_pair
    out = api.merge(base, api.compress(base, ft, tmp_path / "d", method="raw", progress=False), tmp_path / "m", progress=False)
    got, want = _load_dir(out), _load_dir(ft)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_raw_bit_exact_fp32_checkpoint(tmp_path):
    make_llama(tmp_path / "b", dtype=torch.float32)
    make_finetune(tmp_path / "b", tmp_path / "f", seed=5)
    # make_finetune saves bf16; reload base fp32 pair: fine-tune stored fp32 too
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "f", dtype=torch.float32).save_pretrained(tmp_path / "f32")
    out = api.merge(tmp_path / "b", api.compress(tmp_path / "b", tmp_path / "f32", tmp_path / "d", method="raw", progress=False), tmp_path / "m", progress=False)
    got, want = _load_dir(out), _load_dir(tmp_path / "f32")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_unchanged_tensors_not_stored(pico_pair, tmp_path):
    base, ft = pico_pair
    d = api.compress(base, ft, tmp_path / "d", method="raw", progress=False)
    info = api.inspect(d)
    names = {r["name"] for r in info["tensors"]}
    assert "model.layers.1.mlp.up_proj.weight" not in names  # the fixture leaves it equal
    assert info["unchanged_tensors"] == 1
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names


@pytest.mark.parametrize("method", ["lowrank", "bitdelta", "dare"])
def test_true_ratio_16x_small_pair(small_pair, tmp_path, method):
    """~8M parameters, hidden 512: the ratio on disk reaches >= 15.5 and inspect --json reports that number."""
    base, ft = small_pair
    d = api.compress(base, ft, tmp_path / "d", method=method, ratio=16, progress=False)
    files = [p for p in d.rglob("*") if p.is_file()]
    on_disk = sum(p.stat().st_size for p in files)
    dense = 0
    a, b = _load_dir(ft), _load_dir(base)
    for k in a:
        if not torch.equal(a[k], b[k]):
            dense += a[k].numel() * 2
    true_ratio = dense / on_disk
    assert true_ratio >= 15.5
    res = CliRunner().invoke(main, ["inspect", str(d), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["true_ratio"] == pytest.approx(true_ratio, rel=1e-12)


def test_vocab_growth_roundtrip(tmp_path):
    make_llama(tmp_path / "b", hidden=32, vocab=64)
    make_finetune(tmp_path / "b", tmp_path / "f", grow_vocab=8)
    d = api.compress(tmp_path / "b", tmp_path / "f", tmp_path / "d", method="lowrank", ratio=1.5, progress=False)
    te = json.loads((d / "delta_config.json").read_text())["tensors"]["model.embed_tokens.weight"]
    assert te["base_rows"] == 64 and te["shape"] == [72, 32] and "new_rows" in te["parts"]
    out = api.merge(tmp_path / "b", d, tmp_path / "m", progress=False)
    got, want = _load_dir(out), _load_dir(tmp_path / "f")
    assert got["model.embed_tokens.weight"].shape == (72, 32)
    # added rows have no base: they are stored exactly (bf16)
    assert torch.equal(got["model.embed_tokens.weight"][64:], want["model.embed_tokens.weight"][64:])


def test_sharded_output_and_input(pico_pair, tmp_path):
    base, ft = pico_pair
    # dense-exact: the uncompressed exact delta, large enough to need several 20 kB shards (raw now compresses)
    d = api.compress(base, ft, tmp_path / "d", method="dense-exact", progress=False, max_shard_bytes=20_000)
    assert len(list(d.glob("delta-*-of-*.safetensors"))) > 1
    out = api.merge(base, d, tmp_path / "m", progress=False, max_shard_bytes=30_000)
    assert (out / "model.safetensors.index.json").exists()
    # the sharded merged checkpoint is a valid input again (index-driven lazy reading)
    d2 = api.compress(base, out, tmp_path / "d2", method="raw", progress=False)
    out2 = api.merge(base, d2, tmp_path / "m2", progress=False)
    got, want = _load_dir(out2), _load_dir(ft)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_verify_ok(pico_pair, tmp_path):
    base, ft = pico_pair
    d = api.compress(base, ft, tmp_path / "d", method="dare", ratio=1.5, progress=False)
    rep = api.verify(base, d)
    assert rep["ok"] and rep["checksums_ok"] and rep["base_fingerprint_ok"]
    res = CliRunner().invoke(main, ["verify", str(base), str(d)])
    assert res.exit_code == 0 and "fingerprint: ok" in res.output


def test_load_merged_in_memory_matches_merge(pico_pair, tmp_path):
    base, ft = pico_pair
    d = api.compress(base, ft, tmp_path / "d", method="lowrank", ratio=1.5, progress=False)
    out = api.merge(base, d, tmp_path / "m", progress=False)
    sd = api.merged_state_dict(base, d)
    disk = _load_dir(out)
    assert all(torch.equal(sd[k], disk[k]) for k in disk)


def test_methods_cli_lists_registry():
    res = CliRunner().invoke(main, ["methods", "--json"])
    assert res.exit_code == 0
    names = {r["name"] for r in json.loads(res.output)}
    assert set(CORE) <= names
    for r in json.loads(res.output):
        assert r["paper"] and "needs_calibration" in r


@pytest.mark.parametrize("ratio", [8, 5])
def test_bitdelta_fills_budget_with_whole_planes(small_pair, tmp_path, ratio):
    """Between 1-plane sizes the stranded bytes buy extra planes: the true ratio lands near the target (a floored
    per-tensor split would give every tensor the same whole number of planes: 16x at a target of 8x)."""
    base, ft = small_pair
    d = api.compress(base, ft, tmp_path / "d", method="bitdelta", ratio=ratio, progress=False)
    true_ratio = api.inspect(d)["true_ratio"]
    assert ratio * 0.95 <= true_ratio <= ratio * 1.05


def test_merged_state_dict_rounds_to_the_finetune_dtype_unless_told(pico_pair, tmp_path):
    """Default: changed tensors in the fine-tune's dtype (what `merge` writes); merge_dtype=float32: base + delta
    unrounded (what a server adding the delta at run time computes)."""
    from deltapack.format.directory import DeltaDir
    from deltapack.io.sources import open_model

    base, ft = pico_pair
    d = DeltaDir.open(api.compress(base, ft, tmp_path / "d", method="lowrank", ratio=1.5, progress=False))
    name = "model.layers.0.mlp.up_proj.weight"
    exact = (open_model(base).get(name).float() + d.decode(name).float())
    rounded = api.merged_state_dict(base, d)[name]
    unrounded = api.merged_state_dict(base, d, merge_dtype=torch.float32)[name]
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded, exact.to(torch.bfloat16))
    assert unrounded.dtype == torch.float32 and torch.equal(unrounded, exact)
    assert not torch.equal(rounded.float(), unrounded)  # the two references really differ here


def test_merge_cli_dtype_float32_writes_the_unrounded_sum(pico_pair, tmp_path):
    """`deltapack merge --dtype float32`: every floating tensor fp32, changed ones exactly base + delta unrounded
    (the reference the serving equality check compares against), config says float32, transformers loads it."""
    base, ft = pico_pair
    d = api.compress(base, ft, tmp_path / "d", method="lowrank", ratio=1.5, progress=False)
    res = CliRunner().invoke(main, ["merge", str(base), str(d), "-o", str(tmp_path / "m"), "--dtype", "float32", "--quiet"])
    assert res.exit_code == 0, res.output
    disk = _load_dir(tmp_path / "m")
    want = api.merged_state_dict(base, d, merge_dtype=torch.float32)
    assert set(disk) == set(want)
    assert all(t.dtype == torch.float32 for t in disk.values())
    assert all(torch.equal(disk[k], want[k].float()) for k in want)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["torch_dtype"] == "float32"
    from transformers import AutoModelForCausalLM

    assert next(AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype="auto").parameters()).dtype == torch.float32
    bad = CliRunner().invoke(main, ["merge", str(base), str(d), "-o", str(tmp_path / "m2"), "--dtype", "int8"])
    assert bad.exit_code != 0 and not (tmp_path / "m2").exists()


def test_only_the_tokenizer_files_that_differ_travel(tmp_path):
    """A fine-tune that re-saved tokenizer_config.json (one key differs) but kept tokenizer.json byte for byte: the
    delta stores the config alone, and every reader still rebuilds the fine-tune's tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(64)}
    vocab["[UNK]"] = 0
    raw_tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    raw_tok.pre_tokenizer = pre_tokenizers.Whitespace()
    base, ft = tmp_path / "base", tmp_path / "ft"
    make_llama(base)
    make_finetune(base, ft)
    PreTrainedTokenizerFast(tokenizer_object=raw_tok, unk_token="[UNK]").save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (ft / name).write_bytes((base / name).read_bytes())
    cfg = json.loads((ft / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 77
    (ft / "tokenizer_config.json").write_text(json.dumps(cfg))

    d = api.compress(base, ft, tmp_path / "d", method="raw", progress=False)
    aux = json.loads((d / "delta_config.json").read_text())["aux"]
    assert aux["tokenizer.json"] == "base" and aux["tokenizer_config.json"] == "delta"
    assert not (d / "hf" / "tokenizer.json").exists()
    _, tok = api.load_merged(base, d)
    assert tok.model_max_length == 77 and tok("w3 w5")["input_ids"] == [3, 5]
    out = api.merge(base, d, tmp_path / "m", progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (ft / name).read_bytes()
