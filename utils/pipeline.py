"""Steps 1-3 of the pipeline: profile, allocate, compress. compress.py calls one function per step.

Each step can start from the files an earlier step wrote, or take the model in memory from the
step before it (the `Session`), which is only a shortcut: the files are always written.
"""
from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from component import LowRankLinear, largest_entry_fits
from utils.data import calibration_windows
from utils.decompose import low_rank_factors, low_rank_params, rank_for_ratio
from utils.io import atomic_path, is_compressed_model, load_compressed, read_json, save_compressed, write_json
from utils.layerwise import walk_layers
from utils.model import (DTYPES, count_parameters, decoder_layers, layer_prefix, load_model,
                         model_description, set_submodule, target_linears)
from utils.presets import is_random_spec
from utils.stats import LayerStatsCollector, saved_gram
from utils.update import update_u
from utils.whitening import whitening_factor

STATS_META = "meta.json"


class PipelineError(ValueError):
    """Inputs of a step that do not fit together (message says how to fix it)."""


@dataclass
class Session:
    """What chained steps hand each other in memory."""

    model: torch.nn.Module | None = None
    tokenizer: object = None
    compression: dict | None = None  # None: the model is the original
    timings: dict = field(default_factory=dict)


def default_stats_path(save_path: str) -> str:
    if save_path.endswith(".pt"):
        return save_path[:-3] + ".stats"
    return os.path.join(save_path, "stats")


def stats_path_of(args: argparse.Namespace) -> str:
    return args.stats_path or default_stats_path(args.save_path)


def ensure_model(args: argparse.Namespace, session: Session, prefer_compressed: bool = False) -> Session:
    """Load the model the step needs unless the previous step left it in memory."""
    if session.model is not None:
        return session
    start = time.perf_counter()
    dtype = DTYPES[args.dtype]
    if prefer_compressed and getattr(args, "model_path", None):
        model, tokenizer, compression = load_compressed(args.model_path, dtype)
        if tokenizer is None:
            from utils.model import load_tokenizer, resolve_model
            tokenizer = load_tokenizer(resolve_model(compression["base_model"]))
        session.model, session.tokenizer, session.compression = model, tokenizer, compression
    else:
        session.model, session.tokenizer = load_model(args.model, dtype, args.seed, args.num_layers)
    session.timings["load_s"] = round(time.perf_counter() - start, 3)
    return session


def _windows(args: argparse.Namespace, session: Session, nsamples: int) -> torch.Tensor:
    return calibration_windows(args.dataset, session.tokenizer, nsamples, args.model_seq_len, args.seed,
                               vocab_size=session.model.config.vocab_size)


# ---------------------------------------------------------------------------------------- step 1

def profile(args: argparse.Namespace, session: Session) -> dict:
    """Step 1: per-layer input statistics of every target linear, written to --stats_path."""
    ensure_model(args, session)
    model, stats_path = session.model, stats_path_of(args)
    windows = _windows(args, session, args.whitening_nsamples)
    start = time.perf_counter()
    prefix = layer_prefix(model)
    streams: dict[str, dict[str, str]] = {}
    # one background writer: layer i's statistics go to disk while layer i+1 runs; waiting on the
    # previous write before queueing the next bounds the memory held to two layers' statistics
    writer = ThreadPoolExecutor(max_workers=1)
    pending: list = []
    with atomic_path(stats_path) as temporary:
        os.makedirs(temporary)

        def collect(index: int, layer: torch.nn.Module, run) -> torch.Tensor:
            with LayerStatsCollector(target_linears(layer), args.device) as collector:
                outputs = run()
            tensors = collector.tensors()
            if pending:
                pending.pop().result()  # re-raises a failed write
            pending.append(writer.submit(save_file, tensors,
                                         os.path.join(temporary, f"layer_{index:04d}.safetensors")))
            streams[str(index)] = collector.stream_of
            return outputs

        try:
            walk_layers(model, windows, args.device, collect, desc="profile", changes_weights=False)
            for future in pending:
                future.result()
        finally:
            writer.shutdown(wait=True)
        meta = {"model": args.model, "model_description": model_description(model),
                "layer_prefix": prefix, "num_layers": len(decoder_layers(model)),
                "dataset": args.dataset, "nsamples": args.whitening_nsamples,
                "seq_len": args.model_seq_len, "seed": args.seed, "tokens": int(windows.numel()),
                "dtype": args.dtype, "gram_dtype": "float32", "gram_layout": "upper", "streams": streams}
        write_json(os.path.join(temporary, STATS_META), meta)
    session.timings["profile_s"] = round(time.perf_counter() - start, 3)
    print(f"profile: {len(streams)} layers, {windows.numel()} tokens -> {stats_path} "
          f"({session.timings['profile_s']:.1f} s)")
    return meta


