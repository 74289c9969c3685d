"""Fault injection on the file side (issue 25): every path a delta names stays inside it, the manifest and hf/ are
covered by a digest and checksums, every manifest field is strictly typed and consistent with the stored tensors,
`verify` proves the delta decodes, disk-tier reloads re-check checksums, writing commands never write outside
their output nor over an input, and interrupted runs leave nothing that passes for a delta."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_llama

from deltapack import api
from deltapack.cli import main
from deltapack.errors import DeltapackError, FormatError, InputError
from deltapack.format.directory import DeltaDir
from deltapack.format.manifest import MANIFEST_NAME, Manifest, manifest_digest
from deltapack.methods import CODEC_VARIANTS

# every codec, quantized and float variants (deltapack.methods.CODEC_VARIANTS), lossy ones at 1.4x on the pico pair
CODECS = {k: (m, 1.4 if lossy else None, p) for k, (m, p, lossy) in CODEC_VARIANTS.items()}


@pytest.fixture(scope="module")
def deltas(pico_pair, tmp_path_factory):
    base, ft = pico_pair
    d = tmp_path_factory.mktemp("integrity")
    return {k: api.compress(base, ft, d / k, method=m, ratio=r, params=p, progress=False) for k, (m, r, p) in CODECS.items()}


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def raw(d: Path) -> dict:
    return json.loads((d / MANIFEST_NAME).read_text())


def write(d: Path, man: dict, *, seal: bool = True) -> None:
    """Write a manifest; `seal` recomputes its digest (an edit made on purpose, as an attacker would)."""
    if seal and man.get("format_version", 0) >= 3:
        man["digest"] = manifest_digest(man)
    (d / MANIFEST_NAME).write_text(json.dumps(man))


def first(man: dict, codec: str) -> str:
    return next(n for n, te in man["tensors"].items() if te["codec"] == codec)


def refused(fn, *args, match: str | None = None, **kw) -> str:
    with pytest.raises(DeltapackError) as e:
        fn(*args, **kw)
    if match:
        assert match in str(e.value), str(e.value)
    return str(e.value)


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exc_info
    return r.exit_code, r.output


# ---- 1. arbitrary file write through aux; 2. reads outside the delta --------------------------------------------------
@pytest.mark.parametrize("name", ["../evil", "../../.ssh/authorized_keys", "/tmp/evil", "hf/../../x", "sub/config.json",
                                  ".hidden", "model.safetensors"])
def test_aux_names_cannot_write_outside_or_over_weights(pico_pair, deltas, tmp_path, name):
    base, _ = pico_pair
    d = copy(deltas["lowrank"], tmp_path / "d")
    man = raw(d)
    man["aux"][name] = "delta"
    write(d, man)
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    code, msg = cli("merge", base, d, "-o", out)
    assert code == 2 and "auxiliary file" in msg and "Traceback" not in msg
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["d", "work"]
    assert not Path("/tmp/evil").exists()


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/delta.safetensors", "..",
                                  ".delta.safetensors", "delta.safetensors\x00"])
def test_shard_names_must_be_plain(deltas, tmp_path, name):
    d = copy(deltas["lowrank"], tmp_path / "d")
    (tmp_path / "outside.safetensors").write_bytes(b"secret" * 100)
    man = raw(d)
    old = next(iter(man["files"]))
    man["files"][name] = man["files"].pop(old)
    for te in man["tensors"].values():
        if te["file"] == old:
            te["file"] = name
    write(d, man)
    msg = refused(DeltaDir.open, d, match="not a plain .safetensors file name")
    assert "600" not in msg and "/etc" not in msg.replace(repr(name), "")


def _secret(tmp_path: Path) -> Path:
    s = tmp_path / "secret_dir" / "secret.bin"
    s.parent.mkdir()
    s.write_bytes(os.urandom(631))
    return s


def test_symlinked_shard_is_refused_without_leaking(deltas, tmp_path):
    d = copy(deltas["lowrank"], tmp_path / "d")
    s = _secret(tmp_path)
    shard = next(iter(raw(d)["files"]))
    (d / shard).unlink()
    (d / shard).symlink_to(s)
    for fn in (DeltaDir.open, lambda p: api.verify(None, p), api.inspect):
        msg = refused(fn, d, match="symlink")
        assert str(s) not in msg and "631" not in msg and "secret" not in msg


@pytest.mark.parametrize("where", ["hf_dir", "hf_file", "extra_hf_file", "top_level"])
def test_symlinks_anywhere_in_the_delta_are_refused(deltas, tmp_path, where):
    d = copy(deltas["lowrank"], tmp_path / "d")
    s = _secret(tmp_path)
    if where == "hf_dir":
        shutil.rmtree(d / "hf")
        (d / "hf").symlink_to(s.parent)
    elif where == "hf_file":
        (d / "hf" / "config.json").unlink()
        (d / "hf" / "config.json").symlink_to(s)
    elif where == "extra_hf_file":
        (d / "hf" / "tokenizer.json").symlink_to(s)
    else:
        (d / "notes.txt").symlink_to(s)
    msg = refused(DeltaDir.open, d)
    assert str(s) not in msg and "631" not in msg


def test_unlisted_file_in_hf_is_refused(deltas, tmp_path):
    d = copy(deltas["lowrank"], tmp_path / "d")
    (d / "hf" / "tokenizer.json").write_text("{}")
    refused(DeltaDir.open, d, match="does not list")


def test_checkpoint_index_cannot_name_files_outside(pico_pair, tmp_path):
    base, _ = pico_pair
    b = copy(base, tmp_path / "b")
    (b / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../../etc/passwd"}}))
    from deltapack.io.sources import open_model

    refused(open_model, b, match="not a plain file name")


def test_server_delta_root_refuses_symlinks_out(pico_pair, deltas, tmp_path):
    from deltapack.serve.model import ModelRunner
    from deltapack.serve.tiers import DeltaTiers

    base, _ = pico_pair
    d = copy(deltas["lowrank"], tmp_path / "root" / "d")
    s = _secret(tmp_path)
    shard = next(iter(raw(d)["files"]))
    (d / shard).unlink()
    (d / shard).symlink_to(s)
    tiers = DeltaTiers(ModelRunner(base, device="cpu", dtype="float32"), device_bytes=1 << 30, host_bytes=1 << 30)
    msg = refused(tiers.register, "t", d)
    assert str(s) not in msg and "631" not in msg


# ---- 3. the manifest and hf/ are protected ----------------------------------------------------------------------------
def _edits(man: dict) -> dict:
    """The issue's manifest edits, each a function of a manifest dict."""
    sp, fa, dn = first(man, "sparse"), first(man, "factors"), first(man, "dense")

    def setp(name, key, f):
        def e(m):
            m["tensors"][name]["params"][key] = f(m["tensors"][name]["params"][key])
        return e

    def group(key, f):
        def e(m):
            g = m["tensors"][fa]["params"]["groups"][0]
            g[key] = f(g[key])
        return e

    return {
        "keep_prob_x0.99": setp(sp, "keep_prob", lambda v: v * 0.99),
        "keep_prob_0": setp(sp, "keep_prob", lambda v: 0.0),
        "keep_prob_negative": setp(sp, "keep_prob", lambda v: -v),
        "keep_prob_string": setp(sp, "keep_prob", lambda v: str(v)),
        "keep_prob_above_1": setp(sp, "keep_prob", lambda v: 1.5),
        "seed_plus_1": setp(sp, "seed", lambda v: v + 1),
        "seed_huge": setp(sp, "seed", lambda v: 1 << 70),
        "rank_minus_1": group("rank", lambda v: v - 1),
        "rank_0": group("rank", lambda v: 0),
        "rank_negative": group("rank", lambda v: -1),
        "dtype_int8": lambda m: m["tensors"][fa].update(dtype="int8"),
        "dtype_unknown": lambda m: m["tensors"][dn].update(dtype="float128"),
        "shape_changed": lambda m: m["tensors"][dn].update(shape=m["tensors"][dn]["shape"][::-1] + [1]),
        "entry_dropped": lambda m: m["tensors"].pop(fa),
        "tensors_empty": lambda m: m.update(tensors={}),
        "real_tensor_removed": lambda m: m["removed"].append(dn),
        "fingerprint_null": lambda m: m["base"].update(fingerprint=None),
        "structure_null": lambda m: m["base"].update(structure=None),
        "part_dropped": lambda m: m["tensors"][fa]["parts"].pop(),
        "payload_bytes": lambda m: m["tensors"][fa].update(payload_bytes=m["tensors"][fa]["payload_bytes"] + 2),
        "codec_unknown": lambda m: m["tensors"][fa].update(codec="zip"),
        "tensor_renamed": lambda m: m["tensors"].update({fa + "x": m["tensors"].pop(fa)}),
        "hf_checksum": lambda m: m["hf_files"]["config.json"].update(sha256="0" * 64),
        "format_version_4": lambda m: m.update(format_version=4),
        "aux_dropped": lambda m: m["aux"].pop("config.json"),
    }


