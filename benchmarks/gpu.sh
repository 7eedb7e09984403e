#!/usr/bin/env bash
# The GPU checks of the performance issue in one short run, on a CUDA machine with python3, torch and transformers:
# the CUDA tests, then `python -m vptune.perf` on ViT-B/16 and on DINOv2 ViT-S/14 at 224x224, bf16, batch 128,
# eager rows first, then the tests, compiled rows and a profile of a VPT-Deep step (most wanted first), then the
# timm adapter's tests (tests/test_timm.py; timm is pip-installed if missing).
# The backbones are random weights of the real architectures (ViTConfig() is ViT-B/16; the DINOv2 config is
# dinov2-small's): a step's time, memory and FLOPs do not depend on the weights' values, and nothing is downloaded.
#
#   benchmarks/gpu.sh OUT_DIR                       # from the repository root
#   PERF_ARGS="--device cpu --image-size 112 --batch-size 2" benchmarks/gpu.sh runs/dry  # a dry run on a CPU (patches 14 and 16)
set -uo pipefail
out=${1:?usage: benchmarks/gpu.sh OUT_DIR}
mkdir -p "$out"
models=${MODELS:-/tmp/vptune-gpu}
extra=(${PERF_ARGS:-})
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  python3 -c "import sys, torch, transformers; print(sys.version.split()[0], 'torch', torch.__version__,
    'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
  python3 - "$models" <<'EOF'
import sys

import torch
from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

torch.manual_seed(0)
ViTModel(ViTConfig(), add_pooling_layer=False).save_pretrained(f"{sys.argv[1]}/vit-b16")
small = dict(hidden_size=384, num_attention_heads=6, num_hidden_layers=12, patch_size=14, layer_norm_eps=1e-6)
Dinov2Model(Dinov2Config(**small)).save_pretrained(f"{sys.argv[1]}/dinov2-s14")
print("random ViT-B/16 and DINOv2 ViT-S/14 saved under", sys.argv[1])
EOF
} 2>&1 | tee "$out/env.txt"

stamp() { echo "== $(date +%T) $*" | tee -a "$out/env.txt"; }
perf() {  # perf NAME TIMEOUT ARGS...: the table to NAME.md, the figures to NAME.json
  local name=$1 limit=$2
  shift 2
  stamp "perf $name"
  timeout "$limit" python3 -m vptune.perf --image-size 224 --batch-size 128 --precision bf16 --repeats 10 --warmup 5 \
    --gemm-size 8192 "$@" "${extra[@]}" --json "$out/$name.json" 2>&1 | tail -30 | tee "$out/$name.md"
}
# rows in the order wanted (a row takes ~12 s on an H200, in its own process): the pair the targets compare first
eager=vpt-deep,full,vpt-deep-whole,vpt-deep-ckpt3,lora,adapter,bias,vpt-shallow,linear,linear-cached
perf vitb16 150 --backbone "hf:$models/vit-b16" --methods "$eager"
perf dinov2s14 60 --backbone "hf:$models/dinov2-s14" --methods vpt-deep,full,vpt-deep-whole
stamp tests
timeout "${TEST_TIMEOUT:-50}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_backbones.py \
  tests/test_prompts.py 2>&1 | tail -25 | tee -a "$out/env.txt"
perf vitb16-compiled 100 --backbone "hf:$models/vit-b16" --methods vpt-deep-compiled,full
stamp profile
timeout 25 python3 -m vptune.perf --backbone "hf:$models/vit-b16" --image-size 224 --batch-size 128 --precision bf16 \
  --repeats 3 --warmup 3 --methods vpt-deep --profile "${extra[@]}" 2>&1 | tee "$out/profile.txt" >/dev/null
# timm (optional in vptune, needs torchvision): installed here if missing (TIMM_WHEELS: a folder of wheels, offline)
stamp "timm tests"
python3 -c "import timm" 2>/dev/null || timeout 180 python3 -m pip install -q ${TIMM_WHEELS:+--no-index --find-links "$TIMM_WHEELS"} \
  timm 2>&1 | tail -3 | tee -a "$out/env.txt"
timeout "${TIMM_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_timm.py 2>&1 | tail -25 | tee "$out/timm.txt"
stamp "done: $(ls "$out" | tr '\n' ' ')"
