#!/usr/bin/env bash
# The quality benchmark (issue 24) on the GPU machine: one step per `device` call, chained back to back (the machine
# keeps /root only while warm, ~30 s after a call). Each step writes under $OUT (bench/results/quality_parts when
# $OUT is unset; at most 8 files per call come back). Here, afterwards:
#     mkdir -p bench/results/quality_parts && cp <files_at>/quality-*.json <files_at>/finetune.json bench/results/quality_parts/
#     python bench/quality/report.py --merge bench/results/quality_parts/quality-*.json
#
# One-time preparation on this machine, in every fresh checkout: `bash scripts/gpu_carry.sh` makes
# .gpu/smol.part.aa (the first 42 MiB of the GGUF of SmolLM2-135M-Instruct), .gpu/smol.part.ab (the rest; `cat aa ab` has sha256 b179c9523d0e6a0f...), .gpu/whl/ (gguf,
# pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions>=4.16), .gpu/whl2/ (zstandard: every
# compression needs it) and .gpu/whl4/ (fastapi, uvicorn, click...: the serving benchmarks). A call carries at most
# 64 MiB with the tree (~8.5 MiB): part aa + all wheels ~60 MiB, part ab ~61 MiB. The split is chosen so that the
# setup call carries every wheel and can do a full call's worth of GPU work that needs no model after its ~15 s
# (the 7B timing, the serving benchmarks): a machine start is the scarce thing, not the carry.
#
# Calls, in order (expected seconds of the command itself; a fresh machine adds 1-2 min of start, and each call
# ~1 min of transfer: the 2026-12-07 session held the machine 1676 s for 1303 s of commands):
#   1. carry [".gpu/smol.part.aa", ".gpu/whl", ".gpu/whl2", ".gpu/whl4"]
#        bash bench/quality/run_gpu.sh setup && <up to ~560 s of model-free work, results under $OUT>; next session:
#        export PYTHONPATH=/root/site:src PYTHONUNBUFFERED=1; timeout 250 python3 bench/serving/coldstart.py \
#            --shape smollm --runs cold,warm --max-batch 64 --timeout 100 --out $OUT/coldstart.json; \
#        timeout 60 python3 bench/serving/coldstart.py --shape smollm --runs warm --max-batch 64 --timeout 50 \
#            --serve-arg=--pack-device --serve-arg=auto --out $OUT/coldstart_pack_gpu.json; \
#        timeout 270 python3 bench/serving/live.py --modes graph --requests 300 --timeout-s 140 \
#            --out $OUT/serving_live.json                                                                ~15 s + work
#        (coldstart on 2026-12-08: building the models 55 s, the cold start with its background warm-up ~115 s, so
#        the warm start did not fit the 170 s given; it now writes each start's record as it ends. Since then the
#        deltas pack faster on the host (masks hashed in cache-sized blocks): startup_phases.notes.deltas.pack_s
#        compares with the 26.9 s of the earlier cold start's printed phases; the second coldstart.py packs on the GPU
#        (serve --pack-device auto, whose default may become auto once measured). The live trace's engine splits each
#        decode step into launch, wait for the device and accept: its 2026-12-08 run took 71 ms a step where the
#        measured step costs predict ~50.)
#      With a call to spare (model-free, after call 3), packing one 7B-wide layer on the GPU host's CPU and on its GPU
#      (x32 is a 7B delta at a server's start; this 2-core machine: 2-4 s a layer for dare and deltadq,
#      bench/results/serving_pack_cpu_7b_layer.json):
#        python3 bench/serving/pack_speed.py --shape 7b-layer --threads 16 --compress-device cuda --work /root/p7b \
#            --out $OUT/serving_pack_h100host_7b_layer.json; python3 bench/serving/pack_speed.py --shape 7b-layer \
#            --work-device cuda --compress-device cuda --work /root/p7b --out $OUT/serving_pack_h100_7b_layer.json
#   2. carry [".gpu/smol.part.ab"]               bash bench/quality/run_gpu.sh finetune --plan PLAN        <= 555 s
#        six full fine-tunes side by side (saved by 360 s), each task evaluated from the moment its fine-tune is
#        saved until 540 s (parts tagged "ft"); `finetune --no-eval` for the fine-tunes alone (<= 360 s)
#   3.                                           bash bench/quality/run_gpu.sh extras --plan PLAN            <= 545 s
#        the rest of PLAN (parts tagged "e1") and auto+heal on the held-out tasks beside it (tagged "heal")
#   4. (if device time is left)                  bash bench/quality/run_gpu.sh eval e2 --plan PLAN          <= 555 s
# Every call continues where the previous one stopped (a ledger per task in /root/dpq). PLAN = LABEL@RATIO[:CALIB],...
# in run order (the cells that matter most first). The plan for the next device session (2026-12-08: the fourth
# fine-tune set got dare, deltadq, delta-come at 16-64x and auto at 16x on all six tasks, auto-flips on chat only; the
# fine-tunes' step counts changed after it, so only chat, whose count did not, can pair with it; auto-flips goes
# right after auto; the task-calibrated column, never reached in four sets, right after 32x; auto+heal last, since
# its held-out rows exist from earlier sets):
#     dare@16,deltadq@16,delta-come@16,auto@16,auto-flips@16,dare@32,deltadq@32,delta-come@32,auto@32,
#     delta-come@16:task,auto@16:task,dare@64,deltadq@64,delta-come@64,auto@64,dare@128,deltadq@128,
#     delta-come@128,auto@128,auto+heal@16
# (auto-flips: auto choosing by changed top tokens instead of KL; it may become the default only on the tuning
# families' results, bench/quality/common.py)
# (with auto+heal in the plan, run `extras` with HEAL_PLAN unset only if the held-out tasks did not get it)
# Without --plan: default calibration first at 16, 32, 64, 128x for every method, then the task-calibrated runs.
# If a step says the machine was given back (no /root/m or no /root/dpq/ft-*), start again at step 1.
#
#   5. 7B-shaped timing (no model needed):      bash bench/quality/run_gpu.sh timing auto,auto+heal        <= 555 s
#        (encode.coded_fit.<method> now says which candidate's coded-size fit takes auto's time; teacher.load_finetune
#        and teacher.load_base time the two model loads that seemed to be most of refine.auto.teacher's 35-40 s,
#        which now read ahead while copying)
#   6. merged weights in a live trace (the 64-tenant one made no merge on 2026-12-08: no tenant ever owned a
#      forward; hotness now also counts a tenant's share of mixed prefill chunks, whose rows prefill_split can run on
#      its copy), before `--merged-bytes` may default to auto:
#        timeout 290 python3 bench/serving/live.py --modes graph+merged --requests 300 --timeout-s 150 \
#            --out $OUT/serving_live_merged.json   (compare with call 1's graph row: same trace, same warm pass)
#        timeout 290 python3 bench/serving/live.py --tenants 1 --modes graph,graph+merged --requests 200 \
#            --timeout-s 120 --out $OUT/serving_live_1tenant.json
set -euo pipefail
cd "$(dirname "$0")/../.."