@pytest.fixture(scope="module")
def mixed(pico_pair, tmp_path_factory):
    """One delta with sparse, factors and dense entries: the bernoulli DARE delta with one tensor's entry and parts
    taken from a lowrank delta (sealed, consistent), so every edit has its target in one manifest."""
    base, ft = pico_pair
    d = tmp_path_factory.mktemp("mixed")
    dare = api.compress(base, ft, d / "dare", method="dare", ratio=1.4, params={"bits": 16}, progress=False)
    lr = api.compress(base, ft, d / "lr", method="lowrank", ratio=1.4, progress=False)
    from safetensors.torch import load_file, save_file

    from deltapack.format.directory import sha256_file

    mr, ml = raw(dare), raw(lr)
    fa = first(ml, "factors")
    mr["tensors"][fa] = dict(ml["tensors"][fa], file="delta.safetensors")
    sd = load_file(dare / "delta.safetensors")
    ld = load_file(lr / "delta.safetensors")
    sd = {k: v for k, v in sd.items() if not k.startswith(fa + "::")} | {k: v for k, v in ld.items() if k.startswith(fa + "::")}
    save_file(sd, str(dare / "delta.safetensors"))
    f = dare / "delta.safetensors"
    mr["files"] = {"delta.safetensors": {"bytes": f.stat().st_size, "sha256": sha256_file(f)}}
    write(dare, mr)
    DeltaDir.open(dare).check()
    return dare