def read_stats_meta(stats_path: str) -> dict:
    path = os.path.join(stats_path, STATS_META)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no statistics in {stats_path}: run step 1 first "
                                f"(or pass --stats_path to where step 1 wrote them)")
    return read_json(path)


# ---------------------------------------------------------------------------------------- step 2

def uniform_ranks(model: torch.nn.Module, ratio: float) -> dict[str, int | None]:
    """Every target linear gets rank_for_ratio(ratio); None marks a matrix that stays dense."""
    prefix = layer_prefix(model)
    ranks: dict[str, int | None] = {}
    for index, layer in enumerate(decoder_layers(model)):
        for name, linear in target_linears(layer).items():
            ranks[f"{prefix}.{index}.{name}"] = rank_for_ratio(linear.out_features, linear.in_features, ratio)
    return ranks


def allocate(args: argparse.Namespace, session: Session) -> dict:
    """Step 2: per-matrix ranks. Uniform from --ratio for now; written to --ranks_path."""
    ensure_model(args, session)
    ranks = uniform_ranks(session.model, args.ratio)
    path = args.ranks_path or os.path.join(stats_path_of(args), f"ranks_{args.ratio:g}.json")
    write_json(path, {"allocation": "uniform", "ratio": args.ratio, "ranks": ranks})
    print(f"allocate: uniform ranks for ratio {args.ratio} -> {path}")
    return ranks


# ---------------------------------------------------------------------------------------- step 3

def _module_ranks(args: argparse.Namespace, model: torch.nn.Module) -> dict[str, int | None]:
    if args.ranks_path:
        return read_json(args.ranks_path)["ranks"]
    return uniform_ranks(model, args.ratio)


def _compress_layer(layer: torch.nn.Module, index: int, prefix: str, ranks: dict, stats: dict | None,
                    streams: dict | None, args: argparse.Namespace, generator: torch.Generator,
                    report: dict) -> dict[str, torch.Tensor]:
    """Replace the layer's target linears with LowRankLinear; return the original weights."""
    factors_of_stream: dict = {}
    originals: dict[str, torch.Tensor] = {}
    for name, linear in target_linears(layer).items():
        full = f"{prefix}.{index}.{name}"
        rank = ranks.get(full)
        if rank is None:
            report["dense"].append(full)
            continue
        whitening = None
        if args.whitening != "none":
            stream = streams[name]
            if stream not in factors_of_stream:  # q/k/v (gate/up) share one factorisation
                gram = saved_gram(stats, stream, args.device)
                factors_of_stream[stream] = whitening_factor(gram, args.whitening)
                report["fallbacks"] += int(factors_of_stream[stream].fallback)
                if factors_of_stream[stream].fallback:
                    report["fallback_streams"].append(f"{prefix}.{index}.{stream}")
            whitening = factors_of_stream[stream]
        weight = linear.weight.detach()
        factors = low_rank_factors(weight.to(args.device), rank, whitening, args.decomposition,
                                   DTYPES[args.svd_dtype], args.rsvd_oversamples, args.rsvd_n_iter,
                                   generator, svd_driver=args.svd_driver)
        if factors.svd is not None and factors.svd.fallback:
            report["svd_driver_fallbacks"] += 1
        report["truncation_loss"][full] = factors.truncation_loss
        originals[full] = weight
        bias = linear.bias.detach() if linear.bias is not None else None
        try:
            new = LowRankLinear.from_factors(factors.u, factors.v, bias, weight.dtype, weight.device)
        except ValueError as error:
            raise PipelineError(f"{full}: {error}") from None
        set_submodule(layer, name, new)
        report["ranks"][full] = rank
    return originals


