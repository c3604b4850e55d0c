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
from typing import Callable, Iterator

import torch
from torch import nn

from component import ColumnPreservedLinear, LowRankLinear
from component.quant_linear import QuantLinear
from utils.hf_remote import base_config_dict, remote_code_config, write_remote_code
from utils.model import fuse_shared_inputs, set_submodule

FORMAT_VERSION = 1
KEEP_SUBDIRS = ("stats",)


class CompressedModelError(ValueError):
    """A compressed model that cannot be loaded (message names the problem)."""


@contextlib.contextmanager
def atomic_path(path: str, adopt: Callable[[str], bool] | None = None) -> Iterator[str]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    adopt(temporary): offered each PATH.partial-TOKEN directory of a killed run of this host
    before stale temporaries are removed; the first it accepts becomes this run's temporary, with
    what it holds (a resumed run); it may raise to refuse the run, and then nothing is removed.

    Stale temporaries of killed runs are removed first. An existing directory is replaced only
    if it is empty or wholly ours (utils.outputs), so files we did not write are never deleted.
    Temporaries are named PATH.partial-TOKEN / PATH.old-TOKEN, TOKEN naming this process and
    host (utils.outputs.temporary_token), so a later run knows whose they are.
    """
    from utils.outputs import (OutputError, clean_stale_partials, dead_partials, foreign_entries,
                               judge_directory, recover_interrupted_swap, temporary_token)
    path = os.path.abspath(path)
    created = _missing_parents(os.path.dirname(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    token = temporary_token()
    temporary = f"{path}.partial-{token}"
    # a replacement a kill cut short is completed first: its new output is not a run to adopt
    recover_interrupted_swap(path)
    adopted = next((candidate for candidate in dead_partials(path) if adopt(candidate)), None) if adopt else None
    if adopted is not None:  # renamed to this run's name first, so the cleaning below keeps it
        _remove(temporary)
        os.replace(adopted, temporary)
    clean_stale_partials(path)

    def refuse_foreign(where: str) -> None:
        if os.path.isdir(path) and not os.path.islink(path) and judge_directory(path) is None:
            found = foreign_entries(path)
            problem = (f"contains {', '.join(found[:3])}, which this tool did not write" if found
                       else "is not an output of this tool")
            raise OutputError(f"{path} {problem}; not replacing it{where}; move it away and rerun")

    refuse_foreign("")  # before any work: nothing is lost by refusing now
    if adopted is None:
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


def save_compressed(model: nn.Module, tokenizer, path: str, compression: dict,
                    dtype: torch.dtype | None = None, overwrite: bool = False,
                    protected: tuple[str, ...] = ()) -> None:
    """Write a compressed model (directory, or a single .pt file) atomically.

    The CLI's rule (utils.outputs.check_output_path): an earlier output of this tool at `path` is
    replaced only with overwrite=True, anything else there never (OutputError, nothing touched);
    `protected` are paths (the input model) the output may not be, contain or be inside.
    `dtype` (None: the model's own) casts the model's floating parameters in place before writing,
    so the model in memory is the one written; `compression` then records it (dtype, and the
    dtype it was compressed in as compressed_dtype)."""
    from safetensors.torch import save_file
    from component.low_rank_linear import unshare_inputs
    from utils.model import layer_stream, load_all_layers
    if layer_stream(model) is not None:
        if not path.endswith(".pt"):  # layer by layer from where the stream reads them
            return _save_streamed(model, tokenizer, path, compression, dtype, overwrite, protected)
        load_all_layers(model)  # one .pt file is written from the whole state dict
    if unshare_inputs(model):  # fused v factors share one storage, which safetensors refuses
        try:
            return save_compressed(model, tokenizer, path, compression, dtype, overwrite, protected)
        finally:
            fuse_shared_inputs(model)
    from utils.outputs import check_output_path
    check_output_path(path, "model", overwrite, protected)
    _apply_save_dtype(model, compression, dtype)
    config = _config_to_save(model, compression)
    with atomic_path(path) as temporary:
        if path.endswith(".pt"):
            state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            torch.save({"format_version": FORMAT_VERSION, "config": config,
                        "compression": compression, "state_dict": state}, temporary)
            return
        os.makedirs(temporary)
        config = remote_code_config(config)
        write_remote_code(temporary, config)
        save_file(_deduplicated_state(model), os.path.join(temporary, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(temporary, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, default=str)
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)
        # statistics written by step 1 inside the output directory survive its replacement
        for keep in KEEP_SUBDIRS:
            if os.path.isdir(os.path.join(path, keep)):
                os.replace(os.path.join(path, keep), os.path.join(temporary, keep))


def _save_streamed(model: nn.Module, tokenizer, path: str, compression: dict, dtype: torch.dtype | None,
                   overwrite: bool, protected: tuple[str, ...]) -> None:
    """save_compressed of a model whose decoder layers are streamed (utils.model.layer_stream): each layer
    read from its files and written to its shard (ShardedModelWriter, not resumed), one at a time."""
    from utils.model import decoder_layers, layer_prefix, layer_state_dict
    prefix, count = layer_prefix(model), len(decoder_layers(model))
    with ShardedModelWriter(path, count, {}, overwrite, dtype, protected, resume=False) as writer:
        for index in range(count):
            tensors = layer_state_dict(model, index)
            writer.write_layer(index, {f"{prefix}.{index}.{name}": tensor for name, tensor in tensors.items()}, {})
            del tensors
        writer.finish(model, tokenizer, compression)


def _apply_save_dtype(model: nn.Module, compression: dict, dtype: torch.dtype | None) -> None:
    """save_compressed's `dtype`: record it in `compression` (dtype, and compressed_dtype: the one
    the model was compressed in) and cast the model's floating parameters to it in place."""
    from utils.model import cast_parameters, dtype_name
    if dtype is not None and dtype_name(dtype) != compression.get("dtype", dtype_name(dtype)):
        compression["compressed_dtype"] = compression["dtype"]
        compression["dtype"] = dtype_name(dtype)
    if dtype is not None:
        cast_parameters(model, dtype)
        model.config.dtype = dtype  # config.json's dtype: what from_pretrained(dtype="auto") builds


