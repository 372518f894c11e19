#!/usr/bin/env bash
# TensorRT-LLM end to end, for a machine with an NVIDIA GPU and tensorrt-llm==1.2.1 installed (not this
# project's machines: the wheel is gigabytes and the GPU machine here cannot receive it).
#   bash bench/trtllm_stage.sh [ARTIFACT] [WORK]     (default: artifacts/reference, /tmp/trtllm)
# 1. export the unified checkpoint (fp16), 2. build the engine with the artifact's own build.sh,
# 3. greedy tokens of the engine against our static decoder and decode tok/s at batch 1 and 32
#    (bench/trtllm.py, JSON to $OUT or artifacts/bench/trtllm.json).
set -euo pipefail
ARTIFACT="${1:-artifacts/reference}"
WORK="${2:-/tmp/trtllm}"
python3 -c 'import tensorrt_llm; print("tensorrt_llm", tensorrt_llm.__version__)'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
rm -rf "$WORK" && mkdir -p "$WORK"
python3 -m export.tensorrt_llm --artifact "$ARTIFACT" --out "$WORK/checkpoint" --dtype float16 \
    --max-batch-size 32 --max-input-len 1024 --max-seq-len 2048
time bash "$WORK/checkpoint/build.sh" "$WORK/engine"
python3 bench/trtllm.py --artifact "$ARTIFACT" --engine "$WORK/engine" --prompts 8 --new-tokens 128
