#!/usr/bin/env bash
# The quality benchmark on the GPU machine: one step per `device` call, chained back to back (the machine keeps
# /root only while warm). Every step writes its JSON part under $OUT (bench/results/parts when $OUT is unset); copy
# the parts into bench/results/parts/ here, then run (here, on CPU):
#     python bench/quality/report.py bench/results/parts/*.json --out bench/results/quality.json
#
# One-time preparation on this machine (from ../shared/GPU.md): .gpu/smol.part.aa, .gpu/smol.part.ab (the split GGUF)
# and .gpu/whl/gguf-*.whl.
#
# Steps (device calls), in order; each fits the 10-minute limit (--time-budget 540 leaves a minute of margin):
#   1. carry [".gpu/smol.part.aa", ".gpu/whl"]   bash bench/quality/run_gpu.sh setup
#   2. carry [".gpu/smol.part.ab"]                bash bench/quality/run_gpu.sh quality arithmetic
#   3.                                            bash bench/quality/run_gpu.sh quality python
#   4.                                            bash bench/quality/run_gpu.sh quality json
#   5.                                            bash bench/quality/run_gpu.sh timing lowrank,bitdelta,dare
#   6.                                            bash bench/quality/run_gpu.sh timing delta-come-paper,deltadq
#   7.                                            bash bench/quality/run_gpu.sh timing delta-come-optimal,bitdelta-distill
# Steps 3-7 need no carry when the machine is still warm (the GGUF, its dequantized copy and the 7B pair persist
# under /root); if a step finds /root/m empty it says so: redo steps 1-2 (step 2 with the task you need).
# Timing steps reuse the 27 GB synthetic pair written by the first one (~1 min to write).
set -euo pipefail
cd "$(dirname "$0")/../.."

GGUF=/root/m/SmolLM2-135M-Instruct.Q4_1.gguf
OUTDIR="${OUT:-bench/results/parts}"
mkdir -p "$OUTDIR"
export PYTHONPATH="/root/site:src${PYTHONPATH:+:$PYTHONPATH}"
export DELTAPACK_SMOLLM2_GGUF="$GGUF"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

need_gguf() {
    if [[ ! -f "$GGUF" ]]; then
        if [[ -f /root/m/smol.part.aa && -f .gpu/smol.part.ab ]]; then
            cat /root/m/smol.part.aa .gpu/smol.part.ab > "$GGUF.part" && mv "$GGUF.part" "$GGUF"
        else
            echo "no $GGUF and no parts to build it: the machine was given back; redo steps 1-2" >&2
            exit 3
        fi
    fi
}

step="${1:-}"
case "$step" in
setup)
    mkdir -p /root/m && cp .gpu/smol.part.aa /root/m/
    python3 -m pip install -q --no-index --no-deps --target /root/site .gpu/whl/*.whl
    nvidia-smi --query-gpu=name,memory.total --format=csv
    ;;
quality)
    task="${2:?usage: run_gpu.sh quality TASK [extra run.py args]}"
    shift 2
    need_gguf
    python3 bench/quality/run.py --tasks "$task" --out "$OUTDIR/quality-$task.json" --workdir /root/dpq \
        --time-budget 540 "$@"
    ;;
timing)
    methods="${2:?usage: run_gpu.sh timing METHODS [extra timing_7b.py args]}"
    shift 2
    python3 bench/quality/timing_7b.py --methods "$methods" --out "$OUTDIR/timing-7b-${methods//,/_}.json" \
        --workdir /root/dp7b --time-budget 540 "$@"
    ;;
*)
    echo "usage: run_gpu.sh setup | quality TASK | timing METHODS" >&2
    exit 2
    ;;
esac