def _config_to_save(model: nn.Module, compression: dict) -> dict:
    """config.json's content (before remote_code_config): the model's config with the compression block."""
    config = model.config.to_dict()
    config["compression"] = compression
    # our calibration passes turn the KV cache off on the model they load; a saved model is for
    # generation, and transformers' generate() takes its default from here: left off, every new
    # token would run the whole sequence again
    config["use_cache"] = True
    if (config.get("quantization_config") or {}).get("quant_method") == "gguf":
        # a GGUF checkpoint is de-quantized on load: the saved tensors are plain floats, and engines
        # that read the entry (vLLM) would look for GGUF blocks
        del config["quantization_config"]
    return config


INDEX_FILE = "model.safetensors.index.json"


def _write_text_atomically(path: str, text: str) -> None:
    # inside a temporary directory: a kill mid-write leaves the previous version whole
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)


def _save_config_and_tokenizer(model: nn.Module, tokenizer, directory: str, compression: dict) -> None:
    config = remote_code_config(_config_to_save(model, compression))
    write_remote_code(directory, config)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, default=str)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def add_to_compression(path: str, entries: dict) -> None:
    """Add `entries` to the compression block of the saved model directory `path` (config.json
    rewritten atomically): what a step measures on a model after writing it."""
    config_path = os.path.join(path, "config.json")
    config = read_json(config_path)
    config["compression"] = {**config["compression"], **entries}
    _write_text_atomically(config_path, json.dumps(config, indent=2, default=str))


