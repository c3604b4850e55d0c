"""Run the pipeline over ratios x variants on one model: one results JSON per run + table.md.

    python scripts/sweep.py --model smollm2-135m --ratios 0.2,0.4,0.6 \\
        --dataset '../shared/data/wikitext2/wiki.valid.tokens[0:0.8]' --whitening_nsamples 16 \\
        --eval_datasets '../shared/data/wikitext2/wiki.valid.tokens[0.8:1]' --model_seq_len 256 \\
        --eval_limit 16 --out scripts/results/sweep_smollm2 [--efficiency]

    python scripts/sweep.py --quick --out /tmp/sweep     # tiny random model, seconds

What it does, in process through the Python API (api.py, pipeline.steps, evaluater):
  1. load the model once; its perplexity on every --eval_datasets entry  -> OUT/original.json
  2. calibration statistics once (profile_model), shared by every whitening variant -> OUT/stats
  3. per variant and ratio: a fresh copy of the loaded model, compress_model with the uniform plan,
     save_compressed to OUT/models/VARIANT_rRATIO, perplexity (and with --efficiency the speed and
     memory of the copy against the loaded original: evaluater.measure_efficiency)
     -> OUT/runs/VARIANT_rRATIO.json, in the layout of compress.py's steps 4-5 results, with a
     "sweep" block (variant, ratio, the shared profile seconds, the run's seconds, the command)
     With --tasks, every model (the original too) also gets step 6's "tasks" section (lm-eval
     accuracy, tasks_eval.evaluate_tasks; --limit N documents per task).
  4. OUT/table.md: the combined markdown table (scripts/plot_results.py draws the plots).
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import shlex
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# variant -> (whitening, decomposition, update)
VARIANTS = {
    "svd": ("none", "svd", "none"),
    "whiten_svd": ("cholesky", "svd", "none"),
    "whiten_rsvd": ("cholesky", "rsvd", "none"),
    "whiten_svd_update": ("cholesky", "svd", "closed_form"),
    "whiten_rsvd_update": ("cholesky", "rsvd", "closed_form"),
    "eigen_svd": ("eigen", "svd", "none"),
}
DEFAULT_VARIANTS = "svd,whiten_svd,whiten_rsvd,whiten_svd_update"


def make_tiny_model(directory: str, family: str = "llama") -> str:
    """A tiny random model with a byte-level tokenizer (256 ids = its vocabulary), so that the
    whole pipeline, text evaluation included, runs on it in seconds."""
    from tests.tiny_models import save_byte_level_tokenizer, save_tiny_model
    path = save_tiny_model(family, directory)
    save_byte_level_tokenizer(path)
    return path


def build_parser() -> argparse.ArgumentParser:
    from utils.rsvd import DEFAULT_N_ITER, DEFAULT_OVERSAMPLES
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base model (default: smollm2-135m; with --quick a tiny random one)")
    p.add_argument("--ratios", default="0.2,0.4,0.6", help="comma list of ratios (fraction removed)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dataset", default=None, help="calibration data (default: wikitext2; --quick: pydoc)")
    p.add_argument("--eval_datasets", default=None, help="evaluation data (default: wikitext2; --quick: pydoc)")
    p.add_argument("--whitening_nsamples", type=int, default=None, help="calibration windows (default 256)")
    p.add_argument("--updating_nsamples", type=int, default=None, help="update windows (default 16)")
    p.add_argument("--model_seq_len", type=int, default=None, help="window length (default 2048)")
    p.add_argument("--eval_limit", type=int, default=None, help="evaluate the first N windows only")
    p.add_argument("--efficiency", action="store_true", help="also measure speed and memory of every compressed model")
    p.add_argument("--keep_models", action="store_true",
                   help="keep the compressed models and the statistics (default: delete them after use)")
    p.add_argument("--quick", action="store_true",
                   help="short runs: 4 calibration windows of 64 tokens, 4 evaluation windows; "
                        "without --model a tiny random Llama with a byte tokenizer")
    g = p.add_argument_group("model and decomposition (what compress.py's flags of the same names set)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype the model runs in (auto: the checkpoint's own)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    g.add_argument("--seed", type=int, default=0, help="seed of calibration windows and randomized SVD")
    g.add_argument("--num_layers", type=int, default=None, help="keep only the first N decoder layers")
    g.add_argument("--svd_dtype", default="float32", choices=["float32", "float64"])
    g.add_argument("--svd_driver", default="auto", choices=["auto", "default", "gesvda"])
    g.add_argument("--rsvd_oversamples", type=int, default=DEFAULT_OVERSAMPLES)
    g.add_argument("--rsvd_n_iter", type=int, default=DEFAULT_N_ITER)
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval_batch_size", type=int, default=1, help="windows per forward pass")
    e.add_argument("--prefill_len", type=int, default=512, help="efficiency: prompt tokens per sequence")
    e.add_argument("--gen_seq_len", type=int, default=64, help="efficiency: new tokens generated")
    e.add_argument("--repeats", type=int, default=5, help="efficiency: timed repetitions (median reported)")
    e.add_argument("--tasks", default=None,
                   help="also run step 6 on every model: a comma list of lm-eval tasks (local: piqa_local, "
                        "arc_easy_local, ...; 'local' for all of them); default: none")
    e.add_argument("--tasks_data", default=None, help="folder of the local tasks' data (default: ../shared/data)")
    e.add_argument("--limit", type=int, default=None, help="step 6: the first N documents of each task")
    return p


def _settings(args: argparse.Namespace) -> dict:
    quick = dict(dataset="pydoc", eval_datasets="pydoc", whitening_nsamples=4, updating_nsamples=4,
                 model_seq_len=64, eval_limit=4)
    full = dict(dataset="wikitext2", eval_datasets="wikitext2", whitening_nsamples=256, updating_nsamples=16,
                model_seq_len=2048, eval_limit=None)
    defaults = quick if args.quick else full
    return {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}


def _check(args: argparse.Namespace, model: str | None, s: dict) -> str | None:
    """compress.py's checks of these settings, before anything slow: an error message or None
    (model None: the tiny --quick model, made afterwards)."""
    from utils.data import DatasetError, check_hub_datasets, validate_dataset
    from utils.model import ModelSpecError, resolve_model
    from utils.presets import is_random_spec
    import torch
    for name in ("whitening_nsamples", "updating_nsamples", "eval_batch_size", "prefill_len", "gen_seq_len",
                 "repeats"):
        value = s[name] if name in s else getattr(args, name)
        if value < 1:
            return f"--{name} must be at least 1"
    if s["model_seq_len"] < 2:
        return "--model_seq_len must be at least 2 (a window's first token is not scored)"
    for name in ("eval_limit", "num_layers"):
        value = s[name] if name in s else getattr(args, name)
        if value is not None and value < 1:
            return f"--{name} {value}: must be at least 1 (leave it out for all)"
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        return f"--ratios {args.ratios!r}: give a comma list of numbers such as 0.2,0.4"
    if not all(0.0 < r < 1.0 for r in ratios):
        return f"--ratios {args.ratios}: every ratio (fraction of parameters removed) must be in (0, 1)"
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            return f"--device {args.device}: no CUDA device here; use --device cpu"
    elif args.device != "cpu":
        return f"--device {args.device}: use cpu, cuda or cuda:N"
    if args.svd_driver == "gesvda" and not args.device.startswith("cuda"):
        return "--svd_driver gesvda is CUDA-only: use --svd_driver auto on the CPU"
    if model is not None and is_random_spec(model):
        return (f"--model {model}: perplexity of a model built from random weights measures nothing "
                f"about compression: sweep a pretrained model")
    if args.limit is not None and args.limit < 1:
        return f"--limit {args.limit}: must be at least 1 (leave it out for every document)"
    try:
        if args.tasks:
            from tasks_eval import check_tasks, default_tasks_data
            args.tasks_data = args.tasks_data or default_tasks_data()
            check_tasks(task_names(args), args.tasks_data)
        if model is not None:
            resolve_model(model)
        validate_dataset(s["dataset"])
        for spec in s["eval_datasets"].split(","):
            validate_dataset(spec)
        check_hub_datasets({"--dataset": s["dataset"], "--eval_datasets": s["eval_datasets"]})
    except (DatasetError, ModelSpecError) as error:
        return str(error)
    return None


def evaluate(model, tokenizer, args: argparse.Namespace, s: dict) -> dict:
    """Step 4's figures: perplexity on every evaluation dataset (evaluater.perplexity)."""
    import evaluater
    from utils.data import load_text, tokenize
    model = model.to(args.device).eval()
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    results = {}
    for spec in s["eval_datasets"].split(","):
        ids = tokenize(tokenizer, load_text(spec, "test"))
        start = time.perf_counter()
        result = evaluater.perplexity(model, ids, s["model_seq_len"], args.eval_batch_size, args.device,
                                      s["eval_limit"], desc=f"perplexity {spec}")
        result.update(dtype=dtype, device=args.device, seconds=round(time.perf_counter() - start, 3))
        results[spec] = result
        ppl = f"{result['ppl']:.4f}" if result["ppl"] is not None else "not finite"
        print(f"perplexity {spec}: {ppl} ({result['windows']} windows of {result['seq_len']})", flush=True)
    return results