@pytest.mark.parametrize("seal", [False, True], ids=["unsealed", "resealed"])
def test_manifest_edits_are_refused(pico_pair, mixed, tmp_path, seal):
    """Unsealed: the digest refuses every edit. Resealed (digest recomputed, as an attacker would): the typed checks
    and the stored-tensor consistency refuse every edit that would change the model or crash a reader; the
    remaining ones (an author-level change such as another mask seed) are reported, not counted as caught."""
    base, _ = pico_pair
    names = list(_edits(raw(mixed)))
    caught, passed = [], []
    for name in names:
        d = copy(mixed, tmp_path / name)
        man = raw(d)
        _edits(man)[name](man)
        write(d, man, seal=seal)
        try:
            rep = api.verify(base, d)
            ok = rep["ok"]
        except DeltapackError:
            ok = False
        (caught if not ok else passed).append(name)
    if not seal:
        assert passed == []
    else:
        # a resealed seed changes which positions the kept values land on: indistinguishable from a delta made that way
        assert set(passed) <= {"seed_plus_1"}, passed


def test_duplicate_json_key_is_refused(mixed, tmp_path):
    d = copy(mixed, tmp_path / "d")
    text = (d / MANIFEST_NAME).read_text()
    (d / MANIFEST_NAME).write_text(text[:-1] + ',"unchanged":0}')
    refused(DeltaDir.open, d, match="duplicate key")


def test_random_manifest_bit_flips_are_refused(mixed, tmp_path):
    data = (mixed / MANIFEST_NAME).read_bytes()
    rng = random.Random(0)
    d = copy(mixed, tmp_path / "d")
    for _ in range(48):
        b = bytearray(data)
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
        (d / MANIFEST_NAME).write_bytes(bytes(b))
        refused(DeltaDir.open, d)


