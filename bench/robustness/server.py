"""Hostile requests against a live `deltapack serve` (issue 25): none may get a 5xx, none may fail or change a
concurrent well-formed request, and every delta's pin count returns to 0.

Builds a pico Llama base with a byte-level tokenizer (any text, JSON included, can be spelled; `--model smollm`:
the embedded SmolLM2-135M-Instruct) and deltas of several codecs under a delta root, starts `deltapack serve` as a
subprocess on 127.0.0.1 with an API key and a small body limit, records each good request's answer alone, then sends
--trials hostile requests of many kinds from --concurrency threads while good requests (greedy completions, streams,
chat, structured output) run beside them and are checked against their recorded answers.

Kinds: malformed JSON, wrong types, huge / negative / NaN / infinite numbers, out-of-range seeds and top_p, deep
nesting, NUL bytes, lone surrogates and invalid UTF-8, oversized bodies (streamed and declared), unknown and
unsupported fields, wrong content types, missing or wrong API keys, foreign Host headers, wrong routes and methods,
hostile runtime-load paths, bad grammars and schemas, token ids outside the vocabulary, context overflow, dropped
connections mid-stream, and valid-but-extreme sampling values (which must be answered 200).

Bounded: only 127.0.0.1, --trials requests (plus the good ones), and a wall-clock cap.

    python bench/robustness/server.py                 # the committed run: key "server" of bench/results/robustness.json
    python bench/robustness/server.py --smoke         # ~200 trials, a temp file
    python bench/robustness/server.py --model smollm

The result is merged into the JSON file under "server" (other keys are kept). Exit status 1 if any 5xx, any good
request failed or differed, the server died, or a pin was left.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import httpx  # noqa: E402
import torch  # noqa: E402
from serve_load import _codecs, _cpu_name, _git_commit, make_finetune, rss_bytes, wait_healthy  # noqa: E402

KEY = "robustness-key"
BODY_LIMIT = 1 << 20
SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "n": {"enum": [1, 2, 3]}},
          "required": ["color", "n"], "additionalProperties": False}


def log(msg: str) -> None:
    print(f"[robustness {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- models -----------------------------------------------------------------------------------------------------------
def build(work: Path, model: str) -> tuple[Path, Path, list[str]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltapack import api
    from deltapack.serve.testing import make_byte_tokenizer

    if model == "smollm":
        from deltapack.io.embedded import embedded_model_dir

        base = embedded_model_dir()
    else:
        base = work / "base"
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=288, max_position_embeddings=512)
        LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(base, safe_serialization=True)
        make_byte_tokenizer(base)
    root = work / "deltas"
    root.mkdir()
    names = []
    for i, (name, method, ratio) in enumerate([("raw", "raw", None), ("lowrank", "lowrank", 4.0), ("bitdelta", "bitdelta", 4.0)]):
        ft = work / f"ft_{name}"
        make_finetune(base, ft, seed=200 + i)
        api.compress(base, ft, root / name, method=method, ratio=ratio, progress=False)
        shutil.rmtree(ft)
        names.append(name)
    return base, root, names


# ---- hostile requests ---------------------------------------------------------------------------------------------------
GOOD_BODY = {"model": "raw", "prompt": "hello", "max_tokens": 2, "temperature": 0}
ROUTES = ["/v1/completions", "/v1/chat/completions", "/v1/deltas", "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
          "/tokenize", "/detokenize"]
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "n",
          "stream", "logprobs", "echo", "logit_bias", "stop_token_ids", "allowed_token_ids", "min_tokens",
          "repetition_penalty", "presence_penalty", "frequency_penalty", "response_format", "guided_json",
          "guided_regex", "guided_choice", "guided_grammar", "tools", "tool_choice", "stream_options", "best_of",
          "truncate_prompt_tokens", "name", "path", "lora_name", "lora_path", "tokens", "user", "request_id"]
BAD_VALUES = [None, True, False, 0, -1, 1, 2.5, -1e308, 1e308, 2**63, 2**64, -(2**63) - 1, 10**30, "", "x", "\u00e9",
              [], [1, -5], [[1]], ["a", 3], {}, {"a": 1}, {"type": "json_schema"}, {"type": "yaml"}, [None], "t" * 5000,
              [2**40], {"1": 1e9}, {"-1": 1}, [{"role": "user"}], [{"role": "user", "content": 5}], "[", "(a*)*b"]
UNSUPPORTED = {"use_beam_search": True, "suffix": "x", "bad_words": ["a"], "prompt_logprobs": 1, "logits_processors": ["a.b"],
               "functions": [{"name": "f"}], "audio": {"voice": "x"}, "store": True, "priority": 3, "chat_template": "x",
               "structural_tag": "x", "guided_whitespace_pattern": " ", "best_of": 5, "no_such_field": 1,
               "kv_transfer_params": {"a": 1}, "echo": True, "reasoning_effort": "high"}


def _status_after(url: str, parts, timeout: float) -> int:
    """Send the byte strings of `parts` on a fresh connection (stopping if the server closes it: it may answer
    before the body ends), then read the status line; 0 if none came."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        try:
            for part in parts:
                s.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        try:
            while b"\r\n" not in out:
                chunk = s.recv(4096)
                if not chunk:
                    break
                out += chunk
        except (ConnectionResetError, TimeoutError):
            return 0
    try:
        return int(out.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def raw_request(url: str, data: bytes, timeout: float = 30.0) -> int:
    """Send raw bytes as an HTTP request; the status code."""
    return _status_after(url, [data], timeout)


def streamed_body(url: str, mib: int) -> int:
    """A chunked body of `mib` MiB of spaces: the server must answer 413 once the limit passes."""
    port = url.rsplit(":", 1)[1]
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    piece = b" " * (64 << 10)
    chunks = (f"{len(piece):x}\r\n".encode() + piece + b"\r\n" for _ in range(mib * 16))
    return _status_after(url, itertools.chain([head], chunks, [b"0\r\n\r\n"]), 60)


def make_trial(rng: random.Random, url: str, names: list[str]):
    """One hostile request: (kind, function returning the status code)."""
    auth = {"authorization": f"Bearer {KEY}"}
    jhead = {**auth, "content-type": "application/json"}
    port = url.rsplit(":", 1)[1]

    def post(path, content, headers=jhead, method="POST"):
        def go(c: httpx.Client):
            return c.request(method, path, content=content, headers=headers).status_code
        return go

    def body(obj) -> bytes:
        return json.dumps(obj, ensure_ascii=rng.random() < 0.5).encode()

    model = rng.choice(names + ["base", "nope"])
    kind = rng.choice(["malformed_json", "wrong_types", "numbers", "deep_nesting", "bad_unicode", "huge_body",
                       "unsupported_fields", "content_type", "auth", "host", "routes", "load_paths", "grammar",
                       "token_ids", "disconnect", "extreme_valid", "fuzz"])
    route = rng.choice(ROUTES[:2])
    prompt = {"prompt": "hi"} if route.endswith("/completions") and "chat" not in route else {"messages": [{"role": "user", "content": "hi"}]}
    base_obj = {"model": model, **prompt, "max_tokens": 2}
    if kind == "malformed_json":
        good = body(base_obj)
        data = rng.choice([good[: rng.randrange(1, len(good))], good + b"}", b"{'model': 'raw'}", b"{,}", b"\x00" * 10,
                           bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))), b"", b"[]", b"null", b'"x"',
                           b'{"model": "raw", "prompt": "hi", "max_tokens": 2,}'])
        return kind, post(route, data)
    if kind == "wrong_types":
        obj = dict(base_obj)
        for f in rng.sample(FIELDS, rng.randrange(1, 4)):
            obj[f] = rng.choice(BAD_VALUES)
        return kind, post(rng.choice(ROUTES), body(obj))
    if kind == "numbers":
        field = rng.choice(["max_tokens", "temperature", "top_p", "top_k", "seed", "n", "min_p", "logprobs", "min_tokens",
                            "repetition_penalty", "presence_penalty", "frequency_penalty", "truncate_prompt_tokens"])
        value = rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e-300", "-0", "9" * 5000,
                            str(2**64), str(-(2**63) - 1), str(2**63), "1e308", "-1", "0.0000001"])
        data = body(base_obj)[:-1] + f', "{field}": {value}}}'.encode()
        return kind, post(route, data)
    if kind == "deep_nesting":
        depth = rng.choice([65, 100, 1000, 100000])
        if rng.random() < 0.5:
            data = b"[" * depth + b"]" * depth
        else:
            data = body(base_obj)[:-1] + b', "user": ' + b'{"a":' * depth + b"1" + b"}" * depth + b"}"
        return kind, post(route, data)
    if kind == "bad_unicode":
        bad = rng.choice([b"\\u0000", b"\\ud800", b"\\udfff", b"a\\ud83d", b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\x00"])
        field = rng.choice([b"model", b"prompt", b"stop", b"user"])
        data = b'{"model": "raw", "prompt": "hi", "max_tokens": 2, "' + field + b'": "x' + bad + b'y"}'
        if field in (b"model", b"prompt"):
            data = data.replace(b'"' + field + b'": "' + (b"raw" if field == b"model" else b"hi") + b'", ', b"", 1)
        return kind, post(route, data)
    if kind == "huge_body":
        mode = rng.choice(["declared", "streamed", "plain"])
        if mode == "declared":
            data = (f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {3 << 30}\r\n\r\n{{").encode()
            return kind, lambda c: raw_request(url, data)
        if mode == "streamed":
            return kind, lambda c: streamed_body(url, rng.choice([2, 8, 40]))
        return kind, post(route, body({**base_obj, "prompt": "x" * (BODY_LIMIT + 10)}))
    if kind == "unsupported_fields":
        k = rng.choice(list(UNSUPPORTED))
        return kind, post(route, body({**base_obj, k: UNSUPPORTED[k]}))
    if kind == "content_type":
        ctype = rng.choice(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "", "application/jsonx",
                            "text/json", "application/json-patch+json"])
        headers = {**auth, "content-type": ctype} if ctype else auth
        return kind, post(rng.choice(ROUTES), body(base_obj), headers)
    if kind == "auth":
        headers = rng.choice([{}, {"authorization": "Bearer wrong"}, {"authorization": KEY}, {"authorization": "Basic " + KEY},
                              {"authorization": f"Bearer {KEY}x"}, {"x-api-key": KEY}])
        path = rng.choice(ROUTES + ["/v1/models", "/v1/deltas"])
        return kind, post(path, body(base_obj), {**headers, "content-type": "application/json"},
                          "GET" if path in ("/v1/models", "/v1/deltas") else "POST")
    if kind == "host":
        host = rng.choice(["evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", "localhost.evil", "0.0.0.0", "[::2]", ""])
        return kind, post(route, body(base_obj), {**jhead, "host": host})
    if kind == "routes":
        method, path = rng.choice([("GET", "/v1/completions"), ("PUT", "/v1/chat/completions"), ("GET", "/v1/embeddings"),
                                   ("POST", "/v1/embeddings"), ("GET", "/v1/../../etc/passwd"), ("DELETE", "/v1/deltas/..%2F..%2Fetc"),
                                   ("DELETE", "/v1/deltas/nope"), ("GET", "/v1/models/" + "x" * 3000), ("POST", "/v1/responses"),
                                   ("GET", "/v1/models/%00"), ("PATCH", "/v1/deltas")])
        return kind, post(path, body(base_obj), jhead, method)
    if kind == "load_paths":
        path = rng.choice(["../../etc", "/etc/passwd", "raw/../../..", "x\u0000y", "~/.ssh", "a" * 5000, "", ".", "raw/hf",
                           "/proc/self/fd/0", "nonexistent"])
        name = rng.choice(["raw", "base", "", "n" * 200, "ok-name", "../x", "a b"])
        if rng.random() < 0.5:
            return kind, post("/v1/deltas", body({"name": name, "path": path}))
        return kind, post("/v1/load_lora_adapter", body({"lora_name": name, "lora_path": path}))
    if kind == "grammar":
        field, value = rng.choice([
            ("guided_json", "{not json"), ("guided_json", {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}),
            ("guided_json", {"type": "strang"}), ("guided_regex", "("), ("guided_regex", "(a*)*b" * 50),
            ("guided_regex", "x{99999999}"), ("guided_choice", []), ("guided_choice", [""]), ("guided_choice", ["a"] * 300),
            ("guided_grammar", "root ::= "), ("guided_grammar", "root ::= root"), ("guided_grammar", "%%%"),
            ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": list(range(2000))}}}),
            ("response_format", {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}),
            ("guided_json", {"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}),
            ("guided_json", "x" * 70000), ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]),
        ])
        obj = {**base_obj, field: value, "max_tokens": 8}
        if field == "tools":
            obj = {"model": model, "messages": [{"role": "user", "content": "hi"}], "tools": value, "tool_choice": "required", "max_tokens": 8}
            route = "/v1/chat/completions"
        return kind, post(route, body(obj))
    if kind == "token_ids":
        obj = rng.choice([{"model": model, "prompt": [999999], "max_tokens": 2}, {"model": model, "prompt": [-1], "max_tokens": 2},
                          {"model": model, "prompt": [[]], "max_tokens": 2}, {"model": model, "prompt": [5] * 600, "max_tokens": 2},
                          {"model": model, "prompt": "hi", "max_tokens": 10**12}, {"model": model, "prompt": [5], "stop_token_ids": [10**9]},
                          {"model": model, "prompt": "hi", "logit_bias": {str(i): 1 for i in range(2000)}},
                          {"model": model, "prompt": "hi", "allowed_token_ids": [10**6]}, {"model": model, "tokens": [10**9]}])
        return kind, post("/detokenize" if "tokens" in obj else "/v1/completions", body(obj))
    if kind == "disconnect":
        def go(c: httpx.Client):
            with c.stream("POST", "/v1/completions", json={"model": model if model != "nope" else "raw", "prompt": "hi",
                                                            "max_tokens": 40, "stream": True, "ignore_eos": True}, headers=auth) as r:
                for _ in r.iter_lines():
                    break  # close mid-stream
                return r.status_code
        return kind, go
    if kind == "extreme_valid":
        obj = {"model": rng.choice(names + ["base"]), "prompt": "hi", "max_tokens": 3, "ignore_eos": True,
               **rng.choice([{"temperature": 100.0, "seed": 1}, {"top_k": 2**40, "temperature": 1.0}, {"repetition_penalty": 100.0},
                             {"min_p": 1.0, "temperature": 2.0}, {"top_p": 1e-30, "temperature": 1.0}, {"seed": -(2**63), "temperature": 1},
                             {"logit_bias": {"5": 100, "6": -100}}, {"frequency_penalty": -2.0, "presence_penalty": 2.0},
                             {"n": 4, "temperature": 1.0}, {"min_tokens": 3}, {"guided_choice": ["a", "b"]}])}
        return kind, post("/v1/completions", body(obj))
    # fuzz: random routes, bodies and methods
    data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300))) if rng.random() < 0.3 else body(
        {f: rng.choice(BAD_VALUES) for f in rng.sample(FIELDS, rng.randrange(1, 8))})
    return kind, post(rng.choice(ROUTES), data, jhead, rng.choice(["POST", "POST", "PUT", "DELETE"]))


# ---- good requests ------------------------------------------------------------------------------------------------------
def good_requests(names: list[str]) -> list[tuple[str, dict]]:
    out = []
    for i, m in enumerate(names + ["base"]):
        out.append(("/v1/completions", {"model": m, "prompt": f"tell me {i}", "max_tokens": 8, "temperature": 0, "ignore_eos": True}))
        out.append(("/v1/completions", {"model": m, "prompt": "seeded", "max_tokens": 8, "temperature": 0.9, "seed": 7 + i, "ignore_eos": True}))
        out.append(("/v1/chat/completions", {"model": m, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}))
        out.append(("/v1/chat/completions", {"model": m, "messages": [{"role": "user", "content": "json"}], "max_tokens": 40, "temperature": 0,
                                             "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}}))
        out.append(("stream", {"model": m, "prompt": "stream", "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": True}))
    return out


def run_good(c: httpx.Client, path: str, body: dict) -> str:
    """The answer's text (streams joined), or raise."""
    if path == "stream":
        text = []
        with c.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"stream status {r.status_code}")
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        raise RuntimeError(f"stream error {ev['error']}")
                    text.extend(ch.get("text", "") for ch in ev["choices"])
        return "".join(text)
    r = c.post(path, json=body)
    if r.status_code != 200:
        raise RuntimeError(f"status {r.status_code}: {r.text[:200]}")
    ch = r.json()["choices"][0]
    text = ch["text"] if "text" in ch else ch["message"]["content"]
    if "response_format" in body:
        import jsonschema

        jsonschema.validate(json.loads(text), SCHEMA)
    return text


# ---- main -----------------------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["pico", "smollm"], default="pico")
    ap.add_argument("--trials", type=int, default=1200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-wall-s", type=float, default=1500.0)
    ap.add_argument("--out", type=Path, default=None, help="JSON to merge the result into (default bench/results/robustness.json; smoke: a temp file)")
    ap.add_argument("--smoke", action="store_true", help="~200 trials: checks the code path")
    args = ap.parse_args()
    if args.smoke:
        args.trials = min(args.trials, 200)
    out = args.out or (Path(tempfile.gettempdir()) / "robustness_smoke.json" if args.smoke else ROOT / "bench" / "results" / "robustness.json")
    work = Path(tempfile.mkdtemp(prefix="robust-server-"))
    proc = None
    t_start = time.monotonic()
    try:
        log(f"building models in {work}")
        base, root, names = build(work, args.model)
        from deltapack.serve.app import free_port

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-c", "from deltapack.cli import main; main()", "serve", str(base),
               *sum([["--delta", f"{n}={root / n}"] for n in names], []), "--delta-root", str(root),
               "--host", "127.0.0.1", "--port", str(port), "--max-batch", "8", "--served-model-name", "base",
               "--max-body-bytes", str(BODY_LIMIT), "--quiet"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "DELTAPACK_API_KEY": KEY}
        log("starting server: " + " ".join(cmd[3:]))
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_healthy(url, proc)
        auth = {"authorization": f"Bearer {KEY}"}
        goods = good_requests(names)
        with httpx.Client(base_url=url, timeout=120, headers=auth) as c:
            want = [run_good(c, p, b) for p, b in goods]  # each alone: the reference answers
        rss0 = rss_bytes(proc.pid)
        rng = random.Random(args.seed)
        trials = [make_trial(rng, url, names) for _ in range(args.trials)]
        by_kind: dict[str, dict[str, int]] = {}
        five_xx: list[str] = []
        transport_errors: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()
        good_stats = {"requests": 0, "failed": 0, "samples": []}

        def hostile(i: int) -> None:
            kind, fn = trials[i]
            if time.monotonic() - t_start > args.max_wall_s:
                return
            try:
                with httpx.Client(base_url=url, timeout=120) as c:
                    status = fn(c)
            except (httpx.HTTPError, OSError) as e:
                status = None
                with lock:
                    transport_errors.append(f"{kind}: {e.__class__.__name__}: {e}"[:300])
            with lock:
                by_kind.setdefault(kind, {})[str(status)] = by_kind.setdefault(kind, {}).get(str(status), 0) + 1
                if status is not None and status >= 500:
                    five_xx.append(kind)

        def good_loop(seed: int) -> None:
            r = random.Random(seed)
            with httpx.Client(base_url=url, timeout=120, headers=auth) as c:
                while not stop.is_set():
                    k = r.randrange(len(goods))
                    try:
                        got = run_good(c, *goods[k])
                        ok = got == want[k]
                        err = None if ok else f"differs: {got!r} != {want[k]!r}"
                    except Exception as e:  # any failure of a good request is what this benchmark counts
                        ok, err = False, f"{e.__class__.__name__}: {e}"
                    with lock:
                        good_stats["requests"] += 1
                        if not ok:
                            good_stats["failed"] += 1
                            if len(good_stats["samples"]) < 10:
                                good_stats["samples"].append(f"{goods[k][0]} {goods[k][1]['model']}: {err}"[:300])

        log(f"{len(trials)} hostile requests from {args.concurrency} threads, good requests beside them")
        t0 = time.monotonic()
        good_threads = [threading.Thread(target=good_loop, args=(s,), daemon=True) for s in range(2)]
        for t in good_threads:
            t.start()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(hostile, range(len(trials))))
        stop.set()
        for t in good_threads:
            t.join(180)
        wall = time.monotonic() - t0
        alive = proc.poll() is None
        pins, health = None, None
        if alive:
            with httpx.Client(base_url=url, timeout=30, headers=auth) as c:
                t1 = time.monotonic()
                while time.monotonic() - t1 < 60:  # let aborted rows leave the batch
                    snap = c.get("/v1/deltas").json()
                    pins = sum(d["pins"] for d in snap["data"])
                    if pins == 0:
                        break
                    time.sleep(0.2)
                health = c.get("/health").status_code
                still = [run_good(c, p, b) == w for (p, b), w in zip(goods, want)]
        rss1 = rss_bytes(proc.pid) if alive else 0
        sent = sum(sum(v.values()) for v in by_kind.values())
        result = {
            "command": "python bench/robustness/server.py" + (" --smoke" if args.smoke else "") + (f" --model {args.model}" if args.model != "pico" else ""),
            "device": f"cpu ({_cpu_name()}), server torch threads 1",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": _git_commit(),
            "model": args.model if args.model != "pico" else "pico Llama (hidden 64, 2 layers, byte-level tokenizer, vocab 288)",
            "deltas": {n: _codecs(root / n) for n in names},
            "trials": sent,
            "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
            "five_xx": len(five_xx),
            "five_xx_kinds": sorted(set(five_xx)),
            "transport_errors": len(transport_errors),
            "transport_error_samples": transport_errors[:10],
            "good_requests": good_stats["requests"],
            "good_requests_failed": good_stats["failed"],
            "good_failure_samples": good_stats["samples"],
            "good_requests_correct_after": all(still) if alive else False,
            "pins_after": pins,
            "server_alive": alive,
            "health_after": health,
            "server_rss_mb": {"before": round(rss0 / 2**20, 1), "after": round(rss1 / 2**20, 1)},
            "wall_s": round(wall, 1),
            "limits": {"max_body_bytes": BODY_LIMIT, "max_json_depth": 64, "api_key": True},
        }
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    merged = json.loads(out.read_text()) if out.exists() else {}
    merged["server"] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.part")
    tmp.write_text(json.dumps(merged, indent=1) + "\n")
    os.replace(tmp, out)
    ok = result["five_xx"] == 0 and result["good_requests_failed"] == 0 and alive and pins == 0 and result["good_requests_correct_after"]
    log(f"{sent} hostile requests: {result['five_xx']} 5xx, {result['transport_errors']} transport errors; "
        f"{result['good_requests']} good requests, {result['good_requests_failed']} failed; pins after {pins}; wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
