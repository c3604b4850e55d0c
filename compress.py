"""One CLI for SVD compression of causal language models.

    python compress.py --step 1-4 --model smollm2-135m --ratio 0.2 --dataset pydoc --save_path out/smol

Steps: 1 profile, 2 allocate, 3 compress, 4 perplexity, 5 efficiency (6-8: later).
See README.md for every step, the ratio convention and the file formats.
"""
from __future__ import annotations

import argparse
import os
import sys

STEP_NAMES = {1: "profile", 2: "allocate", 3: "compress", 4: "perplexity", 5: "efficiency",
              6: "downstream tasks", 7: "LoRA update", 8: "quantization"}
IMPLEMENTED_STEPS = (1, 2, 3, 4, 5)


class UsageError(ValueError):
    pass


def parse_steps(text: str) -> list[int]:
    """'3' | '1,3' | '1-4' (and mixes like '1,3-5') -> sorted unique step numbers."""
    steps: set[int] = set()
    try:
        for part in text.split(","):
            if "-" in part:
                first, last = (int(x) for x in part.split("-", 1))
                steps.update(range(first, last + 1))
            else:
                steps.add(int(part))
    except ValueError:
        raise UsageError(f"--step {text!r}: give a number, a comma list or a range such as 1-4") from None
    unknown = sorted(s for s in steps if s not in STEP_NAMES)
    if unknown or not steps:
        raise UsageError(f"--step {text!r}: unknown step {unknown}; steps are " +
                         ", ".join(f"{k} {v}" for k, v in STEP_NAMES.items()))
    missing = sorted(s for s in steps if s not in IMPLEMENTED_STEPS)
    if missing:
        raise UsageError(f"--step {missing[0]} ({STEP_NAMES[missing[0]]}) is not implemented yet; "
                         f"available: {', '.join(map(str, IMPLEMENTED_STEPS))}")
    return sorted(steps)


def build_parser() -> argparse.ArgumentParser:
    from utils.rsvd import DEFAULT_N_ITER, DEFAULT_OVERSAMPLES
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("pipeline")
    g.add_argument("--step", required=True, help="step(s) to run: N, a comma list (1,3) or a range (1-4)")
    g.add_argument("--model", default="smollm2-135m",
                   help="base model: a Hugging Face id, a local directory, a .gguf file, a bundled alias "
                        "(smollm2-135m, gemma3-270m) (default: smollm2-135m)")
    g.add_argument("--model_path", default=None,
                   help="a compressed model (directory or .pt) for steps 4-5; without it they use --model")
    g.add_argument("--save_path", default=None, help="output of step 3: a directory or a NAME.pt file")
    g.add_argument("--stats_path", default=None,
                   help="where step 1 writes and step 3 reads statistics (default: SAVE_PATH/stats)")
    g.add_argument("--ranks_path", default=None, help="per-matrix ranks JSON written by step 2 and read by step 3 "
                                                      "(default for step 3: uniform ranks from --ratio)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the model runs in (statistics and decompositions are float32/64 regardless)")
    g.add_argument("--device", "--DEV", dest="device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    g.add_argument("--num_layers", type=int, default=None,
                   help="keep only the first N decoder layers (timing and memory runs)")
    g.add_argument("--seed", type=int, default=0, help="seed of calibration windows and randomized SVD")
    c = p.add_argument_group("calibration")
    c.add_argument("--dataset", default="wikitext2",
                   help="calibration data: wikitext2, ptb, c4, pydoc (offline), random, or a local file "
                        "(.json/.jsonl with 'text', else plain text); a slice such as FILE[0:0.8] takes "
                        "that fraction of its lines")
    c.add_argument("--whitening_nsamples", type=int, default=256, help="calibration windows for step 1")
    c.add_argument("--updating_nsamples", type=int, default=16,
                   help="calibration windows for the closed-form update (a quarter are held out)")
    c.add_argument("--model_seq_len", type=int, default=2048, help="tokens per calibration/evaluation window")
    d = p.add_argument_group("decomposition")
    d.add_argument("--ratio", type=float, default=0.2,
                   help="fraction of each compressed matrix's parameters removed, in (0, 1)")
    d.add_argument("--whitening", default="cholesky", choices=["cholesky", "eigen", "none"],
                   help="truncation-aware whitening: cholesky (SVD-LLM), eigen (SVD-LLM V2), none (plain SVD)")
    d.add_argument("--decomposition", default="svd", choices=["svd", "rsvd"], help="exact or randomized SVD")
    d.add_argument("--rsvd_oversamples", type=int, default=DEFAULT_OVERSAMPLES,
                   help="randomized SVD: extra sketch columns (default %(default)s; with the default "
                        "--rsvd_n_iter: at least 2x faster than exact SVD at under 1%% extra truncation loss, "
                        "scripts/results/bench_rsvd_cpu.json)")
    d.add_argument("--rsvd_n_iter", type=int, default=DEFAULT_N_ITER,
                   help="randomized SVD: power iterations (default %(default)s)")
    d.add_argument("--svd_dtype", default="float32", choices=["float32", "float64"],
                   help="precision of the SVD itself (whitening is always float64)")
    d.add_argument("--svd_driver", default="auto", choices=["auto", "default", "gesvda"],
                   help="exact SVD driver: auto = cuSOLVER gesvda with a residual check on CUDA "
                        "(falls back to the default driver), LAPACK on CPU")
    d.add_argument("--update", default="none", choices=["none", "closed_form"],
                   help="closed-form update of u against the original layer outputs (SVD-LLM step 2)")
    e = p.add_argument_group("evaluation (steps 4-5)")
    e.add_argument("--eval_datasets", default="wikitext2",
                   help="comma list of wikitext2, ptb, c4, pydoc or local files (slices allowed)")
    e.add_argument("--eval_batch_size", type=int, default=1, help="windows per forward pass")
    e.add_argument("--eval_limit", type=int, default=None, help="evaluate only the first N windows")
    e.add_argument("--results", default=None, help="JSON output of steps 4-5 (default: next to the model)")
    e.add_argument("--prefill_len", type=int, default=512, help="step 5: prompt tokens per sequence")
    e.add_argument("--gen_seq_len", type=int, default=64, help="step 5: new tokens generated")
    e.add_argument("--repeats", type=int, default=5, help="step 5: timed repetitions (median reported)")
    return p


