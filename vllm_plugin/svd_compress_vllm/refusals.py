"""What the plugin does not serve, from a directory's config.json alone (no vLLM import).

The plugin's model refuses these when vLLM builds it; step 10 of the toolkit reads this file too (by
path, without installing the plugin) to send such directories to vLLM's Transformers backend instead,
so the two can never disagree.
"""
from __future__ import annotations

TRANSFORMERS_BACKEND = "serve it with vLLM's Transformers backend instead: LLM(model=DIR, trust_remote_code=True, " \
                       "model_impl=\"transformers\")"
# the architecture names our export writes for the families the plugin's Llama serves (a Hugging Face
# Mistral is a Llama with other defaults; vLLM's own Mistral class adds Mistral-format weights and Llama 4
# attention scaling, which the plugin refuses); __init__.py registers each of them
SERVED_ARCHITECTURES = ("SvdCompressLlamaForCausalLM", "SvdCompressMistralForCausalLM")


def refusal(config: dict) -> str | None:
    """Why the plugin does not serve a directory with this config.json (as a dict), or None."""
    architectures = config.get("architectures") or []
    if not any(a in SERVED_ARCHITECTURES for a in architectures):
        return f"architecture {architectures}: the plugin serves {' and '.join(SERVED_ARCHITECTURES)} only"
    if config.get("attention_bias") or config.get("mlp_bias"):
        return "projections with biases"
    if config.get("llama_4_scaling"):
        return "Llama 4 attention scaling"
    if config.get("hidden_act", "silu") != "silu":
        return f"activation {config['hidden_act']!r} (the plugin's Llama runs silu only)"
    compression = config.get("compression")
    if not isinstance(compression, dict) or "ranks" not in compression:
        return "no compression block with ranks in config.json (not an svd-compress directory)"
    if compression.get("quantization"):
        return "quantized factors"
    if compression.get("column_preserved"):
        return "column-preserved layers"
    return None
