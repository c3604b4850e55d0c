"""ASVD scaling benchmark (issue 16, "Scaling"): held-out perplexity and time per step.

    OMP_NUM_THREADS=1 python scripts/bench_asvd.py --stats_path /work/cache/stats_smollm2_w64x512 \
        --out scripts/results/bench_asvd/smollm2_cpu.json

One process, the shared protocol (docs: /work/briefs/protocol.md): SmolLM2-135M in float32, 64 x 512
calibration windows from wiki.valid.tokens[0:0.8] (seed 0), perplexity on the first 32 windows of
512 of wiki.valid.tokens[0.8:1]. Step 1's statistics are read from --stats_path when it holds them
(profiled here otherwise); fisher information is collected here on the first --fisher_nsamples
calibration windows (utils.fisher). Per ratio (uniform ranks): plain SVD, ASVD scaling with
abs_mean, abs_max, fisher and fisher_abs_mean (alpha 0.5), and whitening (SVD-LLM). Then abs_mean's
alpha is chosen from --alphas per ratio by perplexity on --select_nsamples windows of a held-back
part of the calibration text (--select_text, never the evaluation slice), and the chosen alpha is
scored on the evaluation slice. Optionally (--column_preserve_rows) whitening + Duo-SVD column
preservation. The JSON is rewritten after every run, so a stopped run keeps what it finished.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "wikitext2", "wiki.valid.tokens")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration", default=DATA + "[0:0.8]")
    p.add_argument("--evaluation", default=DATA + "[0.8:1]")
    p.add_argument("--select_text", default=DATA + "[0.7:0.8]",
                   help="held-back part of the calibration text that chooses alpha (never the evaluation slice)")
    p.add_argument("--select_nsamples", type=int, default=4, help="windows of --select_text scored per alpha")
    p.add_argument("--stats_path", default=None, help="step 1's statistics for exactly this calibration (reused)")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--fisher_nsamples", type=int, default=16, help="calibration windows of the fisher backward")
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--eval_limit", type=int, default=32, help="held-back windows scored")
    p.add_argument("--ratios", default="0.1,0.2,0.4")
    p.add_argument("--methods", default="svd,abs_mean,abs_max,fisher,fisher_abs_mean,whitening")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--alphas", default="0.25,0.5,1", help="abs_mean's alpha candidates ('' to skip the choice)")
    p.add_argument("--column_preserve_rows", action="store_true", help="also whitening + column preservation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.path.join(ROOT, "scripts", "results", "bench_asvd", "smollm2_cpu.json"))
    return p


def options_for(method: str, alpha: float, column_preserve: bool = False):
    from methods import DecomposeOptions
    if method == "svd":
        return DecomposeOptions(whitening="none")
    if method == "whitening":
        return DecomposeOptions(whitening="cholesky", column_preserve=column_preserve)
    return DecomposeOptions(whitening="none", scaling=method, alpha=alpha)


def main(argv: list[str] | None = None) -> dict:
    import torch

    import api
    from evaluater import perplexity
    from utils.data import tokenize
    from utils.fisher import fisher_information
    from utils.io import write_json
    from pipeline.steps import Statistics
    args = build_parser().parse_args(argv)
    start_all = time.perf_counter()
    model, tokenizer = api.load_model(args.model, "auto", args.seed, None)
    windows = api.calibration_windows(args.calibration, tokenizer, args.nsamples, args.seq_len, args.seed)
    eval_ids = tokenize(tokenizer, api.load_text(args.evaluation, "test"))
    select_ids = tokenize(tokenizer, api.load_text(args.select_text, "test"))
    result = {"settings": {**vars(args), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                           "dtype": "float32", "uniform_ranks": True},
              "runs": [], "alpha_choice": [], "partial": True}

    def timed(fn, *a, **k):
        start = time.perf_counter()
        out = fn(*a, **k)
        return out, round(time.perf_counter() - start, 3)

    original, result["original_eval_s"] = timed(perplexity, model, eval_ids, args.seq_len, 1, args.device, args.eval_limit)
    result["original_ppl"] = original["ppl"]
    if args.stats_path and os.path.isfile(os.path.join(args.stats_path, "meta.json")):
        stats = Statistics.open(args.stats_path)
        stats.check_model(model)
        if stats.meta["nsamples"] != args.nsamples or stats.meta["seq_len"] != args.seq_len:
            raise SystemExit(f"error: {args.stats_path} holds {stats.meta['nsamples']} x {stats.meta['seq_len']} windows")
        result["profile_s"] = None
        result["profile_source"] = args.stats_path
        profile_file = args.stats_path.rstrip("/") + ".profile_s.json"
        if os.path.isfile(profile_file):
            from utils.io import read_json
            result["profile_s_recorded"] = read_json(profile_file)
    else:
        stats, result["profile_s"] = timed(api.profile_model, model, windows, args.device)
        result["profile_source"] = "profiled here"
    methods = args.methods.split(",")
    if any(m.startswith("fisher") for m in methods):
        (fisher, summary), result["fisher_s"] = timed(fisher_information, model, windows[:args.fisher_nsamples], args.device)
        result["fisher"] = summary
        stats._fisher = fisher  # in-memory fisher beside the on-disk statistics (what Statistics.fisher serves)
        stats.meta["fisher"] = summary
    write_json(args.out, result)

    def run(ratio: float, method: str, alpha: float, eval_on: str = "evaluation", column_preserve: bool = False) -> dict:
        plan = api.uniform_plan(model, ratio)
        compressed = copy.deepcopy(model)
        options = api.CompressOptions(options_for(method, alpha, column_preserve))
        record, compress_s = timed(api.compress_model, compressed, plan, options, args.device, stats)
        ids, limit = (eval_ids, args.eval_limit) if eval_on == "evaluation" else (select_ids, args.select_nsamples)
        scored, eval_s = timed(perplexity, compressed, ids, args.seq_len, 1, args.device, limit)
        row = {"ratio": ratio, "method": method, "alpha": alpha if method not in ("svd", "whitening") else None,
               "column_preserve": column_preserve, "scored_on": eval_on, "ppl": scored["ppl"],
               "windows": scored["windows"], "compress_s": compress_s, "eval_s": eval_s,
               "removed_fraction": round(plan.removed_fraction(), 6),
               "model_removed_fraction": record["parameters"]["removed_fraction"],
               "fallbacks": record["fallbacks"]}
        if column_preserve:
            kept = {n: r for n, r in record["modules"].items() if r.get("columns_kept")}
            row["column_preserved_modules"] = len(kept)
            row["columns_kept_total"] = sum(r["columns_kept"] for r in kept.values())
            row["mean_error_reduction"] = (round(sum(1 - r["column_error_after"] / r["column_error_before"]
                                                     for r in kept.values()) / len(kept), 6) if kept else 0.0)
        print(f"{method}{' +cp' if column_preserve else ''} alpha {alpha} @ {ratio} ({eval_on}): ppl {scored['ppl']:.3f}, "
              f"compress {compress_s:.1f} s, eval {eval_s:.1f} s", flush=True)
        return row

    ratios = [float(r) for r in args.ratios.split(",")]
    for ratio in ratios:
        for method in methods:
            result["runs"].append(run(ratio, method, args.alpha))
            write_json(args.out, result)
    alphas = [float(a) for a in args.alphas.split(",") if a]
    for ratio in ratios if alphas else []:
        scores = []
        for alpha in alphas:
            row = run(ratio, "abs_mean", alpha, eval_on="selection")
            scores.append(row)
            result["alpha_choice"].append(row)
            write_json(args.out, result)
        best = min(scores, key=lambda r: r["ppl"])
        done = next((r for r in result["runs"] if r["ratio"] == ratio and r["method"] == "abs_mean"
                     and r["alpha"] == best["alpha"]), None)
        if done is None:
            done = run(ratio, "abs_mean", best["alpha"])
            done["alpha_chosen_on_calibration"] = True
            result["runs"].append(done)
        result.setdefault("chosen_alpha", {})[str(ratio)] = {"alpha": best["alpha"], "selection_ppl": best["ppl"],
                                                              "evaluation_ppl": done["ppl"]}
        write_json(args.out, result)
    if args.column_preserve_rows:
        for ratio in ratios:
            result["runs"].append(run(ratio, "whitening", args.alpha, column_preserve=True))
            write_json(args.out, result)
    best_at = {}
    for ratio in ratios:
        rows = [r for r in result["runs"] if r["ratio"] == ratio]
        best = min(rows, key=lambda r: r["ppl"])
        best_at[str(ratio)] = {"method": best["method"], "alpha": best["alpha"], "ppl": best["ppl"],
                               "column_preserve": best["column_preserve"]}
    result["best_at_ratio"] = best_at
    result["total_s"] = round(time.perf_counter() - start_all, 3)
    result["partial"] = False
    write_json(args.out, result)
    stats.close()
    return result


if __name__ == "__main__":
    main()