def test_truncated_hf_config_is_caught(pico_pair, deltas, tmp_path):
    base, _ = pico_pair
    d = copy(deltas["lowrank"], tmp_path / "d")
    cfg = d / "hf" / "config.json"
    cfg.write_bytes(cfg.read_bytes()[:-10])
    refused(DeltaDir.open, d, match="config.json")  # size differs
    cfg.write_bytes(cfg.read_bytes() + b"}}}}}}}}}}")  # same size, other bytes
    rep = api.verify(base, d)
    assert not rep["ok"] and rep["bad_files"] == ["hf/config.json"]
    code, _ = cli("merge", base, d, "-o", tmp_path / "o")
    assert code == 2 and not (tmp_path / "o").exists()


def test_keep_prob_string_does_not_allocate(mixed, tmp_path):
    d = copy(mixed, tmp_path / "d")
    man = raw(d)
    man["tensors"][first(man, "sparse")]["params"]["keep_prob"] = "0.2"
    write(d, man)
    refused(DeltaDir.open, d, match="keep_prob")


@pytest.mark.parametrize("version", [1, 2])
def test_older_delta_loads_with_warning(pico_pair, deltas, tmp_path, caplog, version):
    base, _ = pico_pair
    d = copy(deltas["lowrank" if version == 1 else "dare_4bit"], tmp_path / "d")
    man = raw(d)
    for k in ("digest", "hf_files"):
        man.pop(k)
    man["format_version"] = version
    man["base"]["fingerprint"] = None
    write(d, man)
    with caplog.at_level(logging.WARNING):
        dd = DeltaDir.open(d)
    assert dd.manifest.format_version == version
    text = caplog.text
    assert f"format version {version}" in text and "not covered by checksums" in text and "wrong base is not detected" in text
    assert api.verify(base, d)["ok"] is False  # no fingerprint to compare with: not a pass
    api.merge(base, d, tmp_path / "o", progress=False)  # still usable


def test_verify_proves_decoding(pico_pair, deltas, tmp_path):
    """A NaN written into a shard with its checksum recomputed passes the checksums; verify's decode catches it."""
    from safetensors.torch import load_file, save_file

    from deltapack.format.directory import sha256_file

    base, _ = pico_pair
    d = copy(deltas["lowrank"], tmp_path / "d")
    f = d / "delta.safetensors"
    sd = load_file(f)
    k = next(k for k in sd if k.endswith("A.float"))
    sd[k] = sd[k].clone()
    sd[k].view(-1)[0] = float("nan")
    save_file(sd, str(f), metadata={"format": "deltapack"})
    man = raw(d)
    man["files"]["delta.safetensors"] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    write(d, man)
    msg = refused(api.verify, base, d, match="non-finite")
    assert "Traceback" not in msg
    rep = api.verify(base, deltas["lowrank"])
    assert rep["ok"] and rep["decode_ok"] and rep["manifest_digest"]


@pytest.mark.parametrize("key", list(CODECS))
def test_every_codec_verifies_and_byte_flips_are_caught(pico_pair, deltas, tmp_path, key):
    base, _ = pico_pair
    assert api.verify(base, deltas[key])["ok"]
    d = copy(deltas[key], tmp_path / "d")
    rng = random.Random(1)
    for f in raw(d)["files"]:
        p = d / f
        b = bytearray(p.read_bytes())
        i = rng.randrange(len(b))
        b[i] ^= 0x10
        p.write_bytes(bytes(b))
    assert not api.verify(base, d)["ok"]
    code, _ = cli("merge", base, d, "-o", tmp_path / "o")
    assert code == 2 and not (tmp_path / "o").exists()


# ---- 4. the server's disk tier ------------------------------------------------------------------------------------------
def test_disk_tier_reload_rechecks_checksums(pico_pair, deltas, tmp_path):
    from deltapack.serve.model import ModelRunner
    from deltapack.serve.tiers import DeltaTiers

    base, _ = pico_pair
    d = copy(deltas["lowrank"], tmp_path / "d")
    tiers = DeltaTiers(ModelRunner(base, device="cpu", dtype="float32"), device_bytes=1 << 30, host_bytes=0)
    t = tiers.register("t", d)
    assert t.tier == "disk"  # host budget 0: straight to disk
    assert tiers.acquire(t)
    tiers.release(t)
    tiers.set_budget("device", 0)  # evicted to the host tier, which has no room: disk
    assert t.tier == "disk"
    f = d / "delta.safetensors"
    b = bytearray(f.read_bytes())
    b[-4] ^= 0xFF  # same size, other bytes
    f.write_bytes(bytes(b))
    tiers.set_budget("device", 1 << 30)
    refused(tiers.acquire, t, match="checksum mismatch")
    assert t.pins == 0


