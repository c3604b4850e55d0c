#!/usr/bin/env python
"""Scale benchmark (issue 10): how long does whitening + decomposition of a 7B model take, and
how much memory does it need?

    # the issue's setting (one GPU): llama2-7b preset, fp16, 64 x 2048 windows, ratio 0.2
    python scripts/bench_scale.py --device cuda --dtype float16 --nsamples 64 --seq_len 2048
    # a figure without a GPU: the first decoder layer only, 8 x 512 windows, fp32
    python scripts/bench_scale.py --device cpu --dtype float32 --num_layers 1 --nsamples 8 --seq_len 512
    # SVD driver accuracy on real whitened matrices (SmolLM2's W S), against float64
    python scripts/bench_scale.py --device cuda --model smollm2-135m --dataset pydoc --dtype float32 \
        --nsamples 64 --seq_len 2048 --check_matrices 12

Stages, in one process, on the same calibration windows:
  load       build the model on the CPU (random:NAME: seeded random weights, utils/presets.py)
  warmup     one window through every layer (CUDA initialisation; not counted anywhere)
  forward    one plain forward pass, layer by layer with the pipeline's own walker
             (utils/layerwise.walk_layers: capture, then each layer moved to the device and run;
             its CPU tensors are put back, no copy) and no hooks: the fair baseline for
             profiling, which is the same walk with the statistics hooks
  profile    step 1 (pipeline.steps.profile_model): Grams of every distinct linear input, written to disk
  check      truncation error of the chosen SVD path vs float64 on a sample of whitened matrices
             W S (not counted in the totals)
  compress   step 3 (pipeline.steps.compress_model), then utils.io.save_compressed; the two are
             timed apart (results decompose_s, save_s):
    decompose  read statistics, Cholesky per distinct Gram, W S, SVD, triangular solve, module swap
    save       the write of the compressed model
total_s = profile_s + decompose_s (the work the issue's targets are about: no model load, no save).

The per-stage breakdown wraps the functions the pipeline calls (utils.layerwise, utils.stats,
pipeline.steps's save_file / load_file, methods.decompose's input_transform / low_rank_factors,
utils.decompose's SVD, utils.io.save_compressed) with timers that synchronise the device on
entry and exit (Gram products, whitening factors, SVDs, statistics I/O); --no_breakdown times
the totals without those extra synchronisations.

Writes one JSON (default scripts/results/bench_scale_<device>_<model>_<layers>L_<N>x<L>_<dtype>.json),
first after every stage with "partial": true (so a run stopped by a time limit keeps the stages it
finished), then complete with "partial": false.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from utils.measure import peak_rss_bytes, rss_bytes, synchronize  # noqa: E402
from utils.model import default_device  # noqa: E402
from utils.presets import is_random_spec  # noqa: E402
from utils.stats import saved_gram  # noqa: E402

GIB = 1024 ** 3
TARGETS = {  # issue 10, one GPU, llama2-7b preset, fp16, 64 x 2048, ratio 0.2
    "profile_over_forward": 3.0, "decompose_s": 45.0, "total_s": 60.0, "peak_gpu_gib": 6.0}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:llama2-7b", help="a random:PRESET or any --model of compress.py")
    p.add_argument("--num_layers", type=int, default=None, help="keep only the first N decoder layers")
    p.add_argument("--dtype", default="float16", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype the model runs in (auto: the checkpoint's own; a random preset: float16)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dataset", default="random", help="calibration data (random for presets)")
    p.add_argument("--nsamples", type=int, default=64, help="calibration windows")
    p.add_argument("--seq_len", type=int, default=2048, help="tokens per window")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--whitening", default="cholesky", choices=["cholesky", "eigen", "none"])
    p.add_argument("--decomposition", default="svd", choices=["svd", "rsvd"])
    p.add_argument("--svd_dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check_matrices", type=int, default=4,
                   help="whitened matrices whose truncation error is checked against float64 (0: none)")
    p.add_argument("--work_dir", default=None, help="where statistics and the model are written "
                                                    "(default: a temporary directory, removed afterwards)")
    p.add_argument("--keep_outputs", action="store_true", help="keep the statistics and compressed model")
    p.add_argument("--no_breakdown", action="store_true", help="no per-stage timers (no extra syncs)")
    p.add_argument("--out", default=None, help="results JSON (default under scripts/results/)")
    return p


# ------------------------------------------------------------------------------------ helpers

def _rss_gib() -> dict:
    return {"peak_rss_gib": round(peak_rss_bytes() / GIB, 3), "rss_gib": round(rss_bytes() / GIB, 3)}


class StageMeter:
    """Wall time (device synchronised), peak GPU memory and RSS of one named stage."""

    def __init__(self, device: str):
        self.device, self.stages = device, {}

    def run(self, name: str, fn, *args, **kwargs):
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        synchronize(self.device)
        record = {"seconds": round(time.perf_counter() - start, 3), **_rss_gib()}
        if cuda:
            record["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(self.device) / GIB, 3)
            record["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved(self.device) / GIB, 3)
        self.stages[name] = record
        return result


class Breakdown:
    """Accumulates time per wrapped function; patches module attributes, restores on exit."""

    def __init__(self, device: str, enabled: bool):
        self.device, self.enabled = device, enabled
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.svd_drivers: dict[str, int] = defaultdict(int)
        self.svd_residual_max: float | None = None
        self._patches: list[tuple[object, str, object]] = []

    def wrap(self, owner, attr: str, key: str, after=None, sync: bool = True, before=None) -> None:
        """Time owner.attr under `key` (device-synchronised unless sync=False); `before` runs first
        on every call, even with the timers off (--no_breakdown)."""
        if not self.enabled and before is None:
            return
        original = getattr(owner, attr)
        timing = self.enabled

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if before is not None:
                before()
            if not timing:
                return original(*args, **kwargs)
            if sync:
                synchronize(self.device)
            start = time.perf_counter()
            result = original(*args, **kwargs)
            if sync:
                synchronize(self.device)
            self.seconds[key] += time.perf_counter() - start
            self.calls[key] += 1
            if after is not None:
                after(args, kwargs, result)
            return result

        self._patches.append((owner, attr, original))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, original in reversed(self._patches):
            setattr(owner, attr, original)
        self._patches.clear()

    def note_svd(self, args, kwargs, result) -> None:
        info = kwargs.get("info") if "info" in kwargs else (args[3] if len(args) > 3 else None)
        if info is not None:
            self.svd_drivers[info.driver + ("(fallback)" if info.fallback else "")] += 1
            if info.residual is not None and math.isfinite(info.residual):
                self.svd_residual_max = max(self.svd_residual_max or 0.0, info.residual)

    def table(self) -> dict:
        return {key: {"seconds": round(value, 3), "calls": self.calls[key]} for key, value in self.seconds.items()}


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as handle:
            found = re.search(r"model name\s*:\s*(.+)", handle.read())
            model = found.group(1).strip() if found else model
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def _dir_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _default_out(options: argparse.Namespace, layers: int) -> str:
    where = (_device_name(options.device) if options.device.startswith("cuda")
             else f"cpu-{os.cpu_count()}cores")
    return os.path.join(ROOT, "scripts", "results",
                        f"bench_scale_{_slug(where)}_{_slug(options.model.replace('random:', ''))}_{layers}L_"
                        f"{options.nsamples}x{options.seq_len}_{options.dtype}.json")


def _finite(value):
    """The record with every non-finite float (a failed SVD's residual is inf) as null: strict JSON."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json(path: str, record: dict) -> None:
    """Atomic: a reader (or a run killed by a time limit) never sees a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".partial-write", "w", encoding="utf-8") as handle:
        json.dump(_finite(record), handle, indent=2, allow_nan=False)
        handle.write("\n")
    os.replace(path + ".partial-write", path)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ------------------------------------------------------------------------- truncation check

def _sample_matrices(model, stats_meta: dict, count: int) -> list[tuple[int, str]]:
    """One matrix per distinct input stream of the first layer, then of the last, then the rest."""
    from utils.model import decoder_layers, target_linears
    layers = decoder_layers(model)
    reps: list[tuple[int, str]] = []
    rest: list[tuple[int, str]] = []
    for index in dict.fromkeys((0, len(layers) - 1)):
        names = list(target_linears(layers[index]))
        streams = stats_meta["streams"][str(index)] if stats_meta else {n: n for n in names}
        seen: set = set()
        for name in names:
            (rest if streams[name] in seen else reps).append((index, name))
            seen.add(streams[name])
    return (reps + rest)[:count]


@torch.no_grad()
def truncation_check(model, args, stats_path: str | None, count: int) -> dict:
    """||A - A_r|| of the chosen SVD path (svd_dtype, driver auto) vs the float64 optimum, A = W S."""
    from safetensors.torch import load_file
    from utils.decompose import SVDInfo, exact_svd
    from utils.model import decoder_layers, target_linears
    from pipeline.steps import Statistics
    from utils.plan import rank_for_ratio
    from utils.whitening import whitening_factor
    meta = None
    if args.whitening != "none":
        opened = Statistics.open(stats_path)
        meta = opened.meta
        opened.close()
    layers = decoder_layers(model)
    dtype = torch.float64 if args.svd_dtype == "float64" else torch.float32
    rows = []
    for index, name in _sample_matrices(model, meta, count):
        weight = target_linears(layers[index])[name].weight.detach().to(args.device)
        rank = rank_for_ratio(weight.shape[0], weight.shape[1], args.ratio)
        if rank is None:
            continue
        row = {"matrix": f"layer {index} {name}", "shape": list(weight.shape), "rank": rank}
        if meta is not None:
            tensors = load_file(os.path.join(stats_path, f"layer_{index:04d}.safetensors"))
            stream = meta["streams"][str(index)][name]
            factor = whitening_factor(saved_gram(tensors, stream, args.device), args.whitening)
            row["whitening_fallback"] = factor.fallback
            target = factor.right_multiply(weight)
        else:
            target = weight.to(torch.float64)
        synchronize(args.device)
        start = time.perf_counter()
        s64 = torch.linalg.svdvals(target)
        synchronize(args.device)
        row["float64_svdvals_s"] = round(time.perf_counter() - start, 3)
        optimum = float(s64[rank:].square().sum().sqrt())
        drivers = ["auto"] + (["default"] if args.device.startswith("cuda") else [])
        for driver in drivers:
            info = SVDInfo()
            low = target.to(dtype)
            synchronize(args.device)
            start = time.perf_counter()
            u, sigma, vh = exact_svd(low, rank, driver, info)
            synchronize(args.device)
            seconds = time.perf_counter() - start
            error = float(torch.linalg.matrix_norm(target - (u.double() * sigma.double()) @ vh.double()))
            key = "chosen" if driver == "auto" else "default_driver"
            row[key] = {"driver": info.driver, "fallback": info.fallback, "residual": info.residual,
                        "svd_s": round(seconds, 3), "truncation_error": error}
            del u, sigma, vh, low
        row["optimal_truncation_error"] = optimum
        row["relative_truncation_error"] = optimum / max(float(s64.square().sum().sqrt()), 1e-300)
        row["excess_vs_float64"] = row["chosen"]["truncation_error"] / max(optimum, 1e-300) - 1.0
        rows.append(row)
        del target, s64
    return {"svd_dtype": args.svd_dtype, "whitening": args.whitening,
            "note": "excess = ||A - U_r S_r V_r^T||_F / sqrt(sum_{i>r} s_i(A)^2) - 1, all in float64, "
                    "A = W S (whitened), s_i from a float64 SVD",
            "max_excess": max((r["excess_vs_float64"] for r in rows), default=None),
            "matrices": rows}


# ------------------------------------------------------------------------------------- main

def _validate(options: argparse.Namespace) -> None:
    """The checks compress.py's validation made for this benchmark's settings, before anything slow."""
    from utils.data import validate_dataset
    if not 0.0 < options.ratio < 1.0:
        raise SystemExit(f"error: --ratio {options.ratio}: must be in (0, 1)")
    for name in ("nsamples", "seq_len"):
        if getattr(options, name) < 1:
            raise SystemExit(f"error: --{name} must be at least 1")
    if options.num_layers is not None and options.num_layers < 1:
        raise SystemExit(f"error: --num_layers {options.num_layers}: must be at least 1")
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {options.device}: no CUDA device here; use --device cpu")
    if options.device != "cpu" and not options.device.startswith("cuda"):
        raise SystemExit(f"error: --device {options.device}: use cpu, cuda or cuda:N")
    validate_dataset(options.dataset)


def main(argv: list[str] | None = None) -> dict:
    options = build_parser().parse_args(argv)
    if options.device is None:
        options.device = default_device()
    _validate(options)
    import utils.io as io_module
    from methods import DecomposeOptions
    import methods.decompose as decompose_pass
    from utils import decompose, layerwise, stats as stats_module
    from pipeline import steps as pipeline
    from utils.data import calibration_windows
    from utils.model import DTYPES, count_parameters, decoder_layers, load_model, target_shapes
    from utils.plan import Plan

    work = options.work_dir or tempfile.mkdtemp(prefix="bench_scale_")
    os.makedirs(work, exist_ok=True)
    save_path = os.path.join(work, "compressed")
    stats_path = os.path.join(work, "stats")

    meter = StageMeter(options.device)
    breakdown = Breakdown(options.device, not options.no_breakdown)
    timings: dict = {}  # what compress.py's steps report as session timings
    loaded: dict = {}
    out = options.out
    tables: dict[str, dict] = {}

    def checkpoint() -> None:
        """Stages done so far, so that a run stopped by a time limit still leaves its figures."""
        _write_json(out, {"benchmark": "bench_scale (issue 10)", "partial": True,
                          "completed_stages": list(meter.stages), "command": "python scripts/bench_scale.py "
                          + " ".join(argv if argv is not None else sys.argv[1:]),
                          "device_name": _device_name(options.device), "git_commit": _git_commit(),
                          "random_weights": is_random_spec(options.model),
                          "stages": meter.stages, "session_timings": timings, "breakdown": tables})

    def load() -> None:
        start = time.perf_counter()
        loaded["model"], loaded["tokenizer"] = load_model(options.model, options.dtype, options.seed,
                                                          options.num_layers)
        timings["load_s"] = round(time.perf_counter() - start, 3)

    def profile(windows) -> None:
        start = time.perf_counter()
        stats = pipeline.profile_model(model, windows, options.device, stats_path,
                                       meta={"model": options.model, "dataset": options.dataset,
                                             "seed": options.seed})
        stats.close()
        timings["profile_s"] = round(time.perf_counter() - start, 3)

    def compress_and_save() -> dict:
        """Step 3 as compress.py runs it: compress_model (timed: compress_s), then save (save_s)."""
        plan = Plan.uniform(target_shapes(model), options.ratio)
        compress_options = pipeline.CompressOptions(DecomposeOptions(
            options.whitening, options.decomposition, DTYPES[options.svd_dtype], seed=options.seed))
        stats = pipeline.Statistics.open(stats_path) if options.whitening != "none" else None
        try:
            record = pipeline.compress_model(model, plan, compress_options, options.device, stats)
        finally:
            if stats is not None:
                timings["stats_wait_s"] = round(stats.wait_s, 3)
                stats.close()
        timings["compress_s"] = record.pop("seconds")
        compression = pipeline.compression_block(record, options.model, model, stats, options.seed, options.num_layers,
                                                 random_weights=is_random_spec(options.model))
        start = time.perf_counter()
        io_module.save_compressed(model, loaded["tokenizer"], save_path, compression, overwrite=True)  # its work folder
        timings["save_s"] = round(time.perf_counter() - start, 3)
        return compression

    try:
        meter.run("load", load)
        model = loaded["model"]
        out = out or _default_out(options, len(decoder_layers(model)))
        checkpoint()
        windows = calibration_windows(options.dataset, loaded["tokenizer"], options.nsamples, options.seq_len,
                                      options.seed, vocab_size=model.config.vocab_size)

        # one window through every layer first: CUDA context, cuBLAS handles and kernel loading
        # would otherwise be charged to the forward baseline and flatter profile / forward
        # (fn returns None: the walk runs the layer, no hooks)
        meter.run("warmup", layerwise.walk_layers, model, windows[:1], options.device,
                  lambda context: None, "warm-up", changes_weights=False)
        breakdown.wrap(layerwise, "capture_layer_inputs", "capture layer-0 inputs")
        breakdown.wrap(layerwise, "run_layer", "layer forward (incl. hooks in profile)")
        meter.run("forward", layerwise.walk_layers, model, windows, options.device,
                  lambda context: None, "forward", changes_weights=False)
        forward_breakdown = tables["forward"] = breakdown.table()
        checkpoint()
        breakdown.seconds.clear()
        breakdown.calls.clear()

        breakdown.wrap(stats_module, "add_batch_gram", "gram products")
        breakdown.wrap(pipeline, "save_file", "statistics save (background thread)", sync=False)
        meter.run("profile", profile, windows)
        profile_breakdown = tables["profile"] = breakdown.table()
        checkpoint()
        breakdown.restore()
        breakdown.seconds.clear()
        breakdown.calls.clear()

        check = (meter.run("check", truncation_check, model, options, stats_path, options.check_matrices)
                 if options.check_matrices > 0 else None)
        tables["truncation_check"] = check
        checkpoint()

        # statistics are read in a background thread (next layer while this one is decomposed): their
        # timer must not synchronise the device; timings["stats_wait_s"] is what it cost
        breakdown.wrap(pipeline, "load_file", "statistics load (background thread)", sync=False)
        breakdown.wrap(decompose_pass, "input_transform", "whitening factor (cholesky/eigen)")
        breakdown.wrap(decompose_pass, "low_rank_factors", "low_rank_factors (W S, SVD, solve)")
        breakdown.wrap(decompose, "checked_svd", "svd (incl. gesvda residual check)", after=breakdown.note_svd)
        breakdown.wrap(decompose, "svd_residual", "gesvda residual check")
        # the decomposition's figures are on disk before the compressed model is written
        def before_save() -> None:
            tables["decompose"] = breakdown.table()
            if options.device.startswith("cuda"):  # the compress stage's peak so far (the save adds none)
                tables["decompose_peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(options.device) / GIB, 3)
            checkpoint()

        breakdown.wrap(io_module, "save_compressed", "compressed model save", before=before_save)
        params_before = count_parameters(model)
        compression = meter.run("compress", compress_and_save)
        decompose_breakdown = breakdown.table()
        breakdown.restore()
        disk = {"statistics_gib": round(_dir_bytes(stats_path) / GIB, 3),
                "compressed_model_gib": round(_dir_bytes(save_path) / GIB, 3)}
    finally:
        breakdown.restore()
        if not options.keep_outputs:
            shutil.rmtree(work, ignore_errors=True)

    stages = meter.stages
    # step 3's decomposition (compress_model) and its save are timed separately
    save_s, decompose_s = timings["save_s"], timings["compress_s"]
    forward_s, profile_s = stages["forward"]["seconds"], stages["profile"]["seconds"]
    results = {
        "load_s": stages["load"]["seconds"], "forward_s": forward_s, "profile_s": profile_s,
        "profile_over_forward": round(profile_s / max(forward_s, 1e-9), 3),
        "decompose_s": decompose_s, "stats_wait_s": timings.get("stats_wait_s"), "save_s": save_s,
        "total_s": round(profile_s + decompose_s, 3),
        "peak_rss_gib": _rss_gib()["peak_rss_gib"],
    }
    cuda = options.device.startswith("cuda")
    if cuda:
        results["peak_gpu_gib"] = max(stages[s]["peak_gpu_gib"] for s in ("forward", "profile", "compress"))
        results["peak_gpu_reserved_gib"] = max(stages[s]["peak_gpu_reserved_gib"]
                                               for s in ("forward", "profile", "compress"))
    layers = len(decoder_layers(model))
    full_7b = options.model == "random:llama2-7b" and options.num_layers is None
    targets = {}
    for key, limit in TARGETS.items():
        value = results.get(key)
        targets[key] = {"target": limit, "value": value,
                        "met": (value is not None and value <= limit) if cuda and full_7b else None}
    random_weights = is_random_spec(options.model)
    output = {
        "benchmark": "bench_scale (issue 10)", "partial": False,
        "random_weights": random_weights,
        "note": ("random-weight preset: for timing and memory only, no quality figures" if random_weights
                 else "real weights"),
        "command": "python scripts/bench_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": options.device, "device_name": _device_name(options.device),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "git_commit": _git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "settings": {"model": options.model, "num_layers": layers, "dtype": options.dtype,
                     "dataset": options.dataset, "nsamples": options.nsamples, "seq_len": options.seq_len,
                     "tokens": options.nsamples * options.seq_len, "ratio": options.ratio,
                     "whitening": options.whitening, "decomposition": options.decomposition,
                     "svd_dtype": options.svd_dtype, "seed": options.seed,
                     "parameters": params_before, "breakdown_timers": not options.no_breakdown},
        "results": results,
        "targets": {"applies_to": "random:llama2-7b, all 32 layers, one GPU, fp16, 64 x 2048, ratio 0.2 "
                                  "(met: null when this run is not that setting)", **targets},
        "forward_baseline": "layer by layer with utils/layerwise.walk_layers, no hooks (same walker and "
                            "layer moves as profiling), windows one at a time",
        "stages": stages,
        "breakdown": {"forward": forward_breakdown, "profile": profile_breakdown,
                      "decompose": decompose_breakdown},
        "svd_drivers_used": dict(breakdown.svd_drivers),
        "svd_residual_max": breakdown.svd_residual_max,
        "fallbacks_whitening": compression["fallbacks"],
        "disk": disk,
        "truncation_check": check,
    }
    _write_json(out, output)
    print(json.dumps(results, indent=2))
    if check:
        print(f"truncation check: max excess vs float64 {check['max_excess']:.2e} over "
              f"{len(check['matrices'])} matrices")
    print(f"-> {out}")
    return output


if __name__ == "__main__":
    main()
