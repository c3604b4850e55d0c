"""The Python API of steps 1 and 3: profile a model, compress it by a plan.

    stats = profile_model(model, windows, device)                      # step 1
    plan = Plan.uniform(target_shapes(model), 0.2)                     # step 2
    record = compress_model(model, plan, CompressOptions(), device, stats)   # step 3

Both walk the decoder layers one at a time (utils.layerwise); compression is a list of passes
(methods/) over that walk. Plain parameters only: compress.py maps the CLI's flags onto these.
"""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file

from methods import AnchoredOptions, DecomposeOptions, RefineOptions, UpdateOptions
from methods.registry import MethodOptions, PassInputs, Registry
from utils.io import atomic_path, read_json, read_progress, resumable, write_json, write_progress
from utils.outputs import recover_interrupted_swap
from utils.layerwise import LayerContext, walk_layers
from utils.model import (check_supported, count_parameters, decoder_layers, dtype_name, layer_prefix,
                         model_description, set_submodule, source_description, target_linears, target_shapes,
                         tensors_digest, weights_fingerprint)
from utils.plan import Plan
from utils.stats import LayerStatsCollector

STATS_META = "meta.json"
FISHER_FILE = "fisher.safetensors"  # step 1 --fisher: qualified module name -> (in,) float64


class PipelineError(ValueError):
    """Inputs of a step that do not fit together (message says how to fix it)."""


# ---------------------------------------------------------------------------------------- statistics

