"""Run the pipeline over ratios x variants on one model: one results JSON per run + table.md.

    python scripts/sweep.py --model smollm2-135m --ratios 0.2,0.4,0.6 \\
        --dataset '../shared/data/wikitext2/wiki.valid.tokens[0:0.8]' --whitening_nsamples 16 \\
        --eval_datasets '../shared/data/wikitext2/wiki.valid.tokens[0.8:1]' --model_seq_len 256 \\
        --eval_limit 16 --out scripts/results/sweep_smollm2 [--efficiency]

    python scripts/sweep.py --quick --out /tmp/sweep     # tiny random model, seconds

What it does, all through compress.main (in process):
  1. the original model's perplexity (step 4)           -> OUT/original.json
  2. calibration statistics once (step 1), shared by every whitening variant -> OUT/stats
  3. per variant and ratio: steps 3-4 (3-5 with --efficiency) -> OUT/runs/VARIANT_rRATIO.json,
     with a "sweep" block (variant, ratio, the shared profile seconds, the command)
  4. OUT/table.md: the combined markdown table (scripts/plot_results.py draws the plots).
Arguments it does not know are passed to every compress.py call (e.g. --dtype, --device, --seed).
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = {
    "svd": ["--whitening", "none", "--decomposition", "svd"],
    "whiten_svd": ["--whitening", "cholesky", "--decomposition", "svd"],
    "whiten_rsvd": ["--whitening", "cholesky", "--decomposition", "rsvd"],
    "whiten_svd_update": ["--whitening", "cholesky", "--decomposition", "svd", "--update", "closed_form"],
    "whiten_rsvd_update": ["--whitening", "cholesky", "--decomposition", "rsvd", "--update", "closed_form"],
    "eigen_svd": ["--whitening", "eigen", "--decomposition", "svd"],
}
DEFAULT_VARIANTS = "svd,whiten_svd,whiten_rsvd,whiten_svd_update"


def make_tiny_model(directory: str, family: str = "llama") -> str:
    """A tiny random model with a byte-level tokenizer (256 ids = its vocabulary), so that the
    whole pipeline, text evaluation included, runs on it in seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from tests.tiny_models import save_tiny_model
    path = save_tiny_model(family, directory)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(path)
    return path


def _run(argv: list[str]) -> tuple[int, float]:
    import compress
    print("$ python compress.py " + shlex.join(argv), flush=True)
    start = time.perf_counter()
    code = compress.main(argv)
    return code, time.perf_counter() - start


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--efficiency", action="store_true", help="also run step 5 for every compressed model")
    p.add_argument("--keep_models", action="store_true",
                   help="keep the compressed models and the statistics (default: delete them after use)")
    p.add_argument("--quick", action="store_true",
                   help="short runs: 4 calibration windows of 64 tokens, 4 evaluation windows; "
                        "without --model a tiny random Llama with a byte tokenizer")
    return p


def _settings(args: argparse.Namespace) -> dict:
    quick = dict(dataset="pydoc", eval_datasets="pydoc", whitening_nsamples=4, updating_nsamples=4,
                 model_seq_len=64, eval_limit=4)
    full = dict(dataset="wikitext2", eval_datasets="wikitext2", whitening_nsamples=256, updating_nsamples=16,
                model_seq_len=2048, eval_limit=None)
    defaults = quick if args.quick else full
    return {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}


def sweep(args: argparse.Namespace, extra: list[str]) -> int:
    from utils.io import read_json, write_json
    from scripts.plot_results import load_runs, markdown_table
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    model = args.model or (make_tiny_model(os.path.join(args.out, "models")) if args.quick else "smollm2-135m")
    s = _settings(args)
    common = ["--model", model, "--model_seq_len", str(s["model_seq_len"]), "--eval_datasets", s["eval_datasets"]]
    common += ["--eval_limit", str(s["eval_limit"])] if s["eval_limit"] else []
    common += extra
    calibration = ["--dataset", s["dataset"], "--whitening_nsamples", str(s["whitening_nsamples"]),
                   "--updating_nsamples", str(s["updating_nsamples"])]
    failures = []
    code, _ = _run(["--step", "4", "--results", os.path.join(args.out, "original.json")] + common)
    failures += ["original"] if code else []
    variants = args.variants.split(",")
    stats = os.path.join(args.out, "stats")
    profile_s = 0.0
    if any(VARIANTS[v][1] != "none" for v in variants):
        code, profile_s = _run(["--step", "1", "--stats_path", stats] + calibration + common)
        if code:
            print("error: step 1 (statistics) failed; no whitening variant can run", file=sys.stderr)
            return 1
    steps = "3-5" if args.efficiency else "3-4"
    for variant in variants:
        for ratio in (float(r) for r in args.ratios.split(",")):
            name = f"{variant}_r{ratio:g}"
            save = os.path.join(args.out, "models", name)
            results = os.path.join(args.out, "runs", f"{name}.json")
            argv = (["--step", steps, "--ratio", f"{ratio:g}", "--save_path", save, "--stats_path", stats,
                     "--results", results] + VARIANTS[variant] + calibration + common)
            code, seconds = _run(argv)
            if code:
                failures.append(name)
                continue
            record = read_json(results)
            record["sweep"] = {"variant": variant, "ratio": ratio,
                               "profile_s": round(profile_s, 3) if VARIANTS[variant][1] != "none" else 0.0,
                               "run_s": round(seconds, 3), "command": "python compress.py " + shlex.join(argv)}
            write_json(results, record)
            if not args.keep_models:
                shutil.rmtree(save, ignore_errors=True)
    if not args.keep_models:
        shutil.rmtree(stats, ignore_errors=True)
    table = markdown_table(load_runs([os.path.join(args.out, "original.json"), os.path.join(args.out, "runs")]))
    with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as handle:
        handle.write(f"Model {model}; calibration {s['dataset']} ({s['whitening_nsamples']} x {s['model_seq_len']}); "
                     f"evaluation {s['eval_datasets']} (windows of {s['model_seq_len']}, limit {s['eval_limit']})\n\n")
        handle.write(table)
    print(table, end="")
    if failures:
        print(f"error: failed runs: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    return sweep(args, extra)


if __name__ == "__main__":
    sys.exit(main())
