"""CLI settings: a flag beats the config file, the config file beats the default, for every command that reads a
config (compress, compress-many); `compress --threads` writes the same bytes whatever the thread count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from deltapack.cli import main

FILE = {"method": "delta-come", "ratio": 32, "calib": "file.txt", "params": {"allocator": "optimal", "rank": 3}}


@pytest.fixture
def captured(monkeypatch):
    """The settings each command hands to its driver (the drivers themselves do not run)."""
    got: dict = {}

    def fake_compress(base, ft, out, **kw):
        got.update(kw)
        return Path(out)

    def fake_many(base, fts, out, **kw):
        got.update(kw)
        return {"outputs": {}, "encoded_units": [], "skipped_units": [], "finished_before": [], "seconds": 0, "backend": None}

    monkeypatch.setattr("deltapack.compress.compress", fake_compress)
    monkeypatch.setattr("deltapack.scale.many.compress_many", fake_many)
    monkeypatch.setattr("deltapack.api.inspect", lambda p: {"changed_tensors": 0, "total_bytes": 0, "true_ratio": 1, "nominal_ratio": 1})
    return got


def _cfg(tmp_path: Path, data: dict, suffix=".json") -> str:
    p = tmp_path / f"cfg{suffix}"
    if suffix == ".json":
        p.write_text(json.dumps(data))
    else:
        import yaml

        p.write_text(yaml.safe_dump(data))
    return str(p)


COMMANDS = {
    "compress": lambda *extra: ["compress", "B", "F", "-o", "OUT", *extra],
    "compress-many": lambda *extra: ["compress-many", "B", "F", "-o", "OUT", *extra],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_beat_the_file_and_the_file_beats_defaults(command, captured, tmp_path):
    run = COMMANDS[command]
    cfg = _cfg(tmp_path, FILE, ".yaml")
    # no flags: every setting from the file
    res = CliRunner().invoke(main, run("--config", cfg))
    assert res.exit_code == 0, res.output
    assert (captured["method"], captured["ratio"], captured["calib"]) == ("delta-come", 32, "file.txt")
    assert captured["params"] == {"allocator": "optimal", "rank": 3}
    # flags: each beats the file, even a flag equal to the command's default (-m auto / -m lowrank)
    default_method = "auto"  # compress and compress-many share the default
    for flags, want in [
        (["-m", "lowrank"], {"method": "lowrank", "ratio": 32}),
        (["-m", default_method], {"method": default_method}),
        (["--method", "dare", "-r", "8"], {"method": "dare", "ratio": 8}),
        (["--calib", "flag.txt"], {"calib": "flag.txt", "method": "delta-come"}),
        (["-p", "rank=5"], {"params": {"allocator": "optimal", "rank": 5}}),
    ]:
        captured.clear()
        res = CliRunner().invoke(main, run("--config", cfg, *flags))
        assert res.exit_code == 0, res.output
        for k, v in want.items():
            assert captured[k] == v, (flags, k, captured[k])
    # no config: the defaults
    captured.clear()
    assert CliRunner().invoke(main, run()).exit_code == 0
    assert captured["method"] == default_method and captured["ratio"] is None and captured["calib"] is None


def test_a_file_setting_only_some_fields_leaves_the_others_at_their_defaults(captured, tmp_path):
    res = CliRunner().invoke(main, COMMANDS["compress"]("--config", _cfg(tmp_path, {"ratio": 4, "method": None})))
    assert res.exit_code == 0, res.output
    assert captured["method"] == "auto" and captured["ratio"] == 4


def test_bad_config_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(main, COMMANDS["compress"]("--config", _cfg(tmp_path, {"mehtod": "dare"})))
    assert res.exit_code == 2 and "mehtod" in res.output


def test_threads_do_not_change_the_bytes(pico_pair, tmp_path, monkeypatch):
    """delta-come with 1 and with 2 worker processes: byte-identical directories."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # the manifest's time stamp
    monkeypatch.delenv("DELTAPACK_THREADS", raising=False)
    base, ft = pico_pair
    outs = []
    for n in (1, 2):
        out = tmp_path / f"t{n}"
        res = CliRunner().invoke(main, ["compress", str(base), str(ft), "-o", str(out), "-m", "delta-come", "-r", "1.3",
                                        "--threads", str(n), "--quiet"])
        assert res.exit_code == 0, res.output
        outs.append({p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert outs[0].keys() == outs[1].keys() and outs[0] == outs[1]
