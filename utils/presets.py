"""Random-weight architecture presets: "how long will my model take, and will it fit?"

`--model random:NAME` builds a known architecture from its config with seeded random weights:
no download, no tokenizer (calibrate with `--dataset random`). The weights mean nothing, so a
preset is for timing and memory only; everything it produces is marked (the config carries
`random_weights_preset`, the compression block `random_weights: true`).

How the model is built (fast, no full initialisation):
  1. the module tree is created on the meta device (no memory, no init kernels);
  2. it is materialised with `to_empty` on the home device in the preset's dtype;
  3. every parameter is filled in place from its own generator, seeded by (seed, parameter
     name): nn.Linear / nn.Embedding weights ~ N(0, initializer_range), biases 0, norm
     weights 1 (what the families' own _init_weights do). Seeding per name makes the first N
     layers of a `--num_layers N` model identical to those of the full model;
  4. non-persistent buffers (the rotary inv_freq tables) are recomputed by constructing the
     module again on the real device; any other buffer is an error, never garbage.

The home device is the CPU by default: the pipeline keeps the model in CPU memory and moves
one decoder layer at a time to --device (utils/layerwise.py), so "on the target device" means
the CPU for the model and --device for the layer being processed.
"""
from __future__ import annotations

import zlib
import torch
from torch import nn

PREFIX = "random:"


# name -> (transformers config class, its keyword arguments); num_hidden_layers is the full depth
PRESETS: dict[str, tuple[str, dict]] = {
    "llama2-7b": ("LlamaConfig", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)),
    "llama3-8b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)),
    "qwen2-7b": ("Qwen2Config", dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False, tie_word_embeddings=False)),
    # Mistral-7B-v0.1 (v0.3 differs only in vocab 32768 and no sliding window)
    "mistral-7b": ("MistralConfig", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
        rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False)),
}


def is_random_spec(spec: str) -> bool:
    return spec.startswith(PREFIX)


def preset_name(spec: str) -> str:
    """'random:llama2-7b' -> 'llama2-7b' (ValueError for an unknown preset)."""
    name = spec[len(PREFIX):] if is_random_spec(spec) else spec
    if name not in PRESETS:
        raise ValueError(f"--model {spec}: unknown random preset {name!r}; presets: "
                         + ", ".join(PREFIX + key for key in PRESETS))
    return name


def preset_config(name: str, num_layers: int | None = None, **overrides):
    """The preset's transformers config with only the first `num_layers` decoder layers.

    `overrides` replace config arguments (tests shrink the widths this way).
    """
    import transformers
    key = preset_name(name)
    class_name, kwargs = PRESETS[key]
    kwargs = {**kwargs, **overrides}
    full = kwargs["num_hidden_layers"]
    if num_layers is not None:
        if not 1 <= num_layers <= full:
            raise ValueError(f"--num_layers {num_layers}: preset {key} has {full} decoder layers")
        kwargs["num_hidden_layers"] = num_layers
    config = getattr(transformers, class_name)(**kwargs)
    config.random_weights_preset = key  # saved in every config.json this model produces
    return config


def _param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


@torch.no_grad()
def fill_random_(model: nn.Module, seed: int, std: float) -> None:
    """Seeded in-place init of every parameter (see the module docstring for the rules)."""
    owners = {}
    for module_name, module in model.named_modules():
        for key, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), (f"{module_name}.{key}" if module_name else key, module, key))
    for name, module, key in owners.values():
        param = getattr(module, key)
        generator = torch.Generator(device=param.device).manual_seed(_param_seed(seed, name))
        if key == "bias":
            param.zero_()
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            param.normal_(0.0, std, generator=generator)
        elif "Norm" in type(module).__name__ and key == "weight":
            param.fill_(1.0)  # Llama/Qwen2/Mistral RMSNorm: y = weight * x / rms(x)
        else:
            raise ValueError(f"no random-init rule for parameter {name} of {type(module).__name__}")


@torch.no_grad()
def _rebuild_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Recompute buffers (rotary tables) that to_empty left uninitialised."""
    for module_name, module in model.named_modules():
        buffers = dict(module.named_buffers(recurse=False))
        if not buffers:
            continue
        if "RotaryEmbedding" not in type(module).__name__:
            raise ValueError(f"buffer(s) {sorted(buffers)} of {module_name} ({type(module).__name__}) "
                             f"have no rebuild rule")
        with torch.device(device):
            fresh = type(module)(config=module.config)
        for key, value in fresh.named_buffers(recurse=False):
            module._buffers[key] = value.to(device)


def build_random_model(name: str, dtype: torch.dtype = torch.float16, seed: int = 0,
                       num_layers: int | None = None, device: torch.device | str = "cpu",
                       **overrides) -> nn.Module:
    """The preset's architecture with seeded random weights, in eval mode, use_cache off."""
    from transformers import AutoModelForCausalLM
    config = preset_config(name, num_layers, **overrides)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device=device)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    fill_random_(model, seed, getattr(config, "initializer_range", 0.02))
    _rebuild_buffers(model, device)
    model.eval()
    model.config.use_cache = False
    return model