GGUF=/root/m/SmolLM2-135M-Instruct.Q4_1.gguf
WORKDIR=/root/dpq
OUTDIR="${OUT:-bench/results/quality_parts}"
mkdir -p "$OUTDIR"
export PYTHONPATH="/root/site:src${PYTHONPATH:+:$PYTHONPATH}"
export DELTAPACK_SMOLLM2_GGUF="$GGUF"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

need_wheels() {
    # zstandard (.gpu/whl2) is needed by every compression; without it every evaluation job fails
    if ! python3 -c "import zstandard" 2>/dev/null; then
        if compgen -G ".gpu/whl2/*.whl" > /dev/null; then
            python3 -m pip install -q --no-index --no-deps --target /root/site .gpu/whl2/*.whl
        else
            echo "zstandard is missing: carry .gpu/whl2 (see the top of this script)" >&2
            exit 3
        fi
    fi
}

need_gguf() {
    if [[ ! -f "$GGUF" ]]; then
        if [[ -f /root/m/smol.part.aa && -f .gpu/smol.part.ab ]]; then
            cat /root/m/smol.part.aa .gpu/smol.part.ab > "$GGUF.part"
            if ! sha256sum "$GGUF.part" | grep -q '^b179c9523d0e6a0f'; then
                echo "the joined GGUF is not SmolLM2-135M-Instruct.Q4_1 (sha256 b179c952...): parts from another split?" >&2
                exit 3
            fi
            mv "$GGUF.part" "$GGUF"
        else
            echo "no $GGUF and no parts to build it: the machine was given back; redo step 1 (setup)" >&2
            exit 3
        fi
    fi
}

step="${1:-}"
[[ "$step" == extras ]] && shift
case "$step" in
setup)
    mkdir -p /root/m && cp .gpu/smol.part.aa /root/m/
    wheels=(.gpu/whl/*.whl)
    for extra in .gpu/whl2 .gpu/whl4; do compgen -G "$extra/*.whl" > /dev/null && wheels+=("$extra"/*.whl); done
    python3 -m pip install -q --no-index --no-deps --target /root/site "${wheels[@]}"
    nvidia-smi --query-gpu=name,memory.total --format=csv
    ;;
finetune)
    shift
    need_gguf
    need_wheels
    eval_flag=(--then-eval)
    args=()
    for a in "$@"; do
        if [[ "$a" == "--no-eval" ]]; then eval_flag=(); else args+=("$a"); fi
    done
    budget=(--train-budget 360 --time-budget 540)
    [[ ${#eval_flag[@]} -eq 0 ]] && budget=(--time-budget 360)
    python3 bench/quality/run.py finetune --workdir "$WORKDIR" --out-dir "$OUTDIR" "${budget[@]}" \
        "${eval_flag[@]}" "${args[@]}"
    ;;
eval)
    tag="${2:?usage: run_gpu.sh eval TAG [extra run.py eval args]}"
    shift 2
    need_gguf
    need_wheels
    python3 bench/quality/run.py eval --workdir "$WORKDIR" --out-dir "$OUTDIR" --tag "$tag" --time-budget 540 "$@"
    ;;
extras)
    # after `finetune`, on the same warm machine: more of the default evaluation (extra arguments, e.g. --plan, go to
    # run.py eval) with auto+heal on the held-out tasks beside it (HEAL_TASKS, HEAL_PLAN, HEAL_S). Everything lands
    # in $OUT/extras.tar (a call returns at most 8 files); budgets keep the whole step under ~540 s.
    need_gguf
    need_wheels
    X=/root/extras; mkdir -p "$X"
    tar_out() { tar -C "$X" -cf "$OUTDIR/extras.tar" . ; }
    trap tar_out EXIT
    python3 bench/quality/run.py eval --workdir "$WORKDIR" --out-dir "$X" --tag heal --tasks "${HEAL_TASKS:-strings,chat}" \
        --plan "${HEAL_PLAN:-auto+heal@16}" --time-budget "${HEAL_S:-420}" > "$X/heal.log" 2>&1 &
    python3 bench/quality/run.py eval --workdir "$WORKDIR" --out-dir "$X" --tag e1 --time-budget "${EXTRA_EVAL_S:-520}" \
        "$@" > "$X/e1.log" 2>&1 || true
    wait
    ;;
timing)
    methods="${2:?usage: run_gpu.sh timing METHODS [extra timing_7b.py args]}"
    shift 2
    python3 bench/quality/timing_7b.py --methods "$methods" --out "$OUTDIR/timing-7b-${methods//[,+]/_}.json" \
        --workdir /root/dp7b --time-budget 540 "$@"
    ;;
*)
    echo "usage: run_gpu.sh setup | finetune [--no-eval] [args] | eval TAG [args] | extras [eval args] | timing METHODS [args]" >&2
    exit 2
    ;;
esac
