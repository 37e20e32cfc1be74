#!/usr/bin/env bash
# GPU benchmarks and the CUDA-path tests, on a machine with a CUDA device:  bash bench/gpu.sh
# 1. tests/test_gpu.py (bf16 autocast, fused AdamW, compile, pinned batches, flash SDPA, cached generation);
# 2. bench/train_speed.py on cuda: recipes (a) and (b), nanoGPT-style baseline vs flopgpt, sdpa/manual,
#    eager/compile, with MFU against the GPU's dense bf16 peak from model/flops/peaks.py;
# 3. a short train.py run of configs/shakespeare_char.toml (bf16, fused AdamW, compile) for its MFU line.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no CUDA device')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -m pytest tests/test_gpu.py -q
if [ ! -f data/shakespeare_char/meta.json ]; then
  if [ -f ../shared/data/tinyshakespeare.txt ]; then
    python data/prepare.py --source shakespeare --input ../shared/data/tinyshakespeare.txt --tokenizer char
  fi
fi
python bench/train_speed.py --device=cuda --repeats=5 --steps=20 --warmup=10 "$@"
if [ -f data/shakespeare_char/meta.json ]; then
  python train.py configs/shakespeare_char.toml --max_iters=300 --eval_interval=300 --eval_iters=20 \
    --out_dir=out/gpu_bench --overwrite --progress=false
fi
