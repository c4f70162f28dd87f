#!/usr/bin/env bash
# The GPU speed table of docs/performance.md (issue 21) in one command that fits one 10-minute GPU run:
#
#   bash benchmarks/gpu_step_time.sh [OUTPUT_DIR] [MODEL_CONFIGS]      # one ~80 GB GPU (H100), ~9 minutes
#   bash benchmarks/gpu_step_time.sh --tiny [OUTPUT_DIR]                # CPU smoke test on tiny models (~3 minutes)
#
# Parts (each one process of benchmarks/step_time.py; random weights from the real SD 1.5 / SDXL configs, bf16):
#   sd15-lora   SD 1.5 512 px, LoRA r=8, 8 pairs: (a) bare loop, (b) ours uncached, (b+cache) ours cached
#   sd15-full   SD 1.5 512 px, full UNet, 4 pairs: a, b, b+cache
#   sdxl-lora   SDXL 1024 px, LoRA r=8, 2 pairs, gradient checkpointing: a, b, b+cache
#   sdxl-full   SDXL 1024 px, full UNet (fused AdamW, fp32 master weights), 1 pair, gradient checkpointing: a, b
#   levers      SD 1.5 LoRA, ours uncached (b) with each speed option switched from its default: torch.compile on,
#               channels_last off, unfused AdamW, TF32 off, blocking transfers, the NaN/Inf loss filter on
#   sweep       pairs per step that maximise pairs/s within memory: SD 1.5 LoRA b+cache at 8, 16, 32, 64 and
#               SD 1.5 full b+cache at 4, 8, 16, 32 (stops at the first size that runs out of memory)
# Steps were cut to fit the budget (STEPS timed after WARMUP, one round); a part that would start after BUDGET_S
# seconds is skipped and says so. At the end benchmarks/gpu_summary.py prints one table with the commit, the card
# and the versions. Environment: PARTS (default all of the above), STEPS (8), WARMUP (2), BUDGET_S (540),
# COMMIT (default: git rev-parse HEAD, for a copy of the tree without .git), DRY_RUN=1 prints the commands only.
# Where diffusers/peft are missing (the lent GPU machines), carry them as wheels in .whl/ (see
# /work/.library/device/README.md); this script installs them into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
tiny=0
if [ "${1:-}" = "--tiny" ]; then tiny=1; shift; fi
out="${1:-gpu-step-time}"
configs="${2:-../shared/model-configs}"
parts="${PARTS:-sd15-lora sd15-full sdxl-lora sdxl-full levers sweep}"
steps="${STEPS:-8}"
warmup="${WARMUP:-2}"
budget="${BUDGET_S:-540}"
commit="${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
mkdir -p "$out"
if [ -d .whl ] && ! python3 -c "import diffusers, peft" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
start=$(date +%s)
{ echo "commit $commit, $(date -u '+%Y-%m-%d %H:%M UTC')"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU (nvidia-smi absent)"; } | tee "$out/machine.txt"

if [ $tiny = 1 ]; then  # the same parts on the built-in tiny architectures, on whatever device there is
    sd15=(--arch tiny); sdxl=(--arch tiny-sdxl); steps="${STEPS:-2}"; warmup="${WARMUP:-1}"
    lora_batch=2; full_batch=2; sdxl_batch=1; lora_sweep=2,4; full_sweep=2,4
    compile_lever="torch_compile_backend='eager'"  # dynamo only: inductor on a CPU takes minutes
else
    sd15=(--arch-dir "$configs/sd15"); sdxl=(--arch-dir "$configs/sdxl")
    lora_batch=8; full_batch=4; sdxl_batch=2; lora_sweep=8,16,32,64; full_sweep=4,8,16,32
    compile_lever="torch_compile=True"
fi
common=(--steps "$steps" --warmup "$warmup" --interval "$steps" --rounds 1)
[ $tiny = 1 ] || common+=(--dtype bf16)

run() {  # part name, then step_time.py arguments
    local name="$1"; shift
    local elapsed=$(( $(date +%s) - start ))
    if [ "$elapsed" -ge "$budget" ]; then
        echo "$name: skipped, ${elapsed}s of the ${budget}s budget used" | tee "$out/$name.txt"; return
    fi
    echo "== $name (${elapsed}s elapsed): python benchmarks/step_time.py $*" | tee "$out/$name.cmd"
    [ "${DRY_RUN:-0}" = 1 ] && return
    python3 benchmarks/step_time.py "$@" --json "$out/$name.json" > "$out/$name.txt" 2>&1
    local rc=$?
    grep -E '^\||pairs/s of|lever |out of GPU memory|Error' "$out/$name.txt" | grep -v -i warn
    [ $rc = 0 ] || echo "$name: step_time.py exited with $rc (see $out/$name.txt)"
}

for part in $parts; do
    case "$part" in
        sd15-lora) run sd15-lora "${sd15[@]}" --lora --batch $lora_batch --cases a,b,b+cache "${common[@]}" ;;
        sd15-full) run sd15-full "${sd15[@]}" --full --batch $full_batch --cases a,b,b+cache "${common[@]}" ;;
        sdxl-lora) run sdxl-lora "${sdxl[@]}" --lora --batch $sdxl_batch --cases a,b,b+cache --gradient-checkpointing "${common[@]}" ;;
        sdxl-full) run sdxl-full "${sdxl[@]}" --full --batch 1 --cases a,b --gradient-checkpointing "${common[@]}" ;;
        levers) run levers "${sd15[@]}" --lora --batch $lora_batch --cases b "${common[@]}" \
                    --levers "$compile_lever,channels_last=False,optim='adamw_torch',tf32=False,non_blocking_transfers=False,logging_nan_inf_filter=True" ;;
        sweep) run sweep-sd15-lora "${sd15[@]}" --lora --cases b+cache --batches $lora_sweep "${common[@]}"
               run sweep-sd15-full "${sd15[@]}" --full --cases b+cache --batches $full_sweep "${common[@]}" ;;
        *) echo "unknown part $part" ;;
    esac
done
[ "${DRY_RUN:-0}" = 1 ] && exit 0
echo "== total $(( $(date +%s) - start ))s"
python3 benchmarks/gpu_summary.py "$out" --commit "$commit" | tee "$out/summary.md"