def validate(args: argparse.Namespace) -> None:
    """Every check that needs no model, before anything slow starts."""
    from utils.data import validate_dataset
    from utils.io import is_compressed_model
    from utils.rsvd import DEFAULT_N_ITER, DEFAULT_OVERSAMPLES
    from utils.model import resolve_model
    args.steps = parse_steps(args.step)
    if not 0.0 < args.ratio < 1.0:
        raise UsageError(f"--ratio {args.ratio}: the fraction of parameters removed must be in (0, 1), e.g. 0.2")
    for name in ("whitening_nsamples", "updating_nsamples", "model_seq_len", "eval_batch_size",
                 "prefill_len", "gen_seq_len", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    for name in ("rsvd_oversamples", "rsvd_n_iter"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must be 0 or more (defaults: --rsvd_oversamples {DEFAULT_OVERSAMPLES} "
                             f"--rsvd_n_iter {DEFAULT_N_ITER})")
    if args.device is None:
        from utils.model import default_device
        args.device = default_device()
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA device here; use --device cpu")
    elif args.device != "cpu":
        raise UsageError(f"--device {args.device}: use cpu, cuda or cuda:N")
    if args.svd_driver == "gesvda" and not args.device.startswith("cuda"):
        raise UsageError("--svd_driver gesvda is CUDA-only: use --svd_driver auto on the CPU")
    steps = set(args.steps)
    needs_base = steps & {1, 2, 3} or (steps & {4, 5} and not args.model_path)
    if needs_base:
        resolve_model(args.model)
    if steps & {1, 3} and not args.save_path and not (steps == {1} and args.stats_path):
        raise UsageError("--save_path is required: step 3 writes the model there and step 1 the "
                         "statistics to SAVE_PATH/stats (or give --stats_path)")
    if steps & {1} or (3 in steps and args.update != "none"):
        validate_dataset(args.dataset)
    if 3 in steps and 1 not in steps and args.whitening != "none":
        from utils.pipeline import stats_path_of, STATS_META
        if not os.path.isfile(os.path.join(stats_path_of(args), STATS_META)):
            raise UsageError(f"step 3 needs the statistics of step 1, not found in {stats_path_of(args)}: "
                             f"run --step 1 first, pass --stats_path, or use --whitening none")
    if args.ranks_path and 3 in steps and 2 not in steps and not os.path.isfile(args.ranks_path):
        raise UsageError(f"--ranks_path {args.ranks_path}: no such file (run step 2 to write it)")
    if args.model_path and steps & {4, 5} and 3 not in steps:
        if not os.path.exists(args.model_path):
            raise UsageError(f"--model_path {args.model_path}: no such file or directory")
        if not is_compressed_model(args.model_path):
            raise UsageError(f"--model_path {args.model_path}: not a compressed model "
                             f"(no 'compression' block in its config.json); pass a base model with --model")
    if steps & {4, 5}:
        for spec in args.eval_datasets.split(","):
            validate_dataset(spec)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from utils.data import DatasetError
    from utils.model import ModelSpecError
    try:
        validate(args)
    except (UsageError, ModelSpecError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from utils import pipeline
    from utils.io import CompressedModelError
    session = pipeline.Session()
    try:
        for step in args.steps:
            if step == 1:
                pipeline.profile(args, session)
            elif step == 2:
                pipeline.allocate(args, session)
            elif step == 3:
                pipeline.compress(args, session)
            elif step in (4, 5):
                import evaluater
                if step == 4:
                    evaluater.perplexity_step(args, session)
                else:
                    evaluater.efficiency_step(args, session)
    except (DatasetError, ModelSpecError, FileNotFoundError, pipeline.PipelineError,
            CompressedModelError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