def _compress_layers(model: torch.nn.Module, args: argparse.Namespace, session: Session, prefix: str,
                     ranks: dict, layer_stats, generator: torch.Generator, report: dict) -> None:
    """Decompose layer by layer; with --update, refit u on the compressed layer's real inputs."""
    if args.update == "none":
        for index, layer in enumerate(tqdm(decoder_layers(model), desc="compress")):
            stats, streams = layer_stats(index)
            _compress_layer(layer, index, prefix, ranks, stats, streams, args, generator, report)
        return
    windows = _windows(args, session, args.updating_nsamples)
    n_holdout = max(1, args.updating_nsamples // 4) if args.updating_nsamples > 1 else 0
    fit = range(0, args.updating_nsamples - n_holdout)
    holdout = range(args.updating_nsamples - n_holdout, args.updating_nsamples)

    def compress_and_update(index: int, layer: torch.nn.Module, run) -> torch.Tensor:
        stats, streams = layer_stats(index)
        originals = _compress_layer(layer, index, prefix, ranks, stats, streams, args, generator, report)
        low_rank = {n: m for n, m in layer.named_modules() if isinstance(m, LowRankLinear)}
        grams = []
        for indices in (fit, holdout):
            with LayerStatsCollector(low_rank, args.device) as collector:
                run(indices) if len(indices) else None
            grams.append(collector)
        for name, module in low_rank.items():
            full = f"{prefix}.{index}.{name}"
            gram_fit = grams[0].streams[grams[0].stream_of[name]].gram
            gram_ho = (grams[1].streams[grams[1].stream_of[name]].gram if len(holdout) else None)
            result = update_u(originals[full].to(args.device), module.u.weight.to(args.device),
                              module.v.weight.to(args.device), gram_fit, gram_ho)
            # an update the layer's dtype cannot hold (fp16 tops out at 65504) is not taken
            fits, _ = largest_entry_fits(module.u.weight.dtype, result.u)
            accepted = result.accepted and fits
            if accepted:
                module.u.weight.data.copy_(result.u.to(module.u.weight.dtype))
            report["update"][full] = {"accepted": accepted, "fits_dtype": fits,
                                      "fit_error": [result.fit_error_before, result.fit_error_after],
                                      "holdout_error": [result.holdout_error_before,
                                                        result.holdout_error_after]}
        return run()

    walk_layers(model, windows, args.device, compress_and_update, desc="compress+update")


def compress(args: argparse.Namespace, session: Session) -> dict:
    """Step 3: decompose every target linear (optionally update u) and save the model."""
    ensure_model(args, session)
    model = session.model
    params_before = count_parameters(model)
    prefix = layer_prefix(model)
    ranks = _module_ranks(args, model)
    stats_meta = None
    stats_path = stats_path_of(args)
    if args.whitening != "none":
        stats_meta = read_stats_meta(stats_path)
        described = stats_meta.get("model_description", {})
        current = model_description(model)
        mismatch = [k for k in ("model_type", "num_layers", "hidden_size", "parameters")
                    if k in described and described[k] != current[k]]
        if mismatch:
            raise PipelineError(f"statistics in {stats_path} were collected on {stats_meta['model']} "
                                f"({', '.join(f'{k} {described[k]}' for k in mismatch)}), not on this model "
                                f"({', '.join(f'{k} {current[k]}' for k in mismatch)}): rerun step 1 for it")
    report = {"ranks": {}, "dense": [], "fallbacks": 0, "svd_driver_fallbacks": 0, "fallback_streams": [],
              "truncation_loss": {}, "update": {}}
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()

    num_layers = len(decoder_layers(model))
    # layer i+1's statistics are read from disk while layer i is decomposed (at most three layers'
    # statistics in memory: i, i+1 and, briefly, i+2 being read)
    reader = ThreadPoolExecutor(max_workers=1)
    reads: dict = {}

    def read(index: int) -> dict[str, torch.Tensor]:
        return load_file(os.path.join(stats_path, f"layer_{index:04d}.safetensors"), device="cpu")

    def layer_stats(index: int):
        if stats_meta is None:
            return None, None
        future = reads.pop(index, None) or reader.submit(read, index)
        if index + 1 < num_layers:
            reads[index + 1] = reader.submit(read, index + 1)
        waited = time.perf_counter()
        stats = future.result()
        session.timings["stats_wait_s"] = round(session.timings.get("stats_wait_s", 0.0)
                                                + time.perf_counter() - waited, 3)
        return stats, stats_meta["streams"][str(index)]

    try:
        _compress_layers(model, args, session, prefix, ranks, layer_stats, generator, report)
    finally:
        for future in reads.values():
            future.cancel()
        reader.shutdown(wait=True)
    session.timings["compress_s"] = round(time.perf_counter() - start, 3)
    params_after = count_parameters(model)
    compression = {
        "format_version": 1, "base_model": args.model,
        "method": "svd-llm" if args.whitening != "none" else "svd",
        "ratio": args.ratio, "ranks": report["ranks"], "dense_modules": report["dense"],
        "whitening": args.whitening, "decomposition": args.decomposition,
        "rsvd": {"oversamples": args.rsvd_oversamples, "n_iter": args.rsvd_n_iter} if args.decomposition == "rsvd" else None,
        "svd_dtype": args.svd_dtype, "svd_driver": args.svd_driver,
        "svd_driver_fallbacks": report["svd_driver_fallbacks"], "update": args.update,
        "updating_nsamples": args.updating_nsamples if args.update != "none" else 0,
        "updates_accepted": sum(u["accepted"] for u in report["update"].values()),
        "calibration": None if stats_meta is None else {k: stats_meta[k] for k in ("dataset", "nsamples", "seq_len", "seed", "tokens")},
        "fallbacks": report["fallbacks"], "fallback_streams": report["fallback_streams"],
        "seed": args.seed, "dtype": args.dtype, "random_weights": is_random_spec(args.model),
        "num_layers": args.num_layers,  # None: all of the base model's decoder layers were kept
        "parameters": {"original": params_before, "compressed": params_after,
                       "removed_fraction": round(1 - params_after / params_before, 6)},
    }
    session.compression = compression
    start = time.perf_counter()
    save_compressed(model, session.tokenizer, args.save_path, compression)
    session.timings["save_s"] = round(time.perf_counter() - start, 3)
    _print_summary(compression, session.timings, report)
    return compression


def _print_summary(compression: dict, timings: dict, report: dict) -> None:
    ranks = list(compression["ranks"].values())
    params = compression["parameters"]
    print(f"compress: {len(ranks)} matrices low-rank (rank {min(ranks, default=0)}-{max(ranks, default=0)}), "
          f"{len(compression['dense_modules'])} dense; ratio {compression['ratio']} nominal; parameters "
          f"{params['original']:,} -> {params['compressed']:,} ({params['removed_fraction']:.1%} of the model removed)")
    if compression["update"] != "none":
        print(f"update: kept for {compression['updates_accepted']} of {len(report['update'])} matrices")
    print(f"fallbacks (H not positive definite): {compression['fallbacks']}; "
          f"times: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
