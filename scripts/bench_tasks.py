"""Benchmark of step 6 (issue 18): zero-shot accuracy of SmolLM2-135M, original and whitened SVD.

    OMP_NUM_THREADS=1 python scripts/bench_tasks.py --limit 100 --out scripts/results/bench_tasks_smollm2_cpu.json

One process, through the Python API: load the model once (float32); its accuracy on every local
task (tasks_eval.evaluate_tasks: lm-eval with the model instance, data from ../shared/data);
calibration statistics once (api.profile_model, 64 windows of 512 tokens from the first 80% of the
shared WikiText-2 validation text); then per ratio a fresh copy compressed by whitened SVD
(api.compress_model, SVD-LLM: Cholesky whitening, exact SVD, uniform ranks) and the same tasks.
--limit N scores the first N documents of every task (the same documents for every model), so
accuracies carry the standard error of N documents (about 0.07 at N=50, 0.05 at N=100); the
differences between models are on paired documents. Writes the JSON after every model.

A quick check that it runs (a minute, not a benchmark):
    python scripts/bench_tasks.py --num_layers 2 --nsamples 4 --seq_len 64 --ratios 0.4 --limit 3 \\
        --tasks piqa_local,arc_easy_local --out /tmp/bench_tasks_tiny.json
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "wikitext2", "wiki.valid.tokens")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration", default=DATA + "[0:0.8]", help="calibration text (a slice of a local file)")
    p.add_argument("--nsamples", type=int, default=64, help="calibration windows")
    p.add_argument("--seq_len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--ratios", default="0.2,0.4,0.6", help="fractions of each matrix's parameters removed")
    p.add_argument("--tasks", default=None, help="comma list of tasks (default: every local task)")
    p.add_argument("--tasks_data", default=None, help="the local tasks' data folder (default: ../shared/data)")
    p.add_argument("--limit", type=int, default=100, help="first N documents of every task (default 100)")
    p.add_argument("--batch_size", type=int, default=16, help="lm-eval requests per forward pass")
    p.add_argument("--num_layers", type=int, default=None, help="keep the first N decoder layers (quick checks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared 2-core machine)")
    p.add_argument("--out", default=os.path.join(ROOT, "scripts", "results", "bench_tasks_smollm2_cpu.json"))
    return p


def _model_entry(data: dict, seconds: float) -> dict:
    return {"tasks": {name: {k: entry.get(k) for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr",
                                                       "documents", "documents_available", "seconds")}
                      for name, entry in data["results"].items()},
            "mean_acc": data["mean"]["acc"], "mean_acc_norm": data["mean"]["acc_norm"],
            "acc_norm_tasks": data["mean"]["acc_norm_tasks"], "eval_s": round(seconds, 3)}


def table(record: dict) -> str:
    """Markdown: one row per model, acc per task, the mean, and evaluation seconds."""
    names = record["settings"]["task_names"]
    lines = ["| model | " + " | ".join(n.removesuffix("_local") for n in names) + " | mean acc | eval s |",
             "|---|" + "---|" * (len(names) + 2)]
    for label, entry in [("original", record.get("original"))] + [
            (f"whiten_svd {float(r):.0%}", e) for r, e in record.get("whiten_svd", {}).items()]:
        if entry:
            cells = [f"{entry['tasks'][n]['acc']:.3f}" if entry["tasks"].get(n, {}).get("acc") is not None
                     else "-" for n in names]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {entry['mean_acc']:.4f} | {entry['eval_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    from tasks_eval import check_tasks, default_tasks_data, evaluate_tasks, parse_tasks
    from utils.data import DatasetError, validate_dataset
    from utils.io import write_json
    from utils.model import ModelSpecError, resolve_model
    names = parse_tasks(opts.tasks)
    opts.tasks_data = opts.tasks_data or default_tasks_data()
    try:
        ratios = [float(r) for r in opts.ratios.split(",")]
        if not all(0 < r < 1 for r in ratios) or opts.limit < 1 or opts.nsamples < 1 or opts.seq_len < 2:
            raise ValueError
    except ValueError:
        print("error: --ratios must be numbers in (0, 1); --limit, --nsamples at least 1; --seq_len at least 2",
              file=sys.stderr)
        return 2
    try:
        resolve_model(opts.model)
        validate_dataset(opts.calibration)
        check_tasks(names, opts.tasks_data)
    except (DatasetError, ModelSpecError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(opts.threads)
    from api import (CompressOptions, DecomposeOptions, calibration_windows, compress_model, count_parameters,
                     load_model, profile_model, uniform_plan)
    from tasks_eval import lm_eval_version  # the installed lm-eval's version (fails here if it is missing)

    begin = time.perf_counter()
    record: dict = {"settings": {**vars(opts), "task_names": names, "variant": "whiten_svd (cholesky, exact svd, "
                                 "uniform ranks)", "lm_eval": lm_eval_version(), "torch": torch.__version__,
                                 "threads": torch.get_num_threads(), "dtype": "float32", "num_fewshot": 0,
                                 "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                 "load_avg_start": os.getloadavg()}}

    def evaluate(model) -> dict:
        start = time.perf_counter()
        data = evaluate_tasks(model, tokenizer, names, opts.tasks_data, "cpu", 0, opts.limit, opts.batch_size)
        return _model_entry(data, time.perf_counter() - start)

    start = time.perf_counter()
    base, tokenizer = load_model(opts.model, torch.float32, opts.seed, opts.num_layers)
    record["load_s"] = round(time.perf_counter() - start, 3)
    record["original"] = {"parameters": count_parameters(base), **evaluate(base)}
    print(f"original: mean acc {record['original']['mean_acc']:.4f} ({record['original']['eval_s']:.0f} s)", flush=True)
    write_json(opts.out, record)

    windows = calibration_windows(opts.calibration, tokenizer, opts.nsamples, opts.seq_len, opts.seed,
                                  vocab_size=base.config.vocab_size)
    start = time.perf_counter()
    stats = profile_model(base, windows, "cpu")  # in memory
    record["profile_s"] = round(time.perf_counter() - start, 3)
    record["calibration_tokens"] = int(windows.numel())
    print(f"profile: {record['profile_s']:.0f} s", flush=True)
    del windows
    record["whiten_svd"] = {}
    for ratio in ratios:
        model = copy.deepcopy(base)
        options = CompressOptions(DecomposeOptions("cholesky", "svd", torch.float32, "auto", seed=opts.seed))
        compression = compress_model(model, uniform_plan(model, ratio), options, "cpu", stats)
        entry = {"ratio": ratio, "compress_s": compression.pop("seconds"), "parameters": compression["parameters"],
                 "fallbacks": compression["fallbacks"], **evaluate(model)}
        record["whiten_svd"][f"{ratio:g}"] = entry
        print(f"whiten_svd {ratio:g}: mean acc {entry['mean_acc']:.4f} (compress {entry['compress_s']:.0f} s, "
              f"eval {entry['eval_s']:.0f} s)", flush=True)
        del model
        gc.collect()
        write_json(opts.out, record)
    record["total_s"] = round(time.perf_counter() - begin, 3)
    record["settings"]["load_avg_end"] = os.getloadavg()
    record["table"] = table(record)
    write_json(opts.out, record)
    print(record["table"], end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
