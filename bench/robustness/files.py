"""Hostile and damaged delta directories (issue 25, the file side): none may merge into a wrong model, crash a
reader with a traceback, make the server answer 5xx, or read or write a file outside the delta / the output.

Builds real deltas of every codec against the embedded SmolLM2-135M-Instruct (`--model pico`: a pico random Llama)
from a synthetic fine-tune: base + a rank-8 structured perturbation of every matrix and a small one of every norm
in the first --layers decoder layers (the other tensors unchanged, as in a partial fine-tune). Then applies
--per-delta mutations to a copy of each delta and runs, in this process, `verify` (with the base), `merge` and a
runtime load on a live server (`POST /v1/deltas` under --delta-root, then a greedy completion compared with the
intact delta's). Mutations:

  shard_flip / shard_truncate / shard_overwrite / shard_extend / shard_delete   payload damage
  manifest_flip / manifest_truncate                                            random damage to delta_config.json
  edit:<field> (digest left as is)                                            the issue's manifest edits
  resealed:<field> (digest recomputed, as an attacker would)                  typed validation and consistency
  hf_truncate / hf_flip / hf_extra                                            the hf/ folder
  path:<trick>                                                                shard or aux names leaving the directory,
                                                                              symlinks out (shard, hf/ file, hf/ itself)
  tier_reload                                                                 a served delta's shard rewritten on disk
                                                                              (same size) while it sits in the disk tier

Outcomes per trial: refused (verify, merge and the server load all refused it), harmless (accepted, with merged
files and completion identical to the intact delta's),
crash (an exception other than deltapack's own clear errors: what the CLI would print as a traceback), silent_wrong
(merge exit 0 with weights or config differing from the intact delta's merge, or a served completion differing),
five_xx (the server answered a load or a completion with 5xx). Outside access: a process audit hook records every
file opened under the sentinel directory the path tricks point at, and the work area is snapshotted around each
trial (no file may appear outside the merge output).
`resealed:` edits a reader cannot tell from a delta made that way (another mask seed, an in-range keep rate whose
kept count still matches) are listed under "resealed_accepted", not counted as silent_wrong: whoever can recompute
the digest can write any delta. Everything else is.

    python bench/robustness/files.py                    # the committed run: key "files" of bench/results/robustness.json
    python bench/robustness/files.py --smoke            # pico model, few trials, a temp file
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import httpx  # noqa: E402
import torch  # noqa: E402
from serve_load import _cpu_name, _git_commit  # noqa: E402

from deltapack import api  # noqa: E402
from deltapack.errors import DeltapackError  # noqa: E402
from deltapack.format.manifest import MANIFEST_NAME, manifest_digest  # noqa: E402
from deltapack.methods import CODEC_VARIANTS  # noqa: E402

# every codec, quantized and float variants (deltapack.methods.CODEC_VARIANTS), lossy ones at 8x
CODECS = {k: (m, 8.0 if lossy else None, p) for k, (m, p, lossy) in CODEC_VARIANTS.items()}
PROMPT = "The capital of France is"


def log(msg: str) -> None:
    print(f"[files {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- models ------------------------------------------------------------------------------------------------------------
def build_models(work: Path, model: str, layers: int) -> tuple[Path, Path]:
    from safetensors.torch import load_file, save_file

    if model == "smollm":
        from deltapack.io.embedded import embedded_model_dir

        base = embedded_model_dir()
    else:
        from conftest import make_llama

        from deltapack.serve.testing import make_word_tokenizer

        base = work / "base"
        make_llama(base, hidden=64, layers=2, vocab=128, dtype=torch.float32)
        make_word_tokenizer(base, 128)
    ft = work / "ft"
    ft.mkdir()
    sd = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for k, v in sd.items():
        if not any(f"layers.{i}." in k for i in range(layers)):
            continue
        x = v.float()
        if v.dim() == 2:
            r = 8
            d = torch.randn(v.shape[0], r, generator=g) @ torch.randn(r, v.shape[1], generator=g) / r**0.5
            d += 0.1 * torch.randn(v.shape, generator=g)
        else:
            d = torch.randn(v.shape, generator=g)
        sd[k] = (x + 0.02 * x.std() * d).to(v.dtype)
    save_file(sd, str(ft / "model.safetensors"), metadata={"format": "pt"})
    for f in base.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copyfile(f, ft / f.name)
    return base, ft


# ---- mutations ------------------------------------------------------------------------------------------------------------
def _raw(d: Path) -> dict:
    return json.loads((d / MANIFEST_NAME).read_text())


def _write(d: Path, man: dict, seal: bool) -> None:
    if seal:
        man["digest"] = manifest_digest(man)
    (d / MANIFEST_NAME).write_text(json.dumps(man))


def _first(man: dict, pred) -> str | None:
    return next((n for n, te in man["tensors"].items() if pred(te)), None)


def field_edits(man: dict) -> dict:
    """The issue's manifest edits that apply to this delta: name -> function(manifest dict)."""
    out = {}
    lossy = _first(man, lambda te: te["codec"] != "dense")
    dense = _first(man, lambda te: te["codec"] == "dense")
    sparse = _first(man, lambda te: te["codec"] == "sparse")
    fac = _first(man, lambda te: te["codec"] == "factors")
    dq = _first(man, lambda te: te["codec"] == "deltadq")
    sign = _first(man, lambda te: te["codec"] == "sign")

    def p(name, key, f):
        return lambda m: m["tensors"][name]["params"].__setitem__(key, f(m["tensors"][name]["params"][key]))

    if sparse:
        out |= {"keep_prob_x0.99": p(sparse, "keep_prob", lambda v: v * 0.99),
                "keep_prob_0": p(sparse, "keep_prob", lambda v: 0.0),
                "keep_prob_negative": p(sparse, "keep_prob", lambda v: -v),
                "keep_prob_string": p(sparse, "keep_prob", lambda v: str(v)),
                "seed_plus_1": p(sparse, "seed", lambda v: v + 1),
                "bits_minus_1": p(sparse, "bits", lambda v: v - 1)}
    if fac:
        def grp(key, f):
            return lambda m: m["tensors"][fac]["params"]["groups"][0].__setitem__(key, f(m["tensors"][fac]["params"]["groups"][0][key]))

        out |= {"rank_minus_1": grp("rank", lambda v: v - 1), "bits_minus_1": grp("bits", lambda v: v - 1),
                "rank_negative": grp("rank", lambda v: -1)}
    if dq:
        out |= {"seed_plus_1": p(dq, "seed", lambda v: v + 1), "bits_minus_1": p(dq, "bits", lambda v: v - 1),
                "keep_minus_1": p(dq, "keep", lambda v: v - 1), "g_string": p(dq, "g", lambda v: str(v))}
    if sign:
        out |= {"planes_plus_1": p(sign, "planes", lambda v: v + 1), "scale_mode": p(sign, "scale", lambda v: "matrix" if v == "row" else "row")}
    t = lossy or dense
    out |= {
        "dtype_int8": lambda m: m["tensors"][t].__setitem__("dtype", "int8"),
        "dtype_float16": lambda m: m["tensors"][t].__setitem__("dtype", "float16"),
        "entry_dropped": lambda m: m["tensors"].pop(t),
        "tensors_empty": lambda m: m.__setitem__("tensors", {}),
        "real_tensor_in_removed": lambda m: m["removed"].append(t),
        "fingerprint_null": lambda m: m["base"].__setitem__("fingerprint", None),
        "structure_null": lambda m: m["base"].__setitem__("structure", None),
        "tensor_renamed": lambda m: m["tensors"].__setitem__(t + "_x", m["tensors"].pop(t)),
        "in_base_false": lambda m: m["tensors"][t].__setitem__("in_base", False),
        "shape_transposed": lambda m: m["tensors"][t].__setitem__("shape", m["tensors"][t]["shape"][::-1]),
        "codec_renamed": lambda m: m["tensors"][t].__setitem__("codec", "dense" if m["tensors"][t]["codec"] != "dense" else "factors"),
        "part_dropped": lambda m: m["tensors"][t]["parts"].pop(),
        "side_bytes": lambda m: m["tensors"][t].__setitem__("side_bytes", m["tensors"][t]["side_bytes"] + 1),
        "aux_to_base": lambda m: m["aux"].__setitem__("config.json", "base"),
        "version_1": lambda m: m.__setitem__("format_version", 1),
    }
    if dense:
        out["dense_shape_x2"] = lambda m: m["tensors"][dense].__setitem__("shape", [2 * m["tensors"][dense]["shape"][0], *m["tensors"][dense]["shape"][1:]])
    return out


