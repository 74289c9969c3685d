"""Bad input: a one-line clear error, exit code 2, and nothing written (no output, no temp directory left)."""

import json
import pickle
import shutil

import pytest
import torch
from click.testing import CliRunner

from deltapack import api
from deltapack.cli import main

from conftest import make_llama


def run_cli(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


def assert_clean_failure(code, output, message, out_dir):
    assert code == 2, output
    err_lines = [l for l in output.splitlines() if l.startswith("error: ")]
    assert len(err_lines) == 1, output
    assert message in err_lines[0], output
    assert not out_dir.exists()
    leftovers = [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.tmp")]
    assert not leftovers


@pytest.fixture(scope="module")
def delta_lowrank(pico_pair, tmp_path_factory):
    base, ft = pico_pair
    return api.compress(base, ft, tmp_path_factory.mktemp("dl") / "delta", method="lowrank", ratio=1.5, progress=False)


def test_different_architectures(pico_pair, tmp_path):
    base, ft = pico_pair
    other = tmp_path / "ft_mistral"
    shutil.copytree(ft, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (other / "config.json").write_text(json.dumps(cfg))
    code, out = run_cli("compress", base, other, "-o", tmp_path / "o", "--ratio", 2)
    assert_clean_failure(code, out, "architectures differ", tmp_path / "o")


def test_mismatched_shapes(pico_pair, tmp_path):
    base, _ = pico_pair
    make_llama(tmp_path / "wide", hidden=64)
    code, out = run_cli("compress", base, tmp_path / "wide", "-o", tmp_path / "o", "--ratio", 2)
    assert_clean_failure(code, out, "shape mismatch", tmp_path / "o")


def test_delta_on_wrong_base_same_shapes(pico_pair, delta_lowrank, tmp_path):
    make_llama(tmp_path / "other_base", seed=99)  # same architecture and shapes, other weights
    code, out = run_cli("merge", tmp_path / "other_base", delta_lowrank, "-o", tmp_path / "o")
    assert_clean_failure(code, out, "base weights differ", tmp_path / "o")
    code, out = run_cli("verify", tmp_path / "other_base", delta_lowrank)
    assert code == 2 and "MISMATCH" in out


def test_delta_on_wrong_base_other_structure(delta_lowrank, tmp_path):
    make_llama(tmp_path / "big_base", hidden=64)
    code, out = run_cli("merge", tmp_path / "big_base", delta_lowrank, "-o", tmp_path / "o")
    assert_clean_failure(code, out, "different base", tmp_path / "o")


def test_truncated_delta_file(pico_pair, delta_lowrank, tmp_path):
    base, _ = pico_pair
    bad = tmp_path / "trunc"
    shutil.copytree(delta_lowrank, bad)
    f = next(bad.glob("delta*.safetensors"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, out = run_cli("merge", base, bad, "-o", tmp_path / "o")
    assert_clean_failure(code, out, "truncated", tmp_path / "o")


def test_corrupted_delta_file(pico_pair, delta_lowrank, tmp_path):
    base, _ = pico_pair
    bad = tmp_path / "corrupt"
    shutil.copytree(delta_lowrank, bad)
    f = next(bad.glob("delta*.safetensors"))
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF  # same size, one flipped byte in the payload
    f.write_bytes(bytes(data))
    code, out = run_cli("merge", base, bad, "-o", tmp_path / "o")
    assert_clean_failure(code, out, "checksum mismatch", tmp_path / "o")
    code, out = run_cli("verify", base, bad)
    assert code == 2 and "checksums: BAD" in out


def test_corrupted_manifest(pico_pair, delta_lowrank, tmp_path):
    base, _ = pico_pair
    bad = tmp_path / "badman"
    shutil.copytree(delta_lowrank, bad)
    m = bad / "delta_config.json"
    m.write_text(m.read_text()[:200])
    code, out = run_cli("merge", base, bad, "-o", tmp_path / "o")
    assert_clean_failure(code, out, "not valid JSON", tmp_path / "o")


def test_unknown_method(pico_pair, tmp_path):
    base, ft = pico_pair
    code, out = run_cli("compress", base, ft, "-o", tmp_path / "o", "--method", "zip")
    assert_clean_failure(code, out, "unknown method 'zip'", tmp_path / "o")


def test_bad_method_parameter(pico_pair, tmp_path):
    base, ft = pico_pair
    code, out = run_cli("compress", base, ft, "-o", tmp_path / "o", "-m", "dare", "-p", "bits=3.5")
    assert_clean_failure(code, out, "bad parameter for dare", tmp_path / "o")


@pytest.mark.parametrize(
    "method,ratio,message",
    [("bitdelta", 40, "not reachable"), ("lowrank", 1e6, "not reachable"), ("lowrank", 0.5, "above 1"), ("raw", 16, "lossless")],
)
def test_impossible_ratio(pico_pair, tmp_path, method, ratio, message):
    base, ft = pico_pair
    code, out = run_cli("compress", base, ft, "-o", tmp_path / "o", "-m", method, "--ratio", ratio)
    assert_clean_failure(code, out, message, tmp_path / "o")


def test_missing_input(tmp_path):
    code, out = run_cli("compress", tmp_path / "nope", tmp_path / "nope2", "-o", tmp_path / "o")
    assert_clean_failure(code, out, "model not found", tmp_path / "o")


def test_output_exists_is_not_clobbered(pico_pair, tmp_path):
    base, ft = pico_pair
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    code, out = run_cli("compress", base, ft, "-o", tmp_path / "o", "--ratio", 2)
    assert code == 2 and "already exists" in out
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_bin_checkpoint_with_code_is_refused(pico_pair, tmp_path):
    base, _ = pico_pair
    evil = tmp_path / "evil"
    shutil.copytree(base, evil)
    for f in evil.glob("*.safetensors"):
        f.unlink()
    with open(evil / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Evil()}, f)
    code, out = run_cli("compress", base, evil, "-o", tmp_path / "o", "--ratio", 2)
    assert_clean_failure(code, out, "refusing to load", tmp_path / "o")


def test_plain_bin_checkpoint_is_read(pico_pair, tmp_path):
    """A .bin of plain tensors goes through the weights_only loader and round-trips exactly."""
    from safetensors.torch import load_file

    base, ft = pico_pair
    binft = tmp_path / "binft"
    binft.mkdir()
    shutil.copy(ft / "config.json", binft / "config.json")
    sd = load_file(ft / "model.safetensors")
    torch.save(sd, binft / "pytorch_model.bin")
    d = api.compress(base, binft, tmp_path / "d", method="raw", progress=False)
    out = api.merge(base, d, tmp_path / "m", progress=False)
    got = load_file(out / "model.safetensors")
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    code, out = run_cli("inspect", tmp_path / "nodelta")
    assert code == 2 and "not found" in out
    code, out = run_cli("compress", "someorg/somemodel@v1", "someorg/other@abc123", "-o", tmp_path / "o")
    assert_clean_failure(code, out, "cannot fetch someorg/somemodel@v1", tmp_path / "o")


def test_identical_models_error(pico_pair, tmp_path):
    base, _ = pico_pair
    code, out = run_cli("compress", base, base, "-o", tmp_path / "o", "--ratio", 2)
    assert_clean_failure(code, out, "identical", tmp_path / "o")
