"""A model's architecture without its weights: the config (config.json, GGUF metadata or a random
preset) built on the meta device, so plans, --model_ratio and cost estimates are checked before
anything slow (reading gigabytes of weights, de-quantising a GGUF file) starts.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Architecture:
    model: nn.Module  # on the meta device: shapes only
    shapes: dict  # target_shapes: qualified name -> (out, in, bias)
    parameters: int  # count_parameters of the whole model (a tied embedding once)

    @property
    def target_parameters(self) -> int:
        return sum(m * n for m, n, _ in self.shapes.values())


class _Field:
    """What transformers' GGUF loader reads of a gguf.ReaderField: parts[data[i]] is value i."""

    def __init__(self, types: list[int], parts, data):
        self.types, self.parts, self.data = types, parts, data


class _EmptyStrings:
    def __getitem__(self, index):
        import numpy as np
        return np.zeros(0, dtype=np.uint8)


class _Tensor:
    def __init__(self, name: str):
        self.name = name


def _header_reader(metadata: dict, tensor_names: tuple[str, ...]):
    """A stand-in for gguf.GGUFReader built from transformers' fast metadata reader (no tensor
    data, string arrays as their lengths): GGUFReader parses every token string in Python, 13 s
    for SmolLM2's 49k-token vocabulary, and the config needs none of them."""
    import numpy as np
    fields = {}
    for key, value in metadata.items():
        if key == "tokenizer.ggml.tokens" and isinstance(value, int):  # the count: vocab_size fallback
            fields[key] = _Field([9, 8], _EmptyStrings(), range(value))
            continue
        if key in ("tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            continue  # the vocabulary itself: not the config
        if isinstance(value, str):
            fields[key] = _Field([8], [np.frombuffer(value.encode(), dtype=np.uint8)], [0])
        elif isinstance(value, bool):
            fields[key] = _Field([7], [np.array([value])], [0])
        elif isinstance(value, int):
            fields[key] = _Field([11], [np.array([value], dtype=np.int64)], [0])
        elif isinstance(value, float):
            fields[key] = _Field([12], [np.array([value], dtype=np.float64)], [0])
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
            kind = 12 if any(isinstance(v, float) for v in value) else 11
            fields[key] = _Field([9, kind], np.array(value).reshape(-1, 1), range(len(value)))

    class Reader:
        def __init__(self, path):
            self.fields = fields
            self.tensors = [_Tensor(name) for name in tensor_names]

    return Reader


@contextlib.contextmanager
def _fast_gguf_reader(path: str):
    try:
        import gguf
        from transformers.integrations.gguf import read_gguf_metadata
        metadata, names = read_gguf_metadata(path)
    except (ImportError, AttributeError, OSError, ValueError):
        yield  # an older transformers: its own (slow) reader
        return
    original = gguf.GGUFReader
    gguf.GGUFReader = _header_reader(metadata, names)
    try:
        yield
    finally:
        gguf.GGUFReader = original


def model_config(spec: str, num_layers: int | None = None):
    """The transformers config of --model (an alias, a directory, a .gguf file, a hub id in the
    cache or reachable, a random preset), without reading weights."""
    import os

    from transformers import AutoConfig

    from utils.model import resolve_model
    from utils.presets import is_random_spec, preset_config, preset_name
    if is_random_spec(spec):
        return preset_config(preset_name(spec), num_layers)
    source = resolve_model(spec)
    if source.gguf_file:
        with _fast_gguf_reader(os.path.join(source.path, source.gguf_file)):
            return AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
    return AutoConfig.from_pretrained(source.path)


def architecture(spec: str, num_layers: int | None = None) -> Architecture:
    """--model built on the meta device (config only): its target shapes and parameter count."""
    from transformers import AutoModelForCausalLM

    from utils.model import count_parameters, keep_first_layers, target_shapes
    config = model_config(spec, num_layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if num_layers is not None:
        keep_first_layers(model, num_layers)
    return Architecture(model, target_shapes(model), count_parameters(model))


def ratio_for_model_fraction(shapes: dict, model_params: int, fraction: float) -> float:
    """The per-matrix ratio (--ratio, SVD-LLM's convention) whose uniform plan removes `fraction`
    of the whole model's `model_params` parameters, to one rank step; ValueError naming the most
    that can be removed when even rank 1 everywhere does not reach it (embeddings dominate)."""
    from utils.plan import Plan
    target = fraction * model_params

    def removed(ratio: float) -> int:
        plan = Plan.uniform(shapes, ratio)
        return plan.params_before() - plan.params_after()

    top = 1.0 - 1e-12  # rank 1 for every matrix that rank 1 shrinks
    most = removed(top)
    if most < target:
        share = sum(m * n for m, n, _ in shapes.values()) / model_params
        raise ValueError(f"--model_ratio {fraction:g} is unreachable: the decoder layers' linear weights are "
                         f"{share:.1%} of the model's {model_params:,} parameters (embeddings, norms and lm_head "
                         f"stay dense), so even at rank 1 everywhere only {most / model_params:.1%} can be removed; "
                         f"ask for less")
    low, high = 0.0, top  # removed(low) < target <= removed(high)
    for _ in range(60):
        middle = (low + high) / 2
        if removed(middle) < target:
            low = middle
        else:
            high = middle
    best = high if low == 0.0 or abs(removed(high) - target) <= abs(removed(low) - target) else low
    rounded = float(f"{best:.6g}")
    return rounded if 0.0 < rounded < 1.0 and removed(rounded) == removed(best) else best
