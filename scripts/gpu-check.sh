#!/usr/bin/env bash
# The GPU check (docs/benchmarks.md): a few compiled, checkpointed bf16 training steps of AU-Net 2 and
# 3 at full width and reduced depth, FlexAttention == SDPA on CUDA, the Mamba mixer against mamba_ssm
# (when installed), MFU and the planner's memory against torch.cuda.max_memory_allocated.
# Usage: scripts/gpu-check.sh [OUT.json] [--dry-run] [--steps N] [--peak-tflops T]  (OUT relative to the repository root)
# Budget: under 10 minutes on one H100/H200, installs included. Without CUDA it runs the dry mode.
set -euo pipefail
cd "$(dirname "$0")/.."
out="gpu-check.json"
if [[ $# -gt 0 && "$1" != --* ]]; then out="$1"; shift; fi
start=$(date +%s)
if ! python -c "import unetlm" 2>/dev/null; then
    python -m pip install --quiet -e . || { echo "unetlm: error: could not install the project" >&2; exit 1; }
fi
# mamba_ssm builds CUDA kernels from source when no wheel matches: allowed 3 minutes, skipped if it fails.
if [[ "${GPU_CHECK_MAMBA:-0}" == "1" ]] && ! python -c "import mamba_ssm" 2>/dev/null; then
    timeout 180 python -m pip install --quiet causal-conv1d mamba-ssm --no-build-isolation \
        || echo "mamba_ssm not installed: its check will be skipped"
fi
left=$((570 - ($(date +%s) - start)))
timeout "$left" python -m unetlm.bench.gpu_check --json "$out" "$@"
echo "gpu check finished in $(( $(date +%s) - start )) s"
