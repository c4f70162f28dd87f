#!/usr/bin/env bash
# The GPU measurements of docs/performance.md ("Step-time benchmark"), in one script.
# Usage: bash benchmarks/gpu_step_time.sh [OUTPUT_DIR] [MODEL_CONFIGS]
# Runs on one GPU with ~80 GB (H100): SD 1.5 at 512 px (LoRA and full) and SDXL at 1024 px (LoRA), bf16, random
# weights from the real architectures. The SD 1.5 LoRA part took 2.5 minutes on an H100 (2026-11-27).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-step-time}"
configs="${2:-../shared/model-configs}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
run() {  # name, then step_time.py arguments
    local name="$1"; shift
    python benchmarks/step_time.py "$@" --json "$out/$name.json" 2>&1 | grep -v -i warn | tee "$out/$name.txt"
}
run sd15-lora --arch-dir "$configs/sd15" --lora --batch 8 --dtype bf16 --steps 16 --warmup 3 --interval 16
run sd15-full --arch-dir "$configs/sd15" --full --batch 4 --dtype bf16 --steps 16 --warmup 3 --interval 16
# SDXL needs the SDXL family (trl_adaptive/families/sdxl.py); batch 2 pairs at 1024 px with gradient checkpointing.
if python -c "import trl_adaptive.families as f, sys; sys.exit(not any(c.__name__.startswith('StableDiffusionXL') for c in f.FAMILIES))"; then
    run sdxl-lora --arch-dir "$configs/sdxl" --lora --batch 2 --dtype bf16 --steps 16 --warmup 3 --interval 16 --gradient-checkpointing
else
    echo "SDXL family not available in this checkout: SDXL case skipped" | tee "$out/sdxl-lora.txt"
fi
