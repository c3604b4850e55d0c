"""Benchmark of the core pipeline (issue 3): speed, memory and quality of steps 1 and 3.

    python scripts/bench_core.py --out scripts/results/bench_core_smollm2_cpu.json

One process: load the model once; time one plain forward pass (model(ids) per window, no hooks)
over the calibration windows; profile once (step 1) while sampling the resident memory per
decoder layer; time the plain forward pass again (the two forward timings bracket the profile,
so machine load affects both alike); then, from the same statistics, compress a fresh copy of
the model for every variant x ratio (step 3) and measure its perplexity on a held-out slice of
the text (calibration and evaluation slices do not overlap).

All through the Python API (api.py): load_model, profile_model (statistics written once to
WORKDIR/stats), compress_model on a deepcopy of the loaded model per variant x ratio,
save_compressed (timed as save_s, then deleted), evaluater.perplexity.

Variants: svd (plain), whiten_svd, whiten_rsvd, whiten_svd_update (closed-form update of u).
Targets checked: profile + decomposition of whiten_svd at ratio 0.2 within 1.6 x one forward pass
(targets.profile_plus_decompose_over_forward, targets["target_1.6x_met"]; stated for SmolLM2-135M
with 64 x 512 windows); (profile + decomposition of whiten_svd) <= 2 x forward at every ratio;
profiling memory does not grow with the number of layers (per-layer peak RSS, its slope and spread).

A quick check that it runs (seconds, not a benchmark):
    python scripts/bench_core.py --num_layers 2 --nsamples 4 --seq_len 64 --ratios 0.2 --eval_limit 2 \
        --updating_nsamples 4 --workdir /tmp/bench_core_tiny --out /tmp/bench_core_tiny.json
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from utils.measure import peak_rss_bytes, rss_bytes  # noqa: E402
from utils.rsvd import DEFAULT_N_ITER, DEFAULT_OVERSAMPLES  # noqa: E402

VARIANTS = {
    "svd": dict(whitening="none", decomposition="svd", update="none"),
    "whiten_svd": dict(whitening="cholesky", decomposition="svd", update="none"),
    "whiten_rsvd": dict(whitening="cholesky", decomposition="rsvd", update="none"),
    "whiten_svd_update": dict(whitening="cholesky", decomposition="svd", update="closed_form"),
}
TARGET_RATIO = 1.6  # (profile + whiten_svd decomposition at ratio 0.2) / one forward pass
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "wikitext2", "wiki.valid.tokens")


def rss_mib() -> float:
    return rss_bytes() / 2**20


def max_rss_mib() -> float:
    return peak_rss_bytes() / 2**20


class LayerRss:
    """Samples RSS every 5 ms; attributes each sample to the decoder layer running at the time."""

    def __init__(self, layers):
        self.layers, self.current = layers, None
        self.per_layer: dict[int, float] = {}
        self.peak = 0.0

    def __enter__(self):
        self._handles = [layer.register_forward_pre_hook(self._pre(i)) for i, layer in enumerate(self.layers)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _pre(self, index):
        def hook(module, args):
            self.current = index
        return hook

    def _sample(self):
        while not self._stop.wait(0.005):
            value = rss_mib()
            self.peak = max(self.peak, value)
            if self.current is not None:
                self.per_layer[self.current] = max(self.per_layer.get(self.current, 0.0), value)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def plain_forward(model, windows) -> float:
    start = time.perf_counter()
    for window in windows:
        model(window[None], use_cache=False)
    return time.perf_counter() - start


def perplexity(model, ids, seq_len, limit):
    import evaluater
    result = evaluater.perplexity(model, ids, seq_len, 1, "cpu", limit, desc="ppl")
    return {k: result[k] for k in ("ppl", "windows", "tokens", "seq_len")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration", default=DATA + "[0:0.8]")
    p.add_argument("--evaluation", default=DATA + "[0.8:1]")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ratios", default="0.2,0.4,0.6")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--eval_limit", type=int, default=None, help="evaluate the first N windows of the slice")
    p.add_argument("--updating_nsamples", type=int, default=16)
    p.add_argument("--rsvd_oversamples", type=int, default=DEFAULT_OVERSAMPLES)
    p.add_argument("--rsvd_n_iter", type=int, default=DEFAULT_N_ITER)
    p.add_argument("--num_layers", type=int, default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine, 2 OpenMP threads made LAPACK "
                        "calls 5-10x slower whenever another process was running)")
    p.add_argument("--workdir", default="/tmp/bench_core")
    p.add_argument("--out", default=os.path.join(ROOT, "scripts", "results", "bench_core_smollm2_cpu.json"))
    opts = p.parse_args(argv)
    unknown = [v for v in opts.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(opts.threads)

    from pipeline.steps import compression_block
    from api import (CompressOptions, DecomposeOptions, Statistics, UpdateOptions, calibration_windows,
                     compress_model, count_parameters, load_model, load_text, profile_model, save_compressed,
                     uniform_plan)
    from utils.data import tokenize
    from utils.model import decoder_layers

    shutil.rmtree(opts.workdir, ignore_errors=True)
    os.makedirs(opts.workdir)
    stats_path = os.path.join(opts.workdir, "stats")
    record: dict = {"settings": {**vars(opts), "torch": torch.__version__, "threads": torch.get_num_threads(),
                                 "machine": platform.processor() or platform.machine(),
                                 "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()},
                    "memory_mib": {"rss_start": rss_mib()}}

    def save():
        record["memory_mib"]["peak_rss_process"] = max_rss_mib()
        os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
        with open(opts.out + ".tmp", "w") as handle:
            json.dump(record, handle, indent=1)
        os.replace(opts.out + ".tmp", opts.out)

    start = time.perf_counter()
    base, tokenizer = load_model(opts.model, torch.float32, opts.seed, opts.num_layers)
    record["load_s"] = round(time.perf_counter() - start, 3)
    record["memory_mib"]["after_load"] = rss_mib()
    windows = calibration_windows(opts.calibration, tokenizer, opts.nsamples, opts.seq_len, opts.seed,
                                  vocab_size=base.config.vocab_size)
    record["calibration_tokens"] = int(windows.numel())

    # plain forward / profile / plain forward: the forward figure is the mean of the two
    forward = [plain_forward(base, windows)]
    print(f"forward: {forward[0]:.1f} s", flush=True)
    rss_before_profile = rss_mib()
    with LayerRss(decoder_layers(base)) as sampler:
        start = time.perf_counter()
        stats = profile_model(base, windows, "cpu", stats_path,
                              meta={"model": opts.model, "dataset": opts.calibration, "seed": opts.seed})
        profile_s = round(time.perf_counter() - start, 3)
    stats.close()
    forward.append(plain_forward(base, windows))
    print(f"profile: {profile_s:.1f} s; forward again {forward[1]:.1f} s", flush=True)
    per_layer = [round(sampler.per_layer.get(i, float("nan")), 1) for i in range(len(decoder_layers(base)))]
    xs = list(range(len(per_layer)))
    slope = statistics.linear_regression(xs, per_layer).slope if len(xs) > 1 else 0.0
    record["forward"] = {"windows": opts.nsamples, "seq_len": opts.seq_len, "runs_s": [round(f, 3) for f in forward],
                         "mean_s": round(statistics.mean(forward), 3),
                         "note": "model(ids) per window, full model incl. lm_head, no hooks; before and after profiling"}
    record["profile"] = {"seconds": profile_s, "ratio_to_forward": round(profile_s / statistics.mean(forward), 3),
                         "rss_before_mib": round(rss_before_profile, 1), "rss_peak_mib": round(sampler.peak, 1),
                         "rss_peak_per_layer_mib": per_layer,
                         "rss_per_layer_slope_mib_per_layer": round(slope, 3),
                         "rss_per_layer_spread_mib": round(max(per_layer) - min(per_layer), 1),
                         "rss_growth_first_to_last_mib": round(per_layer[-1] - per_layer[0], 1)}
    record["memory_mib"]["after_profile"] = rss_mib()
    save()

    eval_ids = tokenize(tokenizer, load_text(opts.evaluation, "test"))
    record["evaluation_tokens_available"] = int(eval_ids.numel())
    start = time.perf_counter()
    record["original"] = {"parameters": count_parameters(base), **perplexity(base, eval_ids, opts.seq_len, opts.eval_limit),
                          "eval_s": round(time.perf_counter() - start, 3)}
    print(f"original ppl {record['original']['ppl']:.3f}", flush=True)
    save()

    update_windows = None
    results = record["variants"] = {}
    for ratio in [float(r) for r in opts.ratios.split(",")]:
        for variant in opts.variants.split(","):
            settings = VARIANTS[variant]
            save_path = os.path.join(opts.workdir, f"{variant}_{ratio:g}")
            model = copy.deepcopy(base)
            options = CompressOptions(
                DecomposeOptions(settings["whitening"], settings["decomposition"], torch.float32, "auto",
                                 opts.rsvd_oversamples, opts.rsvd_n_iter, opts.seed),
                UpdateOptions(nsamples=opts.updating_nsamples) if settings["update"] != "none" else None)
            if options.update is not None and update_windows is None:  # step 3's update windows
                update_windows = calibration_windows(opts.calibration, tokenizer, opts.updating_nsamples,
                                                     opts.seq_len, opts.seed, vocab_size=base.config.vocab_size)
            stats = Statistics.open(stats_path) if settings["whitening"] != "none" else None
            rss0 = rss_mib()
            try:
                compression = compress_model(model, uniform_plan(model, ratio), options, "cpu", stats,
                                             update_windows if options.update else None)
            finally:
                if stats is not None:
                    stats.close()
            decomposition_s = compression.pop("seconds")
            start = time.perf_counter()
            save_compressed(model, tokenizer, save_path,  # the benchmark's own work folder: a rerun replaces it
                            compression_block(compression, opts.model, model, stats, opts.seed, opts.num_layers),
                            overwrite=True)
            save_s = round(time.perf_counter() - start, 3)
            entry = {"ratio": ratio, **settings,
                     "decomposition_s": decomposition_s, "save_s": save_s,
                     "parameters": compression["parameters"], "fallbacks": compression["fallbacks"],
                     "rss_during_compress_delta_mib": round(rss_mib() - rss0, 1)}
            if stats is not None:
                entry["stats_wait_s"] = round(stats.wait_s, 3)
            if variant == "whiten_rsvd":
                entry["rsvd"] = compression.get("rsvd")
            if options.update is not None:
                entry["updates_accepted"] = compression["updates_accepted"]
                entry["note"] = "decomposition_s includes the update's layer walk over the update windows"
            start = time.perf_counter()
            entry.update(perplexity(model, eval_ids, opts.seq_len, opts.eval_limit))
            entry["eval_s"] = round(time.perf_counter() - start, 3)
            if variant == "whiten_svd":
                total = profile_s + entry["decomposition_s"]
                entry["compression_total_s"] = round(total, 3)
                entry["compression_to_forward"] = round(total / record["forward"]["mean_s"], 3)
            results[f"{variant}@{ratio:g}"] = entry
            print(f"{variant} ratio {ratio}: decomposition {entry['decomposition_s']:.1f} s, ppl {entry['ppl']:.3f}, "
                  f"params {compression['parameters']['compressed']:,}", flush=True)
            del model
            gc.collect()
            shutil.rmtree(save_path, ignore_errors=True)
            save()

    fwd = record["forward"]["mean_s"]
    whiten = [v for v in results.values() if v["whitening"] != "none" and v["decomposition"] == "svd" and v["update"] == "none"]
    headline = results.get("whiten_svd@0.2")
    ratio_02 = headline["compression_to_forward"] if headline else None
    record["targets"] = {
        "compression_within_2x_forward": {str(v["ratio"]): v["compression_to_forward"] <= 2.0 for v in whiten},
        "profile_memory_flat": abs(record["profile"]["rss_growth_first_to_last_mib"]) < 50,
        "forward_s": fwd, "profile_s": profile_s,
        # the target: profile + compress of whiten_svd at ratio 0.2 within 1.6 x one forward pass
        "profile_plus_decompose_over_forward": ratio_02,
        "target_1.6x_met": (ratio_02 <= TARGET_RATIO) if ratio_02 is not None else None,
        "target_1.6x_setting": {"applies": (opts.model == "smollm2-135m" and opts.nsamples == 64
                                            and opts.seq_len == 512 and opts.num_layers is None),
                                "note": "the target is stated for SmolLM2-135M, all layers, 64 x 512 windows; "
                                        "met is null when whiten_svd at ratio 0.2 was not run"},
    }
    record["settings"]["load_avg_end"] = os.getloadavg()
    save()
    shutil.rmtree(opts.workdir, ignore_errors=True)
    print(json.dumps(record["targets"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
