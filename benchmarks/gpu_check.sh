#!/usr/bin/env bash
# Issue 19's GPU measurement in one command (< 9 min on one H100/H200-class GPU):
# the gpu-marked tests, the MAVA step on ViT-B/16 in fp32 and bf16+compile, a 2-trial
# sweep on fractional GPUs; one JSON in OUT/gpu_check.json. See benchmarks/gpu_check.py.
#   benchmarks/gpu_check.sh [--out gpu_check] [--budget-s 540] [--skip STEP] [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_check.py "$@"