def resumable(kind: str, identity: dict, overwrite: bool) -> Callable[[str], bool]:
    """atomic_path's adopt for a run that writes layer by layer: a killed run's temporary is
    continued when its progress.json is of this `kind` and records this `identity`; one of other
    identity is refused in one line naming what differs (with `overwrite` it is removed instead)."""
    def adopt(candidate: str) -> bool:
        from utils.outputs import PROGRESS_FILE, OutputError
        try:
            progress = read_json(os.path.join(candidate, PROGRESS_FILE))
        except (OSError, ValueError):
            return False
        if not isinstance(progress, dict) or progress.get("kind") != kind or not isinstance(progress.get("identity"), dict):
            return False
        recorded = progress["identity"]
        differ = [key for key in sorted(set(recorded) | set(identity)) if recorded.get(key) != identity.get(key)]
        if not differ:
            return True
        if overwrite:
            return False  # removed as a stale temporary: this run starts over
        raise OutputError(f"{candidate} holds an interrupted run with other {', '.join(differ)} "
                          f"({progress.get('layers_done')} layers done); rerun with the same arguments to resume it, "
                          f"or pass --overwrite to start over")
    return adopt


def write_progress(directory: str, kind: str, identity: dict, layers_done: int, state: dict) -> None:
    """The resume record of a run that writes layer by layer (see resumable), replaced atomically."""
    from utils.outputs import PROGRESS_FILE
    _write_text_atomically(os.path.join(directory, PROGRESS_FILE), json.dumps(
        {"kind": kind, "identity": identity, "layers_done": layers_done, "state": state}, default=str))


def read_progress(directory: str) -> dict | None:
    from utils.outputs import PROGRESS_FILE
    path = os.path.join(directory, PROGRESS_FILE)
    return read_json(path) if os.path.isfile(path) else None