def duplicate_key(d: Path) -> None:
    text = (d / MANIFEST_NAME).read_text()
    (d / MANIFEST_NAME).write_text(text[:-1] + ',"unchanged":0}')


def path_tricks(outside: Path) -> dict:
    secret = outside / "secret.safetensors"

    def rename_shard(new):
        def f(d):
            man = _raw(d)
            old = next(iter(man["files"]))
            man["files"][new] = man["files"].pop(old)
            for te in man["tensors"].values():
                if te["file"] == old:
                    te["file"] = new
            _write(d, man, True)
        return f

    def aux(name):
        def f(d):
            man = _raw(d)
            man["aux"][name] = "delta"
            man["hf_files"][name] = man["hf_files"]["config.json"]
            _write(d, man, True)
            shutil.copyfile(d / "hf" / "config.json", d / "hf" / "x.json")
        return f

    def symlink_shard(d):
        f = d / next(iter(_raw(d)["files"]))
        shutil.copyfile(f, secret)
        f.unlink()
        f.symlink_to(secret)

    def symlink_hf_file(d):
        f = d / "hf" / "config.json"
        shutil.copyfile(f, outside / "config.json")
        f.unlink()
        f.symlink_to(outside / "config.json")

    def symlink_hf_dir(d):
        hf_out = outside / "hf"
        if hf_out.exists():
            shutil.rmtree(hf_out)
        shutil.copytree(d / "hf", hf_out)
        shutil.rmtree(d / "hf")
        (d / "hf").symlink_to(hf_out)

    def symlink_tokenizer(d):
        (d / "hf" / "tokenizer.json").symlink_to(outside / "passwd")

    return {
        "shard_dotdot": rename_shard("../" + secret.name), "shard_absolute": rename_shard(str(secret)),
        "shard_nested": rename_shard("sub/../delta.safetensors"), "aux_dotdot": aux("../../pwned"),
        "aux_absolute": aux(str(outside / "pwned")), "aux_ssh": aux("../.ssh/authorized_keys"),
        "symlink_shard": symlink_shard, "symlink_hf_file": symlink_hf_file, "symlink_hf_dir": symlink_hf_dir,
        "symlink_tokenizer": symlink_tokenizer,
    }


