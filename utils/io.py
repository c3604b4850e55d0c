"""Saving and loading compressed models and statistics: safetensors, JSON, atomic writes.

A compressed model is either
  DIR/   config.json (the base config plus a "compression" block), model.safetensors,
         modeling_svd_compress.py, tokenizer files; or
  NAME.pt  a dict of plain tensors and JSON-able values (no pickled modules), read with
         torch.load(weights_only=True).
The "compression" block records how the model was made (base model, method, ratio, the rank of
every compressed module, whitening, decomposition, calibration, fallbacks), which is all that
loading needs: the architecture is rebuilt from the config, the recorded modules are swapped
for LowRankLinear of the recorded rank, and the tensors are loaded strictly.
In a directory, config.json carries model_type "svd_compress_<base type>" and an auto_map naming
the classes of modeling_svd_compress.py (utils/hf_remote.py), so transformers refuses to load it
without trust_remote_code=True instead of silently building the dense base model on random weights,
and loads the low-rank model with it; the compression block records base_model_type and
base_architecture, from which load_compressed rebuilds the base class without running that file.
Directories written before (plain base model_type, no remote code) load as they did.

Every write goes to a temporary sibling first and is renamed into place only when complete,
so a crash or Ctrl-C never leaves a complete-looking half-written output.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Iterator

import torch
from torch import nn

from component import ColumnPreservedLinear, LowRankLinear
from component.quant_linear import QuantLinear
from utils.hf_remote import base_config_dict, remote_code_config, write_remote_code
from utils.model import set_submodule

FORMAT_VERSION = 1
KEEP_SUBDIRS = ("stats",)


class CompressedModelError(ValueError):
    """A compressed model that cannot be loaded (message names the problem)."""


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    Stale temporaries of killed runs are removed first. An existing directory is replaced only
    if it is empty or wholly ours (utils.outputs), so files we did not write are never deleted.
    Temporaries are named PATH.partial-TOKEN / PATH.old-TOKEN, TOKEN naming this process and
    host (utils.outputs.temporary_token), so a later run knows whose they are.
    """
    from utils.outputs import (OutputError, clean_stale_partials, foreign_entries, judge_directory,
                               temporary_token)
    path = os.path.abspath(path)
    created = _missing_parents(os.path.dirname(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    clean_stale_partials(path)

    def refuse_foreign(where: str) -> None:
        if os.path.isdir(path) and not os.path.islink(path) and judge_directory(path) is None:
            found = foreign_entries(path)
            problem = (f"contains {', '.join(found[:3])}, which this tool did not write" if found
                       else "is not an output of this tool")
            raise OutputError(f"{path} {problem}; not replacing it{where}; move it away and rerun")

    refuse_foreign("")  # before any work: nothing is lost by refusing now
    token = temporary_token()
    temporary = f"{path}.partial-{token}"
    _remove(temporary)
    try:
        yield temporary
    except BaseException:
        _remove(temporary)
        for directory in created:  # a failed run leaves no empty folders behind either
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise
    if os.path.isdir(path) and not os.path.isdir(temporary):
        raise IsADirectoryError(f"{path} is a directory; cannot replace it with a file")
    if os.path.isdir(temporary) and os.path.exists(path):
        # checked again: the directory may have changed during a long run. The new output stays
        # at `temporary` (it may hold stats/ moved out of `path`) until a later run cleans it
        refuse_foreign(f" (the new output is at {temporary})")
        old = f"{path}.old-{token}"
        # a kill between these two renames leaves PATH missing: the next run that writes or loads
        # PATH completes the swap from the two temporaries (utils.outputs.recover_interrupted_swap)
        os.replace(path, old)
        os.replace(temporary, path)
        _remove(old)
    else:
        os.replace(temporary, path)


def _missing_parents(directory: str) -> list[str]:
    """The folders os.makedirs(directory) would create, innermost first."""
    missing = []
    while directory and not os.path.exists(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    return missing


def _remove(path: str) -> None:
    if os.path.islink(path):  # the link, never what it points to (rmtree refuses links anyway)
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def write_json(path: str, data: dict) -> None:
    with atomic_path(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=False)
            handle.write("\n")


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def save_compressed(model: nn.Module, tokenizer, path: str, compression: dict) -> None:
    """Write a compressed model (directory, or a single .pt file) atomically."""
    from safetensors.torch import save_model
    config = model.config.to_dict()
    config["compression"] = compression
    with atomic_path(path) as temporary:
        if path.endswith(".pt"):
            state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            torch.save({"format_version": FORMAT_VERSION, "config": config,
                        "compression": compression, "state_dict": state}, temporary)
            return
        os.makedirs(temporary)
        config = remote_code_config(config)
        write_remote_code(temporary, config)
        save_model(model, os.path.join(temporary, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(temporary, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, default=str)
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)
        # statistics written by step 1 inside the output directory survive its replacement
        for keep in KEEP_SUBDIRS:
            if os.path.isdir(os.path.join(path, keep)):
                os.replace(os.path.join(path, keep), os.path.join(temporary, keep))


def is_compressed_model(path: str) -> bool:
    if path.endswith(".pt"):
        return os.path.isfile(path)
    config = os.path.join(path, "config.json")
    return os.path.isfile(config) and "compression" in read_json(config)


def _config_from_dict(config_dict: dict):
    from transformers import AutoConfig
    config_dict = base_config_dict(config_dict)  # either layout; never the directory's remote code
    return AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)


def build_low_rank_model(config_dict: dict, compression: dict, dtype: torch.dtype) -> nn.Module:
    """The architecture from the config with the recorded modules made low-rank (weights unset)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    config = _config_from_dict(config_dict)
    # every weight is overwritten by the strict load that follows, so skip random init (seconds
    # for a small model, minutes for a 7B one); buffers such as rotary tables are still computed
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.tie_weights()  # tied embeddings are one tensor before the strict load checks names
        for name, rank in compression.get("ranks", {}).items():
            try:
                dense = model.get_submodule(name)
            except AttributeError:
                raise CompressedModelError(f"compression block names module {name!r}, "
                                           f"which the {config.model_type} architecture does not have")
            preserved = (compression.get("column_preserved") or {}).get(name)
            if preserved:  # Duo-SVD's column level: its own rank and kept columns, indices from the tensors
                try:
                    module = ColumnPreservedLinear(dense.in_features, dense.out_features, int(preserved["rank"]),
                                                   int(preserved["columns"]), bias=dense.bias is not None, dtype=dtype)
                except (KeyError, TypeError, ValueError) as error:
                    raise CompressedModelError(f"the column_preserved record of {name} is not usable ({error!r})") from None
                set_submodule(model, name, module)
                continue
            set_submodule(model, name, LowRankLinear(dense.in_features, dense.out_features, int(rank),
                                                     bias=dense.bias is not None, dtype=dtype))
        for name, record in quantized_modules(compression).items():
            set_submodule(model, name, _quant_linear_for(model, name, record, dtype, config.model_type))
    model.eval()
    model.config.use_cache = True
    return model


def quantized_modules(compression: dict) -> dict[str, dict]:
    """Step 8's per-module records (qualified name of each quantized linear -> bits, groupsize,
    g_idx, bias, shape), or {} for a model that was not quantized."""
    return (compression.get("quantization") or {}).get("modules") or {}


def _quant_linear_for(model: nn.Module, name: str, record: dict, dtype: torch.dtype, model_type: str) -> QuantLinear:
    """The QuantLinear that replaces the linear `name` (a dense one, or a low-rank layer's u or v)."""
    try:
        dense = model.get_submodule(name)
    except AttributeError:
        raise CompressedModelError(f"the quantization section names module {name!r}, which the "
                                   f"{model_type} architecture (with the recorded ranks) does not have") from None
    if type(dense) is not nn.Linear:
        raise CompressedModelError(f"the quantization section names {name!r}, a {type(dense).__name__}, not a linear")
    shape = (record.get("out_features"), record.get("in_features"))
    if shape != (dense.out_features, dense.in_features):
        raise CompressedModelError(f"the quantization section records {name} as {shape[0]} x {shape[1]}, "
                                   f"the architecture has {dense.out_features} x {dense.in_features}")
    try:
        return QuantLinear(dense.in_features, dense.out_features, int(record["bits"]), int(record["groupsize"]),
                           bias=dense.bias is not None, g_idx=bool(record.get("g_idx")), dtype=dtype)
    except (KeyError, TypeError, ValueError) as error:
        raise CompressedModelError(f"the quantization record of {name} is not usable ({error!r})") from None


def _model_dtype(state: dict[str, torch.Tensor], compression: dict) -> torch.dtype:
    """The dtype a model was saved in: that of its first float tensor which is not a quantized
    layer's codes, scales or zeros (those keep their own dtypes whatever the model's)."""
    quantized = tuple(f"{name}." for name in quantized_modules(compression))
    for name, tensor in state.items():
        if tensor.is_floating_point() and not (name.startswith(quantized) and not name.endswith(".bias")):
            return tensor.dtype
    return torch.float32


def safetensors_tensor_bytes(path: str) -> dict[str, int]:
    """Bytes each tensor takes in a safetensors file, read from its header (no tensor is loaded)."""
    import struct
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return {name: entry["data_offsets"][1] - entry["data_offsets"][0]
            for name, entry in header.items() if name != "__metadata__"}


def load_compressed(path: str, dtype: torch.dtype | None = None) -> tuple[nn.Module, object, dict]:
    """Load a compressed model on the CPU: (model, tokenizer or None, compression block)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from utils.outputs import recover_interrupted_swap
    if not os.path.exists(path):
        recover_interrupted_swap(path)  # a replacement of it that a kill cut short
    if not os.path.exists(path):
        raise CompressedModelError(f"{path}: no such compressed model (run step 3 to write it)")
    if path.endswith(".pt"):
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CompressedModelError(f"{path}: not a readable compressed model ({error})") from None
        config_dict, compression, state = blob["config"], blob["compression"], blob["state_dict"]
        tokenizer = None
    else:
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise CompressedModelError(f"{path}: no config.json; not a compressed model directory")
        config_dict = read_json(config_path)
        if "compression" not in config_dict:
            raise CompressedModelError(f"{path}: config.json has no 'compression' block; "
                                       f"pass an uncompressed model with --model instead")
        compression = config_dict["compression"]
        try:
            state = load_file(os.path.join(path, "model.safetensors"))
        except (SafetensorError, OSError, ValueError) as error:
            raise CompressedModelError(f"{path}/model.safetensors is damaged or truncated ({error}); "
                                       f"rerun step 3") from None
        tokenizer = _load_saved_tokenizer(path)
    if dtype is None:
        dtype = _model_dtype(state, compression)
    model = build_low_rank_model(config_dict, compression, dtype)
    _load_state_strict(model, state, path)
    return model, tokenizer, compression


def _load_saved_tokenizer(path: str):
    from transformers import AutoTokenizer
    try:
        # AutoTokenizer reads config.json through AutoConfig, which would offer to run the
        # directory's remote code (an interactive y/N prompt); the tokenizer files alone suffice
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError):
        return None


def _load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    expected = model.state_dict()
    # a tied lm_head is stored once (safetensors) or twice (.pt): one name per tied group suffices
    groups: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        groups.setdefault(tensor.data_ptr() or id(tensor), []).append(name)
    missing = sorted(names[0] for names in groups.values() if not any(n in state for n in names))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CompressedModelError(f"{path}: tensors do not match the recorded architecture "
                                   f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CompressedModelError(f"{path}: {name} has shape {tuple(tensor.shape)} but the "
                                       f"recorded rank implies {tuple(expected[name].shape)}; "
                                       f"the config's ranks do not match the weights")
        if not expected[name].is_floating_point() and tensor.dtype != expected[name].dtype:
            # integer codes and group indices are bit patterns: a cast would silently corrupt them
            raise CompressedModelError(f"{path}: {name} is {tensor.dtype}, expected {expected[name].dtype}")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    for name, module in model.named_modules():
        if isinstance(module, ColumnPreservedLinear) and module.c is not None:
            channels = torch.cat([module.svd_idx, module.col_idx]).sort().values
            if not torch.equal(channels, torch.arange(module.in_features, dtype=channels.dtype)):
                raise CompressedModelError(f"{path}: {name}'s svd_idx and col_idx do not cover its "
                                           f"{module.in_features} input channels once each; the file is damaged")