class ShardedModelWriter:
    """A compressed model directory written as its decoder layers are finished: layer i into
    model-(i+1)-of-N.safetensors, the other tensors (embeddings, norm, head) into the last shard,
    and model.safetensors.index.json, as Hugging Face shards a checkpoint. All of it goes into the
    atomic temporary (PATH.partial-TOKEN) with a progress.json naming the layers done and what
    the run was (`identity`: digests of its inputs), so that a killed run, rerun with the same
    inputs, continues where it stopped; other inputs are refused naming the difference (with
    overwrite, they start over). The directory is renamed into place by finish().

        with ShardedModelWriter(path, num_layers, identity) as writer:
            writer.layers_done, writer.state          # what an interrupted run left (0, None: nothing)
            writer.write_layer(index, tensors, state)  # for every finished layer, in order
            writer.finish(model, tokenizer, compression)

    resume=False: a killed run's temporary is never continued (removed as stale), for outputs that
    are not a function of the identity alone.

    save_compressed's rules hold: check_output_path (overwrite, protected) before anything is
    written; `dtype` (None: the model's own) is the dtype of the floating tensors written (each
    layer's shard is cast as it is written; the rest of the model is cast in place by finish, which
    records it in the compression block); a tied head is stored once; config.json without a GGUF
    quantization_config and with the remote-code entries.
    """

    def __init__(self, path: str, num_layers: int, identity: dict, overwrite: bool = False,
                 dtype: torch.dtype | None = None, protected: tuple[str, ...] = (), resume: bool = True):
        from utils.model import dtype_name
        self.path, self.num_layers, self.overwrite, self.resume = path, num_layers, overwrite, resume
        self.dtype, self.protected = dtype, protected
        # shards of another save dtype are not this run's
        self.identity = {**identity, "save dtype": None if dtype is None else dtype_name(dtype)}
        self.layers_done, self.state, self.temporary = 0, None, None
        self._stack: contextlib.ExitStack | None = None
        self._finished = False

    def _progress_path(self) -> str:
        from utils.outputs import PROGRESS_FILE
        return os.path.join(self.temporary, PROGRESS_FILE)

    def __enter__(self) -> "ShardedModelWriter":
        from utils.outputs import check_output_path
        check_output_path(self.path, "model", self.overwrite, self.protected)
        self._stack = contextlib.ExitStack()
        self.temporary = self._stack.enter_context(
            atomic_path(self.path, adopt=resumable("model", self.identity, self.overwrite) if self.resume else None))
        progress = read_progress(self.temporary) if os.path.isdir(self.temporary) else None
        if progress is not None:
            self.layers_done, self.state = int(progress["layers_done"]), progress.get("state")
            print(f"resuming: {self.layers_done} of {self.num_layers} layers were done by an interrupted run "
                  f"({self.temporary})")
        else:
            os.makedirs(self.temporary, exist_ok=True)
        return self

    def __exit__(self, kind, error, trace) -> bool:
        if kind is None and not self._finished:
            kind = RuntimeError
            error = RuntimeError("ShardedModelWriter left without finish(): nothing was written")
        return self._stack.__exit__(kind, error, trace)

    def shard_name(self, number: int) -> str:
        return f"model-{number:05d}-of-{self.num_layers + 1:05d}.safetensors"

    def write_layer(self, index: int, tensors: dict[str, torch.Tensor], state: dict, cast: bool = True) -> None:
        """Layer `index`'s tensors (qualified names) into its shard, then the progress record
        (`state`: what a resumed run needs besides the tensors, JSON-able). cast=False: the tensors
        are written as given (the caller cast what is to be cast: a quantized layer keeps its scales)."""
        from safetensors.torch import save_file
        if index != self.layers_done:
            raise ValueError(f"layer {index} written after {self.layers_done} layers")
        save_file({k: (self._cast(v) if cast else v).detach().contiguous() for k, v in tensors.items()},
                  os.path.join(self.temporary, self.shard_name(index + 1)), metadata={"format": "pt"})
        self.layers_done, self.state = index + 1, state
        write_progress(self.temporary, "model", self.identity, self.layers_done, state)

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.dtype) if self.dtype is not None and tensor.is_floating_point() else tensor

    def layer_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """The tensors written for layer `index` (by this run or the interrupted one)."""
        from safetensors.torch import load_file
        return load_file(os.path.join(self.temporary, self.shard_name(index + 1)))

    def finish(self, model: nn.Module, tokenizer, compression: dict) -> None:
        """Write the non-layer tensors, the index, config and tokenizer, and rename into place."""
        from safetensors.torch import save_file
        from utils.model import layer_prefix, layer_stream
        if self.layers_done != self.num_layers:
            raise ValueError(f"{self.layers_done} of {self.num_layers} layers written")
        if layer_stream(model) is not None:  # a walk that ran nothing through them let them go
            layer_stream(model).load_non_layer(model)
        from component.low_rank_linear import unshare_inputs
        if unshare_inputs(model):  # fused v factors share one storage, which safetensors refuses
            try:
                return self.finish(model, tokenizer, compression)
            finally:
                fuse_shared_inputs(model)
        prefix = layer_prefix(model) + "."
        _apply_save_dtype(model, compression, self.dtype)
        # a tied lm_head is stored once, under the embedding's name (as save_compressed does)
        rest = {name: tensor for name, tensor in _deduplicated_state(model).items() if not name.startswith(prefix)}
        save_file(rest, os.path.join(self.temporary, self.shard_name(self.num_layers + 1)), metadata={"format": "pt"})
        weight_map, total = {}, 0
        for number in range(1, self.num_layers + 2):  # from the headers: no tensor is read back
            for name, nbytes in safetensors_tensor_bytes(os.path.join(self.temporary, self.shard_name(number))).items():
                weight_map[name] = self.shard_name(number)
                total += nbytes
        with open(os.path.join(self.temporary, INDEX_FILE), "w", encoding="utf-8") as handle:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2)
        _save_config_and_tokenizer(model, tokenizer, self.temporary, compression)
        for keep in KEEP_SUBDIRS:
            if os.path.isdir(os.path.join(self.path, keep)):
                os.replace(os.path.join(self.path, keep), os.path.join(self.temporary, keep))
        os.remove(self._progress_path())
        self._finished = True


