#!/usr/bin/env bash
# Every GPU measurement issue 10 (scale) asks for, in one call of the device tool. Each step has
# its own time limit (715 s in all, the most important first: run it in two calls if needed) and a failed step does not stop the rest.
#
#   1. Here (CPU), once: write a few of SmolLM2's whitened W S matrices (27 MB) for the gesvda
#      check; the device machine has no model:
#        python compress.py --step 1 --model smollm2-135m --dataset ../shared/data/wikitext2/wiki.valid.tokens \
#            --whitening_nsamples 16 --model_seq_len 256 --save_path /tmp/gpu_stats_run --stats_path /tmp/gpu_stats
#        python scripts/bench_rsvd.py --shapes "" --stats_path /tmp/gpu_stats --layers 0,29 --modules all \
#            --configs 100:4 --save_whitened .gpu_carry/whitened_smollm2.safetensors --out /tmp/unused.json
#        chmod 644 .gpu_carry/*   # the device may run as another user
#      (.gpu_carry/ is in .gitignore.)
#   2. device tool: run(command="bash scripts/gpu_checks.sh", carry=[".gpu_carry"], timeout_s=600)
#   3. Commit what comes back under scripts/results/ (the JSON files name the GPU inside).
# Everything comes back as at most 7 files: gpu_checks.log, 5 JSON and bench_speed's PNG.
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG="$OUT/gpu_checks.log"
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log everything, never stop the script
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T), limit ${limit}s): $*" >> "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  echo "=== $name rc=$?" | tee -a "$LOG"
}

step env 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c \
  \"import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())\""

# CUDA-only tests (Gram out_dtype path, gesvda + residual fallback, layer moves, step-5 peak memory)
# and the randomized SVD tests
step pytest 80 $PY -m pytest -q -p no:cacheprovider tests/test_scale.py tests/test_rsvd.py \
    tests/test_evaluation.py::test_cuda_peak_memory_leaves_out_what_else_is_on_the_device

# the scale benchmark: LLaMA-2-7B preset, fp16, 64 x 2048 windows, ratio 0.2, cholesky + svd
step bench_scale 290 $PY scripts/bench_scale.py --device cuda --dtype float16 --nsamples 64 --seq_len 2048 \
    --work_dir /tmp/bench_scale --out "$OUT/bench_scale_cuda_llama2-7b_64x2048_float16.json"

# exact SVD drivers and randomized SVD on the GPU: synthetic 4096 x 4096 and 11008 x 4096, and
# SmolLM2's whitened matrices (truncation error of gesvda / the default driver against float64)
WHITENED=()
[ -r .gpu_carry/whitened_smollm2.safetensors ] && WHITENED=(--whitened_file .gpu_carry/whitened_smollm2.safetensors)
step rsvd_gesvda 60 $PY scripts/bench_rsvd.py --device cuda --exact_driver gesvda --configs 10:2,100:4 --no_lowrank --threads "$(nproc)" \
    "${WHITENED[@]}" --out "$OUT/bench_rsvd_cuda_gesvda.json"
step rsvd_default 45 $PY scripts/bench_rsvd.py --device cuda --configs 10:2,100:4 --no_lowrank --threads "$(nproc)" \
    "${WHITENED[@]}" --out "$OUT/bench_rsvd_cuda_default.json"

# step 5 on the GPU: 4 layers of the LLaMA-2-7B preset compressed at 40%, timed against the same 4 original layers
step efficiency 70 $PY compress.py --step 1,3,5 --model random:llama2-7b --num_layers 4 --dataset random \
    --whitening_nsamples 16 --model_seq_len 512 --ratio 0.4 --dtype float16 --device cuda \
    --save_path /tmp/eff40 --prefill_len 512 --gen_seq_len 64 --repeats 5 --results "$OUT/efficiency_cuda_llama2-7b_4L_40.json"

# issue 28: speed against the limits on the GPU (4 layers of the LLaMA-2-7B preset, float16; the
# quantized rows de-quantize per forward there: the low-bit kernels wired are CPU ones)
step bench_speed 150 $PY scripts/bench_speed.py --device cuda --model random:llama2-7b --num_layers 4 \
    --calibration random --evaluation random --dtype float16 --nsamples 16 --gptq_nsamples 16 --eval_limit 0 \
    --rows original,svd20,svd40,svd60,svd40_unfused,gptq4,svd20_gptq4 --shapes b1,p8,b16 \
    --models_dir /tmp/bench_speed_models --out "$OUT/bench_speed_cuda_llama2-7b_4L_float16.json"

tail -40 "$LOG"