def mutations(d: Path, rng: random.Random, n: int, outside: Path) -> list[tuple[str, object]]:
    """`n` mutations of delta `d` (functions of a copy's path), a fixed mix of every kind."""
    man = _raw(d)
    shards = list(man["files"])

    def shard_op(op):
        def f(c):
            p = c / rng.choice(shards)
            b = bytearray(p.read_bytes())
            if op == "flip":
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
            elif op == "truncate":
                b = b[: rng.randrange(len(b))]
            elif op == "overwrite":
                i = rng.randrange(len(b) - 8)
                b[i : i + 8] = os.urandom(8)
            elif op == "extend":
                b += os.urandom(rng.randrange(1, 64))
            elif op == "delete":
                p.unlink()
                return
            p.write_bytes(bytes(b))
        return f

    def manifest_flip(c):
        b = bytearray((c / MANIFEST_NAME).read_bytes())
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
        (c / MANIFEST_NAME).write_bytes(bytes(b))

    def manifest_truncate(c):
        b = (c / MANIFEST_NAME).read_bytes()
        (c / MANIFEST_NAME).write_bytes(b[: rng.randrange(len(b))])

    def hf_op(op):
        def f(c):
            p = c / "hf" / "config.json"
            b = bytearray(p.read_bytes())
            if op == "truncate":
                b = b[: len(b) // 2]
            elif op == "flip":
                i = rng.randrange(len(b))
                b[i] ^= 0x20
            else:
                (c / "hf" / "tokenizer.json").write_text("{}")
                return
            p.write_bytes(bytes(b))
        return f

    def edit(fn, seal):
        def f(c):
            m = _raw(c)
            fn(m)
            _write(c, m, seal)
        return f

    pool = [(f"shard_{op}", shard_op(op)) for op in ("flip", "flip", "flip", "truncate", "overwrite", "extend", "delete")]
    pool += [("manifest_flip", manifest_flip)] * 4 + [("manifest_truncate", manifest_truncate), ("duplicate_key", duplicate_key)]
    pool += [(f"hf_{op}", hf_op(op)) for op in ("truncate", "flip", "extra")]
    edits = field_edits(man)
    pool += [(f"edit:{k}", edit(fn, False)) for k, fn in edits.items()]
    pool += [(f"resealed:{k}", edit(fn, True)) for k, fn in edits.items()]
    pool += [(f"path:{k}", fn) for k, fn in path_tricks(outside).items()]
    rng.shuffle(pool)
    # every kind once before any repeats, then random repeats of the damage kinds
    return pool[:n] if n <= len(pool) else pool + [rng.choice(pool[:12]) for _ in range(n - len(pool))]


# ---- checks ----------------------------------------------------------------------------------------------------------------
class Audit:
    """Files opened under `outside` (after resolving symlinks), recorded by a process audit hook."""

    def __init__(self, outside: Path):
        self.outside = str(outside.resolve())
        self.hits: list[str] = []
        self.on = False
        sys.addaudithook(self)

    def __call__(self, event, args):
        if not self.on or event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        try:
            p = os.path.realpath(os.fsdecode(args[0]))
        except (TypeError, ValueError):
            return
        if p.startswith(self.outside):
            self.hits.append(p)


def tree(root: Path, skip: set[Path]) -> dict[str, tuple[int, float]]:
    out = {}
    for dp, dns, fns in os.walk(root):
        dns[:] = [x for x in dns if Path(dp, x) not in skip]
        for f in fns:
            p = Path(dp, f)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            out[str(p)] = (st.st_size, st.st_mtime)
    return out


def merged_digest(out: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(out.iterdir()):
        if f.suffix in (".safetensors", ".json"):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def run_step(fn) -> tuple[str, object]:
    """("ok", value) | ("refused", message) | ("crash", traceback)."""
    try:
        return "ok", fn()
    except DeltapackError as e:
        return "refused", str(e)
    except Exception:  # what the CLI would print as a traceback
        return "crash", traceback.format_exc(limit=6)


def complete(c: httpx.Client, model: str) -> tuple[int, object]:
    r = c.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    return r.status_code, (r.json()["choices"][0]["text"] if r.status_code == 200 else r.text[:300])


# ---- main ------------------------------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["smollm", "pico"], default="smollm")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers the synthetic fine-tune changes")
    ap.add_argument("--per-delta", type=int, default=30, help="mutations per delta (9 deltas)")
    ap.add_argument("--tier-reloads", type=int, default=8, help="served deltas rewritten on disk while in the disk tier")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="pico model, 6 mutations per delta, a temp file")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.smoke:
        args.model, args.per_delta, args.tier_reloads = "pico", 6, 2
    out_json = args.out or (Path(tempfile.gettempdir()) / "robustness_files_smoke.json" if args.smoke
                            else ROOT / "bench" / "results" / "robustness.json")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="dp_files_"))
    try:
        return _run(args, work, out_json, t_start)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args, work: Path, out_json: Path, t_start: float) -> int:
    from deltapack.serve.guard import HTTPOptions
    from deltapack.serve.testing import running_server

    rng = random.Random(args.seed)
    base, ft = build_models(work, args.model, args.layers)
    root = work / "root"  # the server's --delta-root: intact deltas and the mutated copies
    root.mkdir()
    outside = work / "outside"  # what path tricks point at; nothing may be opened there
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0\n")
    deltas, build_s = {}, {}
    for k, (m, r, p) in CODECS.items():
        r = r if r is None or args.model == "smollm" else 1.4  # a pico model cannot reach 8x (metadata)
        t0 = time.perf_counter()
        deltas[k] = api.compress(base, ft, root / k, method=m, ratio=r, params=p, progress=False)
        build_s[k] = round(time.perf_counter() - t0, 1)
        log(f"built {k}: {build_s[k]} s")
    codecs = {k: sorted({t["codec"] for t in api.inspect(d)["tensors"]}) for k, d in deltas.items()}
    ref_merge = {}
    for k, d in deltas.items():
        assert api.verify(base, d)["ok"], k
        api.merge(base, d, work / "ref", overwrite=True, progress=False)
        ref_merge[k] = merged_digest(work / "ref")
    shutil.rmtree(work / "ref")
    audit = Audit(outside)
    counts = dict(trials=0, refused=0, harmless=0, crashes=0, silent_wrong=0, five_xx=0)
    by_kind: dict[str, dict[str, int]] = {}
    samples: dict[str, list] = {"crashes": [], "silent_wrong": [], "five_xx": [], "outside": []}
    resealed_accepted: list[str] = []
    outside_reads = outside_writes = 0
    http = HTTPOptions(api_key="k", max_body_bytes=1 << 20)
    with running_server(base, [], delta_root=root, max_batch=4, http=http) as (state, url), \
            httpx.Client(base_url=url, timeout=300, headers={"authorization": "Bearer k"}) as c:
        ref_text = {}
        unserved = {}
        for k in deltas:
            r = c.post("/v1/deltas", json={"name": f"ref-{k}", "path": k})
            if r.status_code != 200:  # a codec the server does not serve yet (lossless): its trials skip the server
                assert r.status_code < 500, r.text
                ref_text[k] = None
                unserved[k] = r.json()["error"]["message"][:200]
                continue
            ref_text[k] = complete(c, f"ref-{k}")[1]
            c.delete(f"/v1/deltas/ref-{k}")
        trial = 0
        for k, d in deltas.items():
            for kind, fn in mutations(d, rng, args.per_delta, outside):
                trial += 1
                name = f"m{trial}"
                cp = root / name
                shutil.copytree(d, cp, symlinks=True)
                fn(cp)
                out = work / "merged" / name
                before = tree(work, {work / "merged", cp})
                outside_before = tree(outside, set())
                audit.hits.clear()
                audit.on = True
                v = run_step(lambda: api.verify(base, cp)["ok"])
                mg = run_step(lambda: api.merge(base, cp, out, progress=False))
                r = c.post("/v1/deltas", json={"name": name, "path": name}) if ref_text[k] is not None else None
                served = None
                if r is not None and r.status_code == 200:
                    served = complete(c, name)
                    c.delete(f"/v1/deltas/{name}")
                audit.on = False
                wrong = []
                if mg[0] == "ok" and merged_digest(out) != ref_merge[k]:
                    wrong.append("merge")
                if served is not None and served[0] == 200 and served[1] != ref_text[k]:
                    wrong.append("serve")
                crash = [s for s, res in (("verify", v), ("merge", mg)) if res[0] == "crash"]
                statuses = ([r.status_code] if r is not None else []) + ([served[0]] if served else [])
                five = [s for s in statuses if s >= 500]
                counts["trials"] += 1
                accepted = v == ("ok", True) or mg[0] == "ok" or (r is not None and r.status_code == 200)
                label = "crash" if crash else "five_xx" if five else "accepted" if accepted and not wrong else \
                    "silent_wrong" if wrong else "refused"
                if wrong and kind.startswith("resealed:"):
                    resealed_accepted.append(f"{k}/{kind}: {'+'.join(wrong)} differs")
                    label = "resealed_accepted"
                elif wrong:
                    counts["silent_wrong"] += 1
                    samples["silent_wrong"].append(f"{k}/{kind}: {wrong}")
                if crash:
                    counts["crashes"] += 1
                    samples["crashes"].append(f"{k}/{kind}: {(v if v[0] == 'crash' else mg)[1][-600:]}")
                if five:
                    counts["five_xx"] += 1
                    samples["five_xx"].append(f"{k}/{kind}: {statuses} {r.text[:200] if r is not None else ''}")
                if label == "refused":
                    counts["refused"] += 1
                elif label == "accepted":
                    counts["harmless"] += 1  # accepted, with exactly the intact delta's merge and completion
                after = tree(work, {work / "merged", cp})
                new_files = [p for p in after if p not in before]
                changed_outside = tree(outside, set()) != outside_before
                if audit.hits:
                    outside_reads += 1
                    samples["outside"].append(f"{k}/{kind}: read {sorted(set(audit.hits))[:3]}")
                if new_files or changed_outside:
                    outside_writes += 1
                    samples["outside"].append(f"{k}/{kind}: wrote {new_files[:3]} outside changed={changed_outside}")
                bk = by_kind.setdefault(kind.split(":")[0] + (":" + kind.split(":")[1] if ":" in kind else ""), {})
                bk[label] = bk.get(label, 0) + 1
                shutil.rmtree(cp, ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
                if trial % 25 == 0:
                    log(f"{trial} trials: {counts}")
        # a served delta rewritten on disk while it sits in the disk tier: the next promotion must refuse it
        tier = dict(trials=0, refused=0, silent_wrong=0, statuses={})
        served_keys = [k for k in deltas if ref_text[k] is not None]
        for i in range(args.tier_reloads):
            k = served_keys[i % len(served_keys)]
            name = f"tier{i}"
            cp = root / name
            shutil.copytree(deltas[k], cp)
            assert c.post("/v1/deltas", json={"name": name, "path": name}).status_code == 200
            state.tiers.set_budget("device", 0)
            state.tiers.set_budget("host", 0)  # everything to the disk tier
            f = cp / rng.choice(list(_raw(cp)["files"]))
            b = bytearray(f.read_bytes())
            j = rng.randrange(len(b) - 8)
            b[j : j + 8] = bytes(x ^ 0xFF for x in b[j : j + 8])  # same size, other bytes
            f.write_bytes(bytes(b))
            state.tiers.set_budget("device", 2 << 30)
            state.tiers.set_budget("host", 8 << 30)
            status, text = complete(c, name)
            tier["trials"] += 1
            tier["statuses"][str(status)] = tier["statuses"].get(str(status), 0) + 1
            if status == 200:
                tier["silent_wrong"] += int(text != ref_text[k])
            else:
                tier["refused"] += 1
            c.delete(f"/v1/deltas/{name}")
            shutil.rmtree(cp)
        pins = {n: t.pins for n, t in state.tiers.tenants.items()}
    result = {
        "command": "python bench/robustness/files.py" + (" --smoke" if args.smoke else ""),
        "device": f"cpu ({_cpu_name()}), torch threads {torch.get_num_threads()}",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "model": "SmolLM2-135M-Instruct (embedded)" if args.model == "smollm" else "pico Llama (hidden 64, 2 layers)",
        "finetune": f"synthetic: base + 0.02*std*(rank-8 + 0.1*dense noise) on matrices, noise on norms, layers 0..{args.layers - 1}",
        "deltas": {k: {"method": CODECS[k][0], "ratio": CODECS[k][1], "params": CODECS[k][2], "codecs": codecs[k],
                       "build_s": build_s[k], "served": ref_text[k] is not None} for k in deltas},
        "not_served": unserved,
        **counts,
        "outside_reads": outside_reads,
        "outside_writes": outside_writes,
        "by_kind": dict(sorted(by_kind.items())),
        "resealed_accepted": resealed_accepted,
        "tier_reload": tier,
        "pins_after": pins,
        "samples": samples,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "notes": "refused: verify, merge and the server load all refused it; harmless: accepted with exactly the intact "
                 "delta's merged files and completion (e.g. aux config taken from an identical base copy); "
                 "resealed_accepted: digest recomputed by the attacker and the edit is self-consistent (another mask "
                 "seed, ...): a reader cannot tell it from a delta made that way; tier_reload statuses are the "
                 "answers to the completion that needed the rewritten delta.",
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    full = json.loads(out_json.read_text()) if out_json.exists() else {}
    full["files"] = result
    out_json.write_text(json.dumps(full, indent=1) + "\n")
    log(f"wrote {out_json} key 'files': {counts} outside reads {outside_reads} writes {outside_writes} tier {tier}")
    bad = counts["crashes"] or counts["silent_wrong"] or counts["five_xx"] or outside_reads or outside_writes or tier["silent_wrong"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