def _deduplicated_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tied tensor once, under the name the model registers first: a tied
    lm_head is stored as the input embedding, as transformers' save_pretrained does, because loaders
    of the decoder alone (AutoModel, vLLM's Transformers backend) read the embedding under its own name."""
    state = model.state_dict()
    first = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - first
    return {name: tensor.detach().contiguous() for name, tensor in state.items() if name not in tied}


def stored_tensor_bytes(path: str) -> dict[str, int]:
    """safetensors_tensor_bytes of every tensor file of a model directory (sharded or one file)."""
    files, _, _ = _stored_tensors(path)
    sizes: dict[str, int] = {}
    for file in files:
        sizes.update(safetensors_tensor_bytes(file))
    return sizes


def is_compressed_model(path: str) -> bool:
    if path.endswith(".pt"):
        return os.path.isfile(path)
    config = os.path.join(path, "config.json")
    return os.path.isfile(config) and "compression" in read_json(config)


def _config_from_dict(config_dict: dict):
    from transformers import AutoConfig
    config_dict = base_config_dict(config_dict)  # either layout; never the directory's remote code
    return AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)


def build_low_rank_model(config_dict: dict, compression: dict, dtype: torch.dtype,
                         device: torch.device | str | None = None) -> nn.Module:
    """The architecture from the config with the recorded modules made low-rank (weights unset).
    device: where its tensors are made (None: the CPU; "meta": shapes only, for a streamed load)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    config = _config_from_dict(config_dict)
    # every weight is overwritten by the strict load that follows, so skip random init (seconds
    # for a small model, minutes for a 7B one); buffers such as rotary tables are still computed
    with no_init_weights(), (torch.device(device) if device is not None else contextlib.nullcontext()):
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
            set_submodule(model, name, quant_linear_for(model, name, record, dtype, config.model_type))
    model.eval()
    model.config.use_cache = True
    return model


def quantized_modules(compression: dict) -> dict[str, dict]:
    """Step 8's per-module records (qualified name of each quantized linear -> bits, groupsize,
    g_idx, bias, shape), or {} for a model that was not quantized."""
    return (compression.get("quantization") or {}).get("modules") or {}


def quant_linear_for(model: nn.Module, name: str, record: dict, dtype: torch.dtype, model_type: str) -> QuantLinear:
    """The QuantLinear that replaces the linear `name` of `model` (a dense one, or a low-rank layer's
    u or v) as step 8's `record` of it describes (its tensors made on the current default device)."""
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


def load_compressed(path: str, dtype: torch.dtype | None = None, fuse: bool = False,
                    stream: bool = False) -> tuple[nn.Module, object, dict]:
    """Load a compressed model on the CPU: (model, tokenizer or None, compression block).

    `fuse`: low-rank layers that read one input (q/k/v, gate/up) run their v factors as one
    matmul (utils.model.fuse_shared_inputs): the same tensors and names, the same outputs to
    float rounding (two matmul shapes round differently); off, the model computes exactly as
    the one that was saved. The CLI and the trust_remote_code loader fuse.
    `stream`: a directory's decoder layers stay on disk (on the meta device) and are read one at
    a time when the layer walk reaches them (utils.model.LayerStream), each checked as the whole
    load checks it and fused (with `fuse`) when read, so it computes as the whole load's; a .pt
    file, or an architecture that cannot be streamed, is loaded whole whatever this says."""
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
        try:  # the headers only: each file's tensors are read when the model is ready for them
            files, state, weight_map = _stored_tensors(path)
        except (SafetensorError, OSError, ValueError) as error:
            raise CompressedModelError(f"{path}: the tensor files are damaged or truncated ({error}); "
                                       f"rerun step 3") from None
        tokenizer = _load_saved_tokenizer(path, config_dict)
    if dtype is None:
        dtype = _model_dtype(state, compression)
    if stream and not path.endswith(".pt"):
        model = _streamed_compressed(path, config_dict, compression, dtype, state, weight_map, fuse)
        if model is not None:
            return model, tokenizer, compression
    model = build_low_rank_model(config_dict, compression, dtype)
    _check_state(model, state, path)
    if path.endswith(".pt"):
        model.load_state_dict(state, strict=False)
    else:
        for file in files:  # one file's tensors in memory at a time, beside the model
            try:
                part = load_file(file)
            except (SafetensorError, OSError, ValueError) as error:
                raise CompressedModelError(f"{file} is damaged or truncated ({error}); rerun step 3") from None
            model.load_state_dict(part, strict=False)
            del part
    _check_loaded(model, path)
    if fuse:
        fuse_shared_inputs(model)
    return model, tokenizer, compression


