#!/usr/bin/env bash
# Structured-output cost on the GPU machine in one short device call (issue 27): the engine with the current mask path
# (GrammarMasks: persistent pinned bitmasks, fill overlapped with the decode forward) and the same engine at the commit
# before it, on one random-weight model of SmolLM2-135M's shape with its real tokenizer (the cost depends on shapes,
# the vocabulary and the grammar, not on weight values; the GGUF needs two calls to carry, this needs none), then the
# mask step alone, old path against new, on GPU logits (also checks both give the same masked logits there).
#
# Here, once:
#     d=<the cached GGUF conversion dir, e.g. ~/.cache/deltapack/gguf/SmolLM2-135M-Instruct.Q4_1-*>
#     mkdir -p .gpu/smoltok && cp $d/{tokenizer.json,tokenizer_config.json,chat_template.jinja,config.json,generation_config.json} .gpu/smoltok/
#     mkdir -p .gpu/old && git archive <commit before the new mask path> src bench/serving/constrained.py bench/serve_load.py | tar -x -C .gpu/old
# Device call: carry [".gpu/whl", ".gpu/whl3", ".gpu/smoltok", ".gpu/old"]   bash bench/serving/run_gpu_grammar.sh
# Each result lands in $OUT as soon as it is measured (a killed call still returns the earlier ones).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/grammar-gpu}"
mkdir -p "$OUT" /root/site
python3 -m pip install -q --no-index --no-deps --target /root/site .gpu/whl/*.whl .gpu/whl3/*.whl 2>/dev/null || true
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MODEL=/root/randsmol
if [[ ! -f $MODEL/model.safetensors ]]; then
    PYTHONPATH=/root/site python3 - "$MODEL" <<'EOF'
import shutil, sys
from pathlib import Path

import torch
from transformers import AutoConfig, LlamaForCausalLM

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
cfg = AutoConfig.from_pretrained(".gpu/smoltok")
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(out)
for f in Path(".gpu/smoltok").iterdir():
    if f.name != "config.json":
        shutil.copy(f, out / f.name)
print("random-weight model ready", out)
EOF
fi
PYTHONPATH=/root/site:src python3 bench/serving/constrained.py --base "$MODEL" --device cuda \
    --out "$OUT/serving_constrained.json" > "$OUT/new.log" 2>&1 || echo "new path: exit $?" >> "$OUT/new.log"
tail -4 "$OUT/new.log"
PYTHONPATH=/root/site:.gpu/old/src python3 .gpu/old/bench/serving/constrained.py --base "$MODEL" --device cuda \
    --out "$OUT/serving_constrained_before.json" > "$OUT/old.log" 2>&1 || echo "old path: exit $?" >> "$OUT/old.log"
tail -4 "$OUT/old.log"
PYTHONPATH=/root/site:src python3 bench/serving/constrained.py --micro --device cuda --base .gpu/smoltok \
    --out "$OUT/serving_constrained_gpu_micro.json" > "$OUT/micro.log" 2>&1 || echo "micro: exit $?" >> "$OUT/micro.log"
tail -3 "$OUT/micro.log"