def test_server_refuses_a_new_tensor_the_base_has(pico_pair, deltas, tmp_path):
    """Resealed `in_base: false` on a tensor of the base: served, it would replace the base weight by the delta."""
    from deltapack.serve.model import ModelRunner
    from deltapack.serve.tiers import DeltaTiers

    base, _ = pico_pair
    d = copy(deltas["lowrank"], tmp_path / "d")
    man = raw(d)
    man["tensors"][first(man, "factors")]["in_base"] = False
    write(d, man)
    tiers = DeltaTiers(ModelRunner(base, device="cpu", dtype="float32"), device_bytes=1 << 30, host_bytes=1 << 30)
    refused(tiers.register, "t", d, match="new beside the base")
    refused(api.merge, base, d, tmp_path / "o", progress=False, match="new beside the base")


# ---- 6. output paths -------------------------------------------------------------------------------------------------------
def test_merge_output_into_inputs_refused(pico_pair, deltas, tmp_path):
    base, _ = pico_pair
    b = copy(base, tmp_path / "b")
    d = copy(deltas["lowrank"], tmp_path / "d")
    (tmp_path / "unrelated.txt").write_text("keep me")
    before = {p: p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()}
    for out in (b, d, tmp_path, b / "sub", d / "hf"):
        code, msg = cli("merge", b, d, "-o", out, "--overwrite")
        assert code == 2 and "input" in msg, msg
    assert {p: p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()} == before


def test_compress_export_share_many_output_into_inputs_refused(pico_pair, deltas, tmp_path):
    base, ft = pico_pair
    b = copy(base, tmp_path / "b")
    f = copy(ft, tmp_path / "f")
    d = copy(deltas["lowrank"], tmp_path / "d")
    before = {p: p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()}
    for out in (b, f, tmp_path, f / "x"):
        code, msg = cli("compress", b, f, "-o", out, "--overwrite", "-m", "lowrank", "-r", "1.4", "--quiet")
        assert code == 2 and "input" in msg, msg
    for out in (d, tmp_path, d / "lora"):
        code, msg = cli("export-lora", d, "-o", out, "--overwrite")
        assert code == 2 and "input" in msg, msg
    from deltapack.scale.many import compress_many
    from deltapack.share.pipeline import drop_and_heal, share

    for out in (f, tmp_path):
        refused(share, f, out, overwrite=True, match="input")
        refused(drop_and_heal, f, out, overwrite=True, match="input")
    refused(compress_many, b, [str(f)], tmp_path, method="lowrank", ratio=1.4, overwrite=True, match="input")
    refused(compress_many, b, {"b": str(f)}, tmp_path, method="lowrank", ratio=1.4, overwrite=True, match="input")
    assert {p: p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()} == before


# ---- 8. interrupted runs ------------------------------------------------------------------------------------------------------
def test_stale_temp_dirs_are_cleaned_and_never_read_as_deltas(pico_pair, deltas, tmp_path, caplog):
    from deltapack.io.writer import _HOST_TAG

    base, _ = pico_pair
    dead = 2**22 + 12345  # above any pid_max default: no such process
    stale = tmp_path / f".out.tmp-{_HOST_TAG}-{dead}-abcd"
    copy(deltas["lowrank"], stale)  # a run killed after its manifest was written
    foreign = tmp_path / ".out.tmp-zz9"  # an older or other-host run: listed, left alone
    foreign.mkdir()
    refused(DeltaDir.open, stale, match="unfinished")
    code, msg = cli("verify", base, stale)
    assert code == 2 and "unfinished" in msg
    with caplog.at_level(logging.WARNING):
        api.merge(base, deltas["lowrank"], tmp_path / "out", progress=False)
    assert not stale.exists() and foreign.exists()
    assert ".out.tmp-zz9" in caplog.text


