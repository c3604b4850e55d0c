#!/usr/bin/env bash
# Every GPU measurement issue 10 (scale) asks for, in one call of the device tool (about 5-8
# minutes on an H100; each step has its own time limit and a failed step does not stop the rest).
#
#   1. Here (CPU), once: write a few of SmolLM2's whitened W S matrices (27 MB) for the gesvda
#      check; the device machine has no model:
#        python compress.py --step 1 --model smollm2-135m --dataset ../shared/data/wikitext2/wiki.valid.tokens \
#            --whitening_nsamples 16 --model_seq_len 256 --save_path /tmp/gpu_stats_run --stats_path /tmp/gpu_stats
#        python scripts/bench_rsvd.py --shapes "" --stats_path /tmp/gpu_stats --layers 0,29 --modules all \
#            --configs 100:4 --save_whitened .gpu_carry/whitened_smollm2.safetensors --out /tmp/unused.json
#      (.gpu_carry/ is in .gitignore.)
#   2. device tool: run(command="bash scripts/gpu_checks.sh", carry=[".gpu_carry"], timeout_s=600)
#   3. Commit what comes back under scripts/results/ (file names say the GPU).
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# CUDA-only tests (Gram out_dtype path, gesvda + residual fallback) and the randomized SVD tests
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_scale.py tests/test_rsvd.py > "$OUT/pytest.txt" 2>&1
echo "pytest rc=$?"; tail -3 "$OUT/pytest.txt"

# exact SVD drivers and randomized SVD on the GPU: synthetic 4096 x 4096 and 11008 x 4096, and
# SmolLM2's whitened matrices (truncation error of gesvda / the default driver against float64)
WHITENED=()
[ -f .gpu_carry/whitened_smollm2.safetensors ] && WHITENED=(--whitened_file .gpu_carry/whitened_smollm2.safetensors)
for driver in gesvda default; do
  flag=(); [ "$driver" = gesvda ] && flag=(--exact_driver gesvda)
  timeout 100 $PY scripts/bench_rsvd.py --device cuda "${flag[@]}" --configs 10:2,100:4 --no_lowrank \
      "${WHITENED[@]}" --out "$OUT/bench_rsvd_cuda_$driver.json" > "$OUT/bench_rsvd_$driver.log" 2>&1
  echo "bench_rsvd $driver rc=$?"; tail -2 "$OUT/bench_rsvd_$driver.log"
done

# the scale benchmark: LLaMA-2-7B preset, fp16, 64 x 2048 windows, ratio 0.2, cholesky + svd
timeout 330 $PY scripts/bench_scale.py --device cuda --dtype float16 --nsamples 64 --seq_len 2048 \
    --work_dir /tmp/bench_scale --out "$OUT/bench_scale_cuda_llama2-7b_64x2048_float16.json" > "$OUT/bench_scale.log" 2>&1
echo "bench_scale rc=$?"; tail -25 "$OUT/bench_scale.log"