def _streamed_compressed(path: str, config_dict: dict, compression: dict, dtype: torch.dtype,
                         state: dict[str, torch.Tensor], weight_map: dict[str, str], fuse: bool) -> nn.Module | None:
    """load_compressed's streamed model: the low-rank model built on the meta device, checked
    against the files' headers, its non-layer tensors read and a LayerStream attached whose
    on_load checks (and with `fuse`, fuses) each layer as it is read; None when not streamable."""
    from utils.model import layer_prefix, stream_layers_from
    model = build_low_rank_model(config_dict, compression, dtype, device="meta")
    _check_state(model, state, path)
    prefix = layer_prefix(model)

    def on_load(layer: nn.Module, index: int) -> None:
        _check_columns(layer, path, f"{prefix}.{index}.")
        if fuse:
            fuse_shared_inputs(layer)

    if not stream_layers_from(model, weight_map, None, on_load):
        return None
    return model  # (compression replaces only linears of the decoder layers: on_load checks them all)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def _stored_tensors(path: str) -> tuple[list[str], dict[str, torch.Tensor], dict[str, str]]:
    """The safetensors files of a model directory (sharded with an index, or model.safetensors),
    every tensor they hold as a meta tensor of its shape and dtype, read from the headers, and
    the file of each (tensor name -> path)."""
    from safetensors import safe_open
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        names = sorted(set(read_json(index)["weight_map"].values()))
    else:
        names = ["model.safetensors"]
    files = [os.path.join(path, name) for name in names]
    state: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                entry = handle.get_slice(name)
                state[name] = torch.empty(entry.get_shape(), dtype=SAFETENSORS_DTYPES[entry.get_dtype()], device="meta")
                weight_map[name] = file
    return files, state, weight_map


def _load_saved_tokenizer(path: str, config_dict: dict):
    from transformers import AutoTokenizer
    try:
        # given the base config, AutoTokenizer does not read config.json: through AutoConfig that
        # would offer to run the directory's remote code (an interactive y/N prompt) and, refused,
        # warn that a model of type svd_compress_<base> instantiates a generic config
        return AutoTokenizer.from_pretrained(path, config=_config_from_dict(config_dict))
    except (OSError, ValueError):
        return None


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """CompressedModelError unless `state` (tensors, or meta tensors of their shapes and dtypes)
    has exactly the model's tensors, of its shapes."""
    expected = model.state_dict(keep_vars=True)  # the tensors themselves: tied ones are one (also on meta)
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


def _check_loaded(model: nn.Module, path: str) -> None:
    model.tie_weights()
    _check_columns(model, path)


def _check_columns(root: nn.Module, path: str, prefix: str = "") -> None:
    """CompressedModelError unless every ColumnPreservedLinear under `root` covers its input
    channels once each; `prefix`: root's qualified name, for the message."""
    for name, module in root.named_modules():
        if isinstance(module, ColumnPreservedLinear) and module.c is not None:
            channels = torch.cat([module.svd_idx, module.col_idx]).sort().values
            if not torch.equal(channels, torch.arange(module.in_features, dtype=channels.dtype)):
                raise CompressedModelError(f"{path}: {prefix}{name}'s svd_idx and col_idx do not cover its "
                                           f"{module.in_features} input channels once each; the file is damaged")