def test_compress_writes_the_manifest_last(pico_pair, tmp_path, monkeypatch):
    """A run killed while writing leaves a temp dir with no manifest: nothing that passes inspect or verify."""
    import sys

    import deltapack.compress  # noqa: F401

    asm = sys.modules["deltapack.compress.assemble"]  # the package re-exports a function of the same name
    base, ft = pico_pair
    seen = []
    real = asm.write_bytes_atomic

    def spy(path, data):
        seen.append(Path(path).name)
        return real(path, data)

    monkeypatch.setattr(asm, "write_bytes_atomic", spy)
    api.compress(base, ft, tmp_path / "o", method="lowrank", ratio=1.4, progress=False)
    assert seen[-1] == MANIFEST_NAME and seen.count(MANIFEST_NAME) == 1
    assert Manifest.load(tmp_path / "o" / MANIFEST_NAME).format_version == 3
    # the card's ratio counts the manifest: inspect recomputes the same number
    card = (tmp_path / "o" / "README.md").read_text()
    assert f"true ratio {api.inspect(tmp_path / 'o')['true_ratio']:.1f}x" in card


def test_inputs_other_than_delta_dirs(tmp_path):
    """A safetensors header whose shape disagrees with its byte range is an input error, not a reshape traceback."""
    import struct

    from deltapack.io.safetensors_file import SafetensorsFile

    head = json.dumps({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "a.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * 8)
    with pytest.raises(InputError, match="does not fit"):
        SafetensorsFile(tmp_path / "a.safetensors")
    make_llama(tmp_path / "m")  # a valid one still reads
    assert SafetensorsFile(tmp_path / "m" / "model.safetensors").keys()
    with pytest.raises(FormatError):
        Manifest.parse(b'{"format":"deltapack","format_version":2,"x":' + b"[" * 100000 + b"]" * 100000 + b"}")
    with pytest.raises(FormatError):
        Manifest.parse(b'{"format":"deltapack","format_version":2,"target_ratio":NaN}')
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def nan_pair(tmp_path_factory):
    """A fine-tune with one NaN weight (a diverged run, a bad conversion): before, auto and delta-come crashed while
    writing their manifest ("Out of range float values are not JSON compliant"), lowrank blamed its own delta, and
    dare wrote a file that rebuilds a different model than the fine-tune, silently."""
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("nan")
    make_llama(d / "base")
    shutil.copytree(d / "base", d / "ft")
    sd = load_file(d / "ft" / "model.safetensors")
    for k in sd:
        if sd[k].is_floating_point():
            sd[k] = sd[k] + (0.01 * torch.randn(sd[k].shape)).to(sd[k].dtype)
    sd["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(sd, d / "ft" / "model.safetensors", metadata={"format": "pt"})
    return d / "base", d / "ft"


@pytest.mark.parametrize("method", ["auto", "dare", "delta-come", "lowrank"])
def test_lossy_compress_of_a_nan_fine_tune_is_refused_by_name(nan_pair, tmp_path, method):
    base, ft = nan_pair
    out = tmp_path / "d"
    with pytest.raises(InputError) as e:
        api.compress(base, ft, out, method=method, ratio=1.4, progress=False)
    assert "model.layers.0.mlp.down_proj.weight" in str(e.value) and "--method lossless" in str(e.value)
    assert not out.exists(), "nothing half-written"
    code, output = cli("compress", base, ft, "-o", tmp_path / "c", "--method", method, "--ratio", "1.4")
    assert code != 0 and "non-finite" in output and not (tmp_path / "c").exists()


def test_lossless_keeps_a_nan_fine_tune_exactly(nan_pair, tmp_path):
    base, ft = nan_pair
    out = api.compress(base, ft, tmp_path / "d", method="lossless", progress=False)
    merged = api.merge(base, out, tmp_path / "m", progress=False)
    from safetensors.torch import load_file

    a, b = load_file(Path(ft) / "model.safetensors"), {}
    for f in Path(merged).glob("*.safetensors"):
        b.update(load_file(f))
    key = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(a[key].view(torch.int16), b[key].view(torch.int16)), "NaN bits and all"
