"""vLLM plugin: serve a compressed directory with vLLM's own model code, its low-rank factors on vLLM's kernels.

Installed into the vLLM venv (scripts/install_vllm_cpu.sh does it), vLLM calls register() in every
process; the architecture names our export writes into config.json then resolve to the classes in
llama.py instead of the generic Transformers backend. Directories this plugin cannot serve
(quantized or column-preserved layers, families other than Llama and Mistral) say so and name model_impl="transformers".
"""

from svd_compress_vllm.refusals import SERVED_ARCHITECTURES

# config.json architecture -> "module:class", imported by vLLM only when such a model is loaded
ARCHITECTURES = {architecture: "svd_compress_vllm.llama:LowRankLlamaForCausalLM" for architecture in SERVED_ARCHITECTURES}


def register() -> None:
    from vllm import ModelRegistry
    for architecture, target in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, target)