def task_names(args: argparse.Namespace) -> list[str]:
    from tasks_eval import parse_tasks
    return parse_tasks(None if args.tasks == "local" else args.tasks)


def downstream(model, tokenizer, args: argparse.Namespace) -> dict:
    """Step 6's figures: lm-eval accuracy on every --tasks entry (tasks_eval.evaluate_tasks)."""
    from tasks_eval import evaluate_tasks
    from utils.model import dtype_name
    start = time.perf_counter()
    data = evaluate_tasks(model.to(args.device).eval(), tokenizer, task_names(args), args.tasks_data, args.device,
                          0, args.limit, args.eval_batch_size)
    data["settings"].update(dtype=dtype_name(next(model.parameters()).dtype),
                            placement={"device_map": None, "device": args.device},
                            seconds=round(time.perf_counter() - start, 3))
    if data["mean"]["acc"] is not None:
        print(f"tasks mean acc {data['mean']['acc']:.4f} over {len(data['mean']['tasks'])} tasks", flush=True)
    return data


def efficiency(model, original, tokenizer, args: argparse.Namespace, s: dict) -> dict:
    """Step 5's figures: the compressed model against the original (evaluater.measure_efficiency),
    same prompts (the first windows of the first evaluation text), same settings."""
    import torch
    import evaluater
    from utils.data import DatasetError, load_text, tokenize
    batch, length = args.eval_batch_size, args.prefill_len
    spec = s["eval_datasets"].split(",")[0]
    ids = tokenize(tokenizer, load_text(spec, "test"))
    if ids.numel() < batch * length:
        raise DatasetError(f"{spec} has {ids.numel()} tokens, fewer than --eval_batch_size x --prefill_len "
                           f"= {batch * length}")
    prompts = ids[:batch * length].view(batch, length)
    models = {"model": model.to(args.device).eval(), "original": original.to(args.device).eval()}
    cache = {name: m.config.use_cache for name, m in models.items()}
    for m in models.values():
        m.config.use_cache = True
    try:
        figures = evaluater.measure_efficiency(models, prompts, args.gen_seq_len, args.repeats, args.device)
    finally:
        for name, m in models.items():
            m.config.use_cache = cache[name]
        original.to("cpu")
    settings = {"device": args.device, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                "batch_size": batch, "prefill_len": length, "gen_seq_len": args.gen_seq_len,
                "repeats": args.repeats, "warmup": 1, "prompts": f"{spec}: first {batch} windows of {length} tokens",
                "decoding": "greedy, KV cache",
                "prefill_logits": "last position" if evaluater._forward_kwargs(model) else "all positions",
                "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                "load_average_1min": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
                "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None}
    data = {"settings": settings, **figures, "ratios": evaluater.efficiency_ratios(figures["model"], figures["original"])}
    r = data["ratios"]
    print(f"efficiency (model/original): prefill throughput {r['prefill_throughput']:.3f}, decode throughput "
          f"{r['decode_throughput']:.3f}, peak memory {r['peak_memory']:.3f}", flush=True)
    return data


def results_record(model, model_path: str | None, base_model: str, compression: dict | None,
                   timings: dict, sections: dict) -> dict:
    """The results JSON of compress.py's steps 4-5 (evaluater.update_results' layout)."""
    import evaluater
    from utils.model import model_description
    return {"results_version": evaluater.RESULTS_VERSION,
            "model": {"model_path": os.path.abspath(model_path) if model_path else None,
                      "base_model": base_model, "compressed": compression is not None},
            "model_description": model_description(model),
            "compression": evaluater._compression_summary(compression),
            "timings": timings, **sections}


def _errors() -> tuple:
    """The errors compress.main reports as a failed run (anything else is a bug and propagates)."""
    from methods.decompose import DecomposeError
    from utils.data import DatasetError
    from utils.io import CompressedModelError
    from utils.model import ModelSpecError
    from utils.outputs import OutputError
    from pipeline.steps import PipelineError
    from utils.plan import PlanError
    return (DatasetError, ModelSpecError, FileNotFoundError, PipelineError, PlanError, DecomposeError,
            CompressedModelError, OutputError)


def sweep(args: argparse.Namespace, argv: list[str]) -> int:
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if args.device is None:
        from utils.model import default_device
        args.device = default_device()
    s = _settings(args)
    tiny = args.model is None and args.quick
    problem = _check(args, None if tiny else (args.model or "smollm2-135m"), s)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    model_spec = make_tiny_model(os.path.join(args.out, "models")) if tiny else (args.model or "smollm2-135m")
    errors = _errors()
    try:
        return _sweep(args, argv, model_spec, s, errors)
    except errors as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _sweep(args: argparse.Namespace, argv: list[str], model_spec: str, s: dict, errors: tuple) -> int:
    from api import (CompressOptions, DecomposeOptions, Statistics, UpdateOptions, calibration_windows,
                     compress_model, load_model, profile_model, save_compressed, uniform_plan)
    from scripts.plot_results import load_runs, markdown_table
    from utils.data import DatasetError
    from utils.io import write_json
    from utils.model import DTYPES
    from pipeline.steps import compression_block
    from utils.presets import is_random_spec
    command = "python scripts/sweep.py " + shlex.join(argv)
    variants = args.variants.split(",")
    ratios = [float(r) for r in args.ratios.split(",")]
    failures = []

    # 1. the original: loaded once, every run compresses a copy of it
    start = time.perf_counter()
    base, tokenizer = load_model(model_spec, args.dtype, args.seed, args.num_layers)
    load_s = round(time.perf_counter() - start, 3)
    if tokenizer is None:
        raise DatasetError(f"{model_spec} has no tokenizer, so evaluation text cannot be tokenized")
    try:
        sections = {"perplexity": evaluate(base, tokenizer, args, s)}
        if args.tasks:
            sections["tasks"] = downstream(base, tokenizer, args)
        write_json(os.path.join(args.out, "original.json"),
                   results_record(base, None, model_spec, None, {"load_s": load_s}, sections))
    except errors as error:
        print(f"error: original: {error}", file=sys.stderr)
        failures.append("original")
    finally:
        base.to("cpu")

    # 2. statistics once, shared by every whitening variant
    stats_path = os.path.join(args.out, "stats")
    profile_s = 0.0
    if any(VARIANTS[v][0] != "none" for v in variants):
        start = time.perf_counter()
        try:
            windows = calibration_windows(s["dataset"], tokenizer, s["whitening_nsamples"], s["model_seq_len"],
                                          args.seed, vocab_size=base.config.vocab_size)
            profile_model(base, windows, args.device, stats_path,
                          meta={"model": model_spec, "dataset": s["dataset"], "seed": args.seed}).close()
        except errors as error:
            print(f"error: statistics (step 1) failed, so no whitening variant can run: {error}", file=sys.stderr)
            return 1
        profile_s = time.perf_counter() - start
        print(f"profile: {profile_s:.1f} s -> {stats_path}", flush=True)
        del windows
    update_windows = None

    # 3. per variant and ratio: compress a copy, save, evaluate
    for variant in variants:
        whitening, decomposition, update = VARIANTS[variant]
        for ratio in ratios:
            name = f"{variant}_r{ratio:g}"
            save = os.path.join(args.out, "models", name)
            print(f"== {name}", flush=True)
            run_start = time.perf_counter()
            timings: dict = {}
            model = None
            try:
                start = time.perf_counter()
                model = copy.deepcopy(base)
                timings["copy_s"] = round(time.perf_counter() - start, 3)
                options = CompressOptions(
                    DecomposeOptions(whitening, decomposition, DTYPES[args.svd_dtype], args.svd_driver,
                                     args.rsvd_oversamples, args.rsvd_n_iter, args.seed),
                    UpdateOptions(nsamples=s["updating_nsamples"]) if update != "none" else None)
                if options.update is not None and update_windows is None:  # as step 3 draws them
                    update_windows = calibration_windows(s["dataset"], tokenizer, s["updating_nsamples"],
                                                         s["model_seq_len"], args.seed,
                                                         vocab_size=base.config.vocab_size)
                stats = Statistics.open(stats_path) if whitening != "none" else None
                try:
                    record = compress_model(model, uniform_plan(model, ratio), options, args.device, stats,
                                            update_windows if options.update else None)
                finally:
                    if stats is not None:
                        timings["stats_wait_s"] = round(stats.wait_s, 3)
                        stats.close()
                timings["compress_s"] = record.pop("seconds")
                compression = compression_block(record, model_spec, model, stats, args.seed, args.num_layers,
                                                random_weights=is_random_spec(model_spec))
                start = time.perf_counter()
                save_compressed(model, tokenizer, save, compression, overwrite=True)  # OUT/models: a rerun replaces its runs
                timings["save_s"] = round(time.perf_counter() - start, 3)
                params = compression["parameters"]
                print(f"compress: {params['original']:,} -> {params['compressed']:,} parameters "
                      f"({timings['compress_s']:.1f} s)", flush=True)
                sections = {"perplexity": evaluate(model, tokenizer, args, s)}
                if args.tasks:
                    sections["tasks"] = downstream(model, tokenizer, args)
                if args.efficiency:
                    sections["efficiency"] = efficiency(model, base, tokenizer, args, s)
                result = results_record(model, save, model_spec, compression, timings, sections)
            except errors as error:
                print(f"error: {name}: {error}", file=sys.stderr)
                failures.append(name)
                continue
            finally:
                model = None
                gc.collect()
                if not args.keep_models:
                    shutil.rmtree(save, ignore_errors=True)
            result["sweep"] = {"variant": variant, "ratio": ratio,
                               "profile_s": round(profile_s, 3) if whitening != "none" else 0.0,
                               "run_s": round(time.perf_counter() - run_start, 3), "command": command}
            write_json(os.path.join(args.out, "runs", f"{name}.json"), result)
    if not args.keep_models:
        shutil.rmtree(stats_path, ignore_errors=True)

    # 4. the table
    table = markdown_table(load_runs([os.path.join(args.out, "original.json"), os.path.join(args.out, "runs")]))
    with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as handle:
        handle.write(f"Model {model_spec}; calibration {s['dataset']} ({s['whitening_nsamples']} x {s['model_seq_len']}); "
                     f"evaluation {s['eval_datasets']} (windows of {s['model_seq_len']}, limit {s['eval_limit']})\n\n")
        handle.write(table)
    print(table, end="")
    if failures:
        print(f"error: failed runs: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return sweep(build_parser().parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
