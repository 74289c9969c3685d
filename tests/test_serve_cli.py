"""`deltapack serve` as a user runs it: a real process with a delta, /health, one request, clean shutdown on SIGINT;
and `--help` without the serving dependencies being imported at CLI start."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import torch

from conftest import make_finetune, make_llama
from deltapack import api
from deltapack.serve.app import free_port
from deltapack.serve.testing import greedy_reference, merged_model, stop_process, to_float32

PROMPT = [9, 8, 7, 6, 5]


def test_serve_help():
    from click.testing import CliRunner

    from deltapack.cli import main

    r = CliRunner().invoke(main, ["serve", "--help"])
    assert r.exit_code == 0
    for opt in ("--delta", "--delta-root", "--host", "--port", "--max-batch", "--gpu-delta-bytes"):
        assert opt in r.output
    r = CliRunner().invoke(main, ["serve", "base", "--delta", "no-equals-sign"])
    assert r.exit_code == 2 and "NAME=PATH" in r.output


def test_cli_serve_subprocess(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_llama(tmp_path / "base", hidden=64, vocab=128, dtype=torch.float32)
        make_finetune(tmp_path / "base", tmp_path / "ft", scale=0.6, seed=40)
        to_float32(tmp_path / "ft")
        delta = api.compress(tmp_path / "base", tmp_path / "ft", tmp_path / "a", method="raw", progress=False)
        ref = greedy_reference(merged_model(tmp_path / "base", delta), PROMPT, 6)
    finally:
        torch.set_num_threads(n)
    port = free_port()
    cmd = [sys.executable, "-c", "from deltapack.cli import main; main()", "serve", str(tmp_path / "base"), "--delta", f"a={delta}",
           "--port", str(port), "--served-model-name", "base", "--max-batch", "4", "--warmup", "on"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read().decode()[-2000:])
            assert time.monotonic() - t0 < 120, "server did not come up"
            time.sleep(0.2)
        r = httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == ref
    finally:
        stop_process(proc)
    assert proc.returncode == 0
    assert "warm-up done" in proc.stdout.read().decode()  # --warmup on ran before the server listened
