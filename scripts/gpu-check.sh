#!/usr/bin/env bash
# The GPU check (docs/benchmarks.md): AU-Net 4 at full width and reduced depth trained by the real trainer
# under a one-rank NCCL process group (FSDP2, compiled checkpointed blocks with FlexAttention, the planned
# micro-batch, evaluation, a background DCP checkpoint), a one-process torchrun job stopped by SIGTERM and
# resumed, FlexAttention == SDPA, the Mamba mixer against mamba_ssm (when installed). Fails when the peak
# memory is more than 15% off the plan or a block fell back to eager; prints measured against planned
# memory, step time and MFU as JSON.
# Usage: scripts/gpu-check.sh [OUT.json] [--dry-run] [--steps N] [--peak-tflops T] [--only CHECK,...]
# (OUT relative to the repository root). Budget: under 10 minutes on one H100/H200, installs included.
# Without CUDA it runs the dry mode.
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
(( left >= 60 )) || left=60  # installs took most of the budget: the checks still get a minute
timeout "$left" python -m unetlm.bench.gpu_check --json "$out" "$@"
echo "gpu check finished in $(( $(date +%s) - start )) s"