class Statistics:
    """Step 1's per-layer input statistics, on disk (one safetensors file per layer plus
    meta.json) or in memory. layer(i) returns (tensors, module -> stream); on disk, with `prefetch`,
    layer i+1 is read in a background thread while layer i is being used (at most three layers in
    memory), without it when it is asked for."""

    def __init__(self, meta: dict, path: str | None = None, layers: dict[int, dict] | None = None,
                 fisher: dict[str, torch.Tensor] | None = None, prefetch: bool = True):
        self.meta, self.path, self._layers = meta, path, layers
        self._fisher, self.prefetch = fisher, prefetch
        self._reader = ThreadPoolExecutor(max_workers=1) if path else None
        self._reads: dict = {}
        self.wait_s = 0.0  # time the caller waited for a read (background reads hide the rest)

    @classmethod
    def open(cls, path: str, prefetch: bool = True) -> "Statistics":
        recover_interrupted_swap(path)  # a replacement of these statistics that a kill cut short
        meta_path = os.path.join(path, STATS_META)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"no statistics in {path}: run step 1 first "
                                    f"(or pass --stats_path to where step 1 wrote them)")
        return cls(read_json(meta_path), path=path, prefetch=prefetch)

    def _read(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(os.path.join(self.path, f"layer_{index:04d}.safetensors"), device="cpu")

    def layer(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        streams = self.meta["streams"][str(index)]
        if self._layers is not None:
            return self._layers[index], streams
        future = self._reads.pop(index, None) or self._reader.submit(self._read, index)
        if self.prefetch and index + 1 < self.meta["num_layers"]:
            self._reads[index + 1] = self._reader.submit(self._read, index + 1)
        start = time.perf_counter()
        tensors = future.result()
        self.wait_s += time.perf_counter() - start
        return tensors, streams

    @property
    def has_fisher(self) -> bool:
        return self._fisher is not None or bool(self.meta.get("fisher"))

    def fisher(self, module: str) -> torch.Tensor:
        """The fisher vector (in,) of one target linear, by qualified name (step 1 with --fisher):
        sqrt of the mean over windows of the squared LM-loss gradient, summed over output rows."""
        if self._fisher is None:
            if not self.has_fisher or self.path is None:
                raise PipelineError(f"statistics in {self.path or 'memory'} have no fisher information: "
                                    f"rerun step 1 with --fisher")
            self._fisher = load_file(os.path.join(self.path, FISHER_FILE), device="cpu")
        if module not in self._fisher:
            raise PipelineError(f"no fisher information for {module} in {self.path or 'memory'}")
        return self._fisher[module]

    def close(self) -> None:
        if self._reader is not None:
            for future in self._reads.values():
                future.cancel()
            self._reads.clear()
            self._reader.shutdown(wait=True)

    def check_model(self, model: torch.nn.Module, force: bool = False) -> None:
        """PipelineError unless these statistics were collected on this architecture and on these
        weights (the fingerprint step 1 records: utils.model.weights_fingerprint). force: different
        weights only print a warning (the architecture must still match)."""
        where = self.path or "memory"
        described, current = self.meta.get("model_description", {}), model_description(model)
        mismatch = [k for k in ("model_type", "num_layers", "hidden_size", "parameters")
                    if k in described and described[k] != current[k]]
        if mismatch:
            raise PipelineError(f"statistics in {where} were collected on {self.meta.get('model')} "
                                f"({', '.join(f'{k} {described[k]}' for k in mismatch)}), not on this model "
                                f"({', '.join(f'{k} {current[k]}' for k in mismatch)}): rerun step 1 for it")
        recorded = self.meta.get("weights_fingerprint")
        if recorded is None:
            print(f"warning: statistics in {where} have no weight fingerprint (written by an earlier version), so "
                  f"they cannot be checked against this checkpoint; rerun step 1 to record one", file=sys.stderr)
            return
        found = weights_fingerprint(model)
        # the same dtype: every bit must match; another dtype: the sign bits, which casts keep
        key = "sha1" if recorded["dtype"] == found["dtype"] else "signs_sha1"
        if recorded[key] == found[key]:
            return
        name = getattr(model.config, "_name_or_path", None) or type(model).__name__
        message = (f"statistics in {where} were collected on other weights: {self.meta.get('model')} "
                   f"({key} {recorded[key]}), this model is {name} ({key} {found[key]})")
        if not force:
            raise PipelineError(f"{message}: rerun step 1 for this model, or pass --force_stats to use them anyway")
        print(f"warning: {message}; using them anyway (--force_stats)", file=sys.stderr)


def _check_finite(collector: LayerStatsCollector, layer_name: str, dtype: torch.dtype) -> None:
    """Non-finite activations make every later factorisation fail obscurely: stop here, naming
    the layer and the input stream."""
    for stream, stats in collector.streams.items():
        if not (bool(torch.isfinite(stats.abs_sum).all()) and bool(torch.isfinite(stats.gram.diagonal()).all())):
            modules = sorted(n for n, s in collector.stream_of.items() if s == stream)
            raise PipelineError(f"non-finite activations entering {layer_name}.{stream} (input of "
                                f"{', '.join(modules)}) with the model in {str(dtype).replace('torch.', '')}: "
                                f"run with --dtype float32 or bfloat16")


def profile_model(model: torch.nn.Module, windows: torch.Tensor, device: torch.device | str,
                  path: str | None = None, meta: dict | None = None,
                  gram_dtype: torch.dtype = torch.float32, fisher: bool = False, overwrite: bool = False) -> Statistics:
    """Step 1: Gram / |x| statistics of every distinct input of every target linear, layer by
    layer. Written atomically to `path` when given (layer i's file is written in the background
    while layer i+1 runs), else kept in memory. `meta` adds fields (data set, seed) to meta.json.
    Grams are summed in float64 and stored in `gram_dtype` (float32 halves the files; float64
    for exact checks). fisher: also ASVD's fisher information (utils.fisher), on the same
    windows, stored beside them (FISHER_FILE, meta["fisher"]). A run killed while writing `path`
    is continued by the next one with the same model, windows and options from its first layer
    not written (the earlier layers are only run, for their outputs); other inputs are refused
    unless `overwrite`, which starts over."""
    check_supported(model)
    model_dtype = next(model.parameters()).dtype
    streams: dict[str, dict[str, str]] = {}
    layers: dict[int, dict] = {}
    writer = ThreadPoolExecutor(max_workers=1) if path else None
    pending: list = []
    # "model" (and the other keys utils.outputs checks) mark the folder as ours for a later --overwrite
    full_meta = {"model": getattr(model.config, "_name_or_path", None) or type(model).__name__,
                 **(meta or {}), "model_description": model_description(model),
                 "weights_fingerprint": weights_fingerprint(model),
                 "layer_prefix": layer_prefix(model), "num_layers": len(decoder_layers(model)),
                 "nsamples": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
                 "tokens": int(windows.numel()), "dtype": str(model_dtype).replace("torch.", ""),
                 "gram_dtype": str(gram_dtype).replace("torch.", ""), "gram_layout": "upper", "streams": streams}

    def collect(context: LayerContext, directory: str | None) -> torch.Tensor:
        with LayerStatsCollector(target_linears(context.layer), device) as collector:
            outputs = context.run()
        _check_finite(collector, context.name, model_dtype)
        tensors = collector.tensors(gram_dtype)
        streams[str(context.index)] = collector.stream_of
        if directory is None:
            layers[context.index] = tensors
            return outputs
        if pending:  # bounds the memory held to two layers' statistics; re-raises a failed write
            pending.pop().result()
        pending.append(writer.submit(save_layer, tensors, directory, context.index, dict(streams)))
        return outputs

    def save_layer(tensors: dict, directory: str, index: int, streams_so_far: dict) -> None:
        save_file(tensors, os.path.join(directory, f"layer_{index:04d}.safetensors"))
        write_progress(directory, "stats", identity, index + 1, {"streams": streams_so_far})

    def collect_fisher(scratch_dir: str | None = None) -> dict[str, torch.Tensor] | None:
        if not fisher:
            return None
        from utils.fisher import fisher_information
        start = time.perf_counter()
        values, summary = fisher_information(model, windows, device, scratch_dir=scratch_dir)
        full_meta["fisher"] = {**summary, "seconds": round(time.perf_counter() - start, 3)}
        return values

    if path is None:
        walk_layers(model, windows, device, lambda c: collect(c, None), desc="profile", changes_weights=False)
        return Statistics(full_meta, layers=layers, fisher=collect_fisher())
    identity = {"model weights": full_meta["weights_fingerprint"]["sha1"], "dtype": full_meta["dtype"],
                "calibration windows": tensors_digest({"windows": windows}), "options": _json_digest(
                    {k: v for k, v in full_meta.items() if k not in ("weights_fingerprint", "streams")}),
                "fisher": fisher, "device": str(torch.device(device))}
    with atomic_path(path, adopt=resumable("stats", identity, overwrite)) as temporary:
        progress = read_progress(temporary) if os.path.isdir(temporary) else None
        if progress is None:
            os.makedirs(temporary, exist_ok=True)
        else:
            streams.update(progress["state"]["streams"])
            print(f"resuming: {progress['layers_done']} of {full_meta['num_layers']} layers were profiled by an "
                  f"interrupted run ({temporary})")
        try:
            walk_layers(model, windows, device, lambda c: collect(c, temporary), desc="profile", changes_weights=False,
                        start=progress["layers_done"] if progress else 0)
            for future in pending:
                future.result()
        finally:
            writer.shutdown(wait=True)
        # the layers' inputs meanwhile go beside the statistics: the disk the user chose for them
        fisher_values = collect_fisher(temporary)
        if fisher_values is not None:
            save_file(fisher_values, os.path.join(temporary, FISHER_FILE))
        write_json(os.path.join(temporary, STATS_META), full_meta)
        os.remove(os.path.join(temporary, "progress.json"))
    return Statistics.open(path)


# ---------------------------------------------------------------------------------------- step 3

@dataclass
class CompressOptions:
    """Step 3's passes, by the options that configure them (methods.registry composes them from the
    CLI's flags). extra: the options of further methods (a methods.registry.MethodOptions each, keyed
    by its slot in the record), whose passes run after these."""
    decompose: DecomposeOptions = field(default_factory=DecomposeOptions)
    update: UpdateOptions | AnchoredOptions | None = None  # None: no closed-form update / anchored fit
    refine: RefineOptions | None = None  # None: no gradient refinement (after the update, per layer)
    extra: tuple[MethodOptions, ...] = ()

    @classmethod
    def of(cls, chosen: list[MethodOptions]) -> "CompressOptions":
        """From the chosen methods' options (methods.registry.Registry.options), each in its slot."""
        own = {"decompose", "update", "refine"}
        return cls(**{o.slot: o for o in chosen if o.slot in own},
                   extra=tuple(o for o in chosen if o.slot not in own))

    def chosen(self) -> list[MethodOptions]:
        """The options of every pass, in walk order."""
        return [o for o in (self.decompose, self.update, self.refine, *self.extra) if o is not None]

    def to_dict(self) -> dict:
        return {**self.decompose.to_dict(), "update": self.update.to_dict() if self.update else None,
                "refine": self.refine.to_dict() if self.refine else None,
                **{o.slot: o.to_dict() for o in self.extra}}

    @property
    def nsamples(self) -> int:
        """Calibration windows the walk carries: the most any pass uses (0: none)."""
        return max([0] + [o.windows_needed for o in self.chosen()])

    def heldout_positions(self) -> list[int]:
        """Positions, among the carried windows, of those a pass only measures on: the update's held-out
        windows and the refinement's --refine_holdout ones (utils.data.calibration_windows_with_heldout
        draws them apart from the windows that were fitted on)."""
        held: set[int] = set()
        for options in self.chosen():
            held.update(options.heldout_positions())
        return sorted(held)


def _json_digest(data) -> str:
    import hashlib
    import json
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def compress_identity(model: torch.nn.Module, plan: Plan, options: CompressOptions, device: torch.device | str,
                      stats: Statistics | None = None, windows: torch.Tensor | None = None) -> dict:
    """What a resumed step 3 must share with the run it continues, by name (digests): the weights,
    their dtype, the plan, the options, the statistics, the carried windows and the device (whose
    arithmetic the finished layers carry)."""
    fingerprint = weights_fingerprint(model)
    carried = windows[:options.nsamples] if windows is not None and options.nsamples else None
    return {"model weights": fingerprint["sha1"], "dtype": fingerprint["dtype"], "plan": _json_digest(plan.to_dict()),
            "options": _json_digest(options.to_dict()),
            "statistics": None if stats is None else _json_digest(stats.meta),
            "calibration windows": None if carried is None else tensors_digest({"windows": carried}),
            "device": str(torch.device(device))}


def quantize_identity(model: torch.nn.Module, options, device: torch.device | str,
                      windows: torch.Tensor | None = None) -> dict:
    """What a step 8 written layer by layer is made of, by name (digests): the weights, their dtype,
    the options, the calibration windows and the device."""
    fingerprint = weights_fingerprint(model)
    return {"model weights": fingerprint["sha1"], "dtype": fingerprint["dtype"],
            "quantization options": _json_digest(options.to_dict()),
            "calibration windows": None if windows is None else tensors_digest({"windows": windows}),
            "device": str(torch.device(device))}


def _replay_layer(layer: torch.nn.Module, name: str, tensors: dict[str, torch.Tensor], records: dict) -> None:
    """Put a layer that an interrupted run finished back in its compressed form: its recorded
    modules made low-rank (or column-preserved) and every tensor the run wrote for it assigned."""
    from component import ColumnPreservedLinear, LowRankLinear
    for local, linear in target_linears(layer).items():
        record = records.get(f"{name}.{local}")
        if not record or "rank" not in record:
            continue
        with torch.device("meta"):
            if record.get("columns_kept"):
                module = ColumnPreservedLinear(linear.in_features, linear.out_features, int(record["rank"]),
                                               int(record["columns_kept"]), bias=linear.bias is not None,
                                               dtype=linear.weight.dtype)
            else:
                module = LowRankLinear(linear.in_features, linear.out_features, int(record["rank"]),
                                       bias=linear.bias is not None, dtype=linear.weight.dtype)
        set_submodule(layer, local, module)
    _assign_written(layer, name, tensors)


def _assign_written(layer: torch.nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """The tensors an interrupted run wrote for layer `name` put in place of its (rebuilt) modules'
    ones, after checking they are exactly its tensors, of its shapes."""
    from utils.model import _assign
    local_tensors = {key[len(name) + 1:]: tensor for key, tensor in tensors.items()}
    expected = layer.state_dict()
    if set(local_tensors) != set(expected) or any(tuple(local_tensors[k].shape) != tuple(expected[k].shape)
                                                  for k in expected):
        raise PipelineError(f"cannot resume: the tensors the interrupted run wrote for {name} do not match its "
                            f"records; rerun with --overwrite")
    # shards written in a save dtype (--save_dtype, a de-quantised GGUF) compute in the model's own again
    # (a quantized layer's codes are integers, and its scales keep the dtype they were written in)
    _assign(layer, {k: t.to(expected[k].dtype) if t.is_floating_point() and expected[k].is_floating_point() else t
                    for k, t in local_tensors.items()})


def _replay_quantized(layer: torch.nn.Module, name: str, tensors: dict[str, torch.Tensor], records: dict) -> None:
    """Put a layer that an interrupted step 8 finished back in its quantized form: every recorded
    linear made a QuantLinear and every tensor the run wrote for it assigned."""
    from utils.io import quant_linear_for
    dtype = next(layer.parameters()).dtype
    for qualified, record in records.items():
        if qualified.startswith(f"{name}."):
            with torch.device("meta"):
                module = quant_linear_for(layer, qualified[len(name) + 1:], record, dtype, type(layer).__name__)
            set_submodule(layer, qualified[len(name) + 1:], module)
    _assign_written(layer, name, tensors)


def compress_model(model: torch.nn.Module, plan: Plan, options: CompressOptions, device: torch.device | str,
                   stats: Statistics | None = None, windows: torch.Tensor | None = None,
                   force_stats: bool = False, writer=None) -> dict:
    """Step 3: apply `plan` to `model` in place, layer by layer, and return the record of what was
    done (the plan, per-module truncation losses, update errors and fallbacks, parameter counts).

    stats: step 1's statistics (needed unless whitening is 'none'); windows: the calibration
    windows carried through the walk when a pass needs activations (the update: its nsamples).
    force_stats: use statistics collected on other weights of the same architecture, with a
    warning (Statistics.check_model). writer: a utils.io.ShardedModelWriter; each layer is written
    to it when done, and the layers an interrupted run wrote to it are taken from it instead of
    being compressed again (with activations, they are run from the written tensors)."""
    check_supported(model)
    plan.validate(target_shapes(model))
    if stats is not None:
        stats.check_model(model, force_stats)
    params_before = count_parameters(model)
    records: dict[str, dict] = {}
    layer_records: dict[str, dict] = {}
    chosen = options.chosen()
    if options.nsamples:
        if windows is None or windows.shape[0] < options.nsamples:
            what = " and ".join(o.role for o in chosen if o.windows_needed)
            raise PipelineError(f"{what} needs {options.nsamples} calibration windows, "
                                f"got {0 if windows is None else windows.shape[0]}")
        windows = windows[:options.nsamples]
    passes = [o.make_pass(PassInputs(plan, stats, records, layer_records)) for o in chosen]
    needs_activations = any(p.needs_activations for p in passes)
    needs_reference = any(p.needs_reference for p in passes)
    keep_original_weights = any(getattr(p, "reads_original_weights", False) for p in passes)

    def apply(context: LayerContext) -> None:
        context.scratch["keep_original_weights"] = keep_original_weights
        for compression_pass in passes:
            compression_pass(context)

    prefix, generator = layer_prefix(model), passes[0].generator
    start_layer, finished, replay = 0, None, None
    if writer is not None:
        if writer.state is not None:  # an interrupted run's layers: its records and where its random stream was
            start_layer = writer.layers_done
            records.update(writer.state["records"])
            layer_records.update(writer.state["layer_records"])
            generator.set_state(torch.tensor(writer.state["generator"], dtype=torch.uint8))

        def finished(index: int, layer: torch.nn.Module) -> None:
            writer.write_layer(index, layer.state_dict(prefix=f"{prefix}.{index}."),
                               {"records": records, "layer_records": layer_records,
                                "generator": generator.get_state().tolist()})

        def replay(context: LayerContext) -> None:
            _replay_layer(decoder_layers(model)[context.index], context.name, writer.layer_tensors(context.index),
                          records)

    start = time.perf_counter()
    walk_layers(model, windows if needs_activations else None, device, apply,
                desc="compress" + "".join(f"+{o.walk_label}" for o in chosen if o.walk_label),
                reference=needs_reference,
                finished=finished, start=start_layer, replay=replay)
    seconds = time.perf_counter() - start
    params_after = count_parameters(model)
    # fields of every record (None where their method did not run), then what the chosen passes add
    method_fields = Registry.builtin().record_defaults()
    for chosen_options in chosen:
        method_fields.update(chosen_options.record_fields(records, layer_records))
    return {
        # the rank of every low-rank module as built (a column-preserved one traded some of the plan's)
        "plan": plan.to_dict(), "ranks": {n: records.get(n, {}).get("rank", r) for n, r in plan.ranks.items()},
        "dense_modules": plan.dense_modules,
        **options.to_dict(),
        # modules that traded rank for exact input columns: the loaders build a ColumnPreservedLinear
        "column_preserved": {name: {"rank": r["rank"], "columns": r["columns_kept"]}
                             for name, r in records.items() if r.get("columns_kept")},
        "modules": records,
        "fallbacks": sum(bool(r.get("whitening_fallback")) for r in records.values()),
        "svd_driver_fallbacks": sum(bool(r.get("svd_driver_fallback")) for r in records.values()),
        **method_fields,
        "parameters": {"original": params_before, "compressed": params_after,
                       "removed_fraction": round(1 - params_after / params_before, 6),
                       "target_matrices": plan.summary(params_before)},
        "seconds": round(seconds, 3),
    }


def compression_block(record: dict, base_model: str, model: torch.nn.Module, stats: Statistics | None = None,
                      seed: int = 0, num_layers: int | None = None, plan_source: str | None = None,
                      random_weights: bool = False, heldout_windows: dict | None = None,
                      registry: Registry | None = None) -> dict:
    """The "compression" block saved with a model: compress_model's record plus what the model was
    made from (base model, calibration, seed, dtype, how the held-out windows were drawn), which
    loading and evaluation read. registry: the methods that name what was done (default: the built-in ones)."""
    calibration = None if stats is None else {k: stats.meta.get(k) for k in ("dataset", "nsamples", "seq_len", "seed",
                                                                              "tokens", "data")}
    update = record.get("update")
    return {"format_version": 1, "base_model": base_model, "base_model_source": source_description(base_model),
            "method": (registry or Registry.builtin()).method_name(record),  # svd-llm+closed_form, ... (their labels)
            "ratio": record["plan"]["ratio"], "plan_source": plan_source, **record,
            "updating_nsamples": update["nsamples"] if update else 0,
            "calibration": calibration, "heldout_windows": heldout_windows, "seed": seed,
            "dtype": dtype_name(next(model.parameters()).dtype), "random_weights": random_weights,
            "num_layers": num_layers}  # None: all of the base model's decoder layers were kept


# ---------------------------------------------------------------------------------------- step 8

def uncompressed_block(base_model: str, model: torch.nn.Module, seed: int = 0, num_layers: int | None = None,
                       random_weights: bool = False) -> dict:
    """The compression block of a model no low-rank step changed (empty ranks map): what step 8
    starts from when it quantizes the original model, so the result loads like any compressed one."""
    params = count_parameters(model)
    return {"format_version": 1, "base_model": base_model, "base_model_source": source_description(base_model),
            "method": "none", "ratio": None, "plan_source": None,
            "plan": None, "ranks": {}, "dense_modules": list(target_shapes(model)), "modules": {},
            "parameters": {"original": params, "compressed": params, "removed_fraction": 0.0},
            "calibration": None, "seed": seed, "dtype": dtype_name(next(model.parameters()).dtype),
            "random_weights": random_weights, "num_layers": num_layers}


def linear_units(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every linear of the decoder layers as stored: nn.Linear, QuantLinear, LowRankLinear or
    ColumnPreservedLinear (whose factors, kept columns and indices belong to it), by qualified name."""
    from utils.model import layer_linear_units
    return layer_linear_units(model)


def linear_storage(model: torch.nn.Module, tensor_bytes: dict[str, int] | None = None) -> dict:
    """Bytes of every tensor the decoder layers' linears store (codes, scales, zeros, g_idx, factors,
    biases), next to the same matrices dense in float16, and bits per weight of the original
    matrices (out x in each). `tensor_bytes`: name -> bytes as stored in a file
    (utils.io.safetensors_tensor_bytes); default: the bytes of the model's own tensors, which is
    what safetensors writes for them."""
    weights = dense_bias = stored = 0
    for name, module in linear_units(model).items():
        weights += module.in_features * module.out_features
        bias = module.u.bias if hasattr(module, "u") else module.bias
        dense_bias += 0 if bias is None else bias.numel()
        for key, tensor in module.state_dict(prefix=name + ".").items():
            stored += tensor_bytes[key] if tensor_bytes is not None else tensor.numel() * tensor.element_size()
    fp16 = 2 * (weights + dense_bias)
    return {"linear_bytes": stored, "fp16_bytes": fp16, "fraction_of_fp16": round(stored / fp16, 6) if fp16 else None,
            "bits_per_weight": round(8 * stored / weights, 4) if weights else None, "weights": weights,
            "source": "file" if tensor_bytes is not None else "model tensors"}


def quantize_model(model: torch.nn.Module, options, device: torch.device | str,
                   windows: torch.Tensor | None = None, calibration: dict | None = None, writer=None) -> dict:
    """Step 8: quantize every linear of the decoder layers in place (methods.quantize), layer by
    layer, and return the "quantization" section of the compression block: the options, the
    calibration, per-module bits / group size / GPTQ loss, the storage layout and its bytes.

    windows: the calibration windows (GPTQ needs them; RTN none). calibration: what they are
    (dataset, seed), recorded beside their count and length. writer: a utils.io.ShardedModelWriter
    each layer is written to when done (a streamed model's layers go back to disk after); its
    floating parameters in the writer's dtype, the quantized layers' codes, scales and zeros as
    they are (what save_compressed writes). The layers an interrupted run wrote to it are taken
    from it (with calibration windows, run from the written tensors) instead of quantized again."""
    from component.quant_linear import QuantLinear
    from methods.quantize import Quantize
    check_supported(model)
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise PipelineError("the model is already quantized; step 8 starts from a float model "
                            "(the original, or the output of step 3)")
    if options.needs_activations:
        if windows is None or windows.shape[0] == 0:
            raise PipelineError("GPTQ needs calibration windows (--nsamples of --dataset)")
        calibration = {**(calibration or {}), "nsamples": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
                       "tokens": int(windows.numel())}
    else:
        windows, calibration = None, None
    records: dict[str, dict] = {}
    quantize = Quantize(options, records)
    start_layer, finished, replay = 0, None, None
    if writer is not None:
        prefix = layer_prefix(model)
        if writer.state is not None:  # an interrupted run's layers: their records; the tensors are in its shards
            start_layer = writer.layers_done
            records.update(writer.state["records"])

        def finished(index: int, layer: torch.nn.Module) -> None:
            from component.low_rank_linear import unshare_inputs
            from utils.model import cast_parameters
            unshare_inputs(layer)  # fused v factors share one storage, which safetensors refuses
            if writer.dtype is not None:  # as save_compressed casts: the quantized layers' tensors stay as they are
                cast_parameters(layer, writer.dtype)
            writer.write_layer(index, layer.state_dict(prefix=f"{prefix}.{index}."), {"records": records}, cast=False)

        def replay(context: LayerContext) -> None:
            _replay_quantized(decoder_layers(model)[context.index], context.name,
                              writer.layer_tensors(context.index), records)

    start = time.perf_counter()
    walk_layers(model, windows, device, quantize, desc=f"quantize ({options.method} {options.wbits}-bit)",
                finished=finished, start=start_layer, replay=replay)
    seconds = time.perf_counter() - start
    fallbacks = sum("fallback" in r for r in records.values())
    losses = [r["relative_loss"] for r in records.values() if r.get("relative_loss") is not None]
    return {**options.to_dict(), "calibration": calibration,
            "storage": {"codes": "uint8 qweight, rows packed LSB-first (gptq/pack.py)",
                        "scales": "float16", "zeros": "float16", "g_idx": "int32 (act_order with groups only)",
                        "dequantize": "per forward (component/quant_linear.py)"},
            "modules": records, "quantized_matrices": len(records), "rtn_fallbacks": fallbacks,
            "mean_relative_loss": round(sum(losses) / len(losses), 6) if losses else None,
            "linear_storage": linear_storage(model), "seconds": round(seconds, 3)}
