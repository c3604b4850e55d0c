"""Benchmark of issue 19's quality recovery: whitening, the closed-form update, the anchored fit at
several alphas, block refinement (AA-SVD), anchored + block, and per-matrix refinement (GSVD).

    python scripts/bench_refine.py --out scripts/results/bench_refine/bench_refine_smollm2_cpu.json

Protocol (docs/refinement.md): SmolLM2-135M in float32 on the CPU, seed 0;
step-1 statistics of 64 x 512 calibration windows of wiki.valid.tokens[0:0.8] (reused from
--stats_path when it holds them, else profiled here); the update / anchored fit / refinement take
the first N of the same calibration windows (--updating_nsamples, --refine_nsamples); perplexity on
the first 32 windows of 512 tokens of wiki.valid.tokens[0.8:1] (held back; never tuned on), the
original model's figure measured in the same process. Every run compresses a fresh copy of the
model; the JSON is rewritten (atomically) after every run, with "partial": true until the last.

Rows run group by group of ratios (--ratios "0.2,0.6;0.4": the target ratios first), variant by
variant within a group, so the cheap rows of a group are complete first.
"anchored_block" takes, at each ratio, the alpha whose anchored fit gave the lowest perplexity
there (1.0 if none ran). With --save_best DIR the best variant so far at each of --save_ratios is
saved to DIR/ratio_R (replaced when a later row beats it).

A quick check that it runs (seconds):
    python scripts/bench_refine.py --num_layers 2 --ratios 0.4 --nsamples 4 --seq_len 64 --eval_limit 2 \\
        --updating_nsamples 2 --refine_nsamples 2 --gradient_iters 2 --stats_path /tmp/bench_refine_tiny_stats \\
        --out /tmp/bench_refine_tiny.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "wikitext2", "wiki.valid.tokens")
VARIANTS = ("whitening", "closed_form", "anchored_0", "anchored_0.5", "anchored_1", "block", "block_high_lr",
            "anchored_block", "gsvd_matrix")


def parse_variant(variant: str) -> tuple[str, dict]:
    """'block:e8:w16' -> ('block', {'e': 8, 'w': 16}): a variant with its overrides of the shared
    settings: eN epochs, wN refinement windows, uN update / anchored-fit windows, aX the anchored alpha,
    hX the anchored fit's held-out fraction (a fit is kept only where it does better on those windows)."""
    name, *parts = variant.split(":")
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    over: dict = {}
    for part in parts:
        key, value = part[:1], part[1:]
        if key not in "ewuah" or not key or not value:
            raise ValueError(f"variant {variant!r}: overrides are eN (epochs), wN (refinement windows), "
                             f"uN (update windows), aX (anchored alpha), hX (anchored fit's held-out fraction)")
        over[key] = float(value) if key in "ah" else int(value)
    return name, over


def perplexity(model, ids, seq_len, limit) -> dict:
    import evaluater
    result = evaluater.perplexity(model, ids, seq_len, 1, "cpu", limit, desc="ppl")
    return {k: result[k] for k in ("ppl", "windows", "tokens", "seq_len")}


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        json.dump(data, handle, indent=1, allow_nan=False)
        handle.write("\n")
    os.replace(path + ".tmp", path)


def summarize(record: dict, ratios: list[float]) -> None:
    """Best variant per ratio and the issue's targets, from the rows so far (partial runs too)."""
    summary = {}
    for ratio in ratios:
        rows = [r for r in record["runs"] if r["ratio"] == ratio]
        if not rows:
            continue
        best = min(rows, key=lambda r: r["ppl"])
        summary[f"{ratio:g}"] = {"best_variant": best["variant"], "best_ppl": best["ppl"],
                                 "best_over_whitening": best.get("ppl_over_whitening"),
                                 "best_compress_s": best["seconds"]["compress"], "rows": len(rows)}
    record["summary"] = summary
    targets = {"0.2": 0.7, "0.6": 0.3}
    record["targets"] = {k: {"at_most": v, "measured": summary.get(k, {}).get("best_over_whitening"),
                             "met": (summary.get(k, {}).get("best_over_whitening") or 9e9) <= v} for k, v in targets.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration", default=DATA + "[0:0.8]")
    p.add_argument("--evaluation", default=DATA + "[0.8:1]")
    p.add_argument("--nsamples", type=int, default=64, help="calibration windows of step 1")
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ratios", default="0.2,0.6;0.4",
                   help="ratio groups separated by ';': every variant runs on a group before the next group starts")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--skip", default="", help="comma list of VARIANT@RATIO rows not to run (time)")
    p.add_argument("--eval_limit", type=int, default=32, help="evaluation windows (protocol: the first 32)")
    p.add_argument("--updating_nsamples", type=int, default=8)
    p.add_argument("--refine_nsamples", type=int, default=8)
    p.add_argument("--refine_epochs", type=int, default=2)
    p.add_argument("--refine_lr", type=float, default=1e-4)
    p.add_argument("--refine_high_lr", type=float, default=1e-3, help="learning rate of the block_high_lr rows")
    p.add_argument("--refine_batch_size", type=int, default=2)
    p.add_argument("--refine_holdout", type=int, default=0,
                   help="block rows: calibration windows after the trained ones whose block loss is only measured")
    p.add_argument("--gradient_iters", type=int, default=50)
    p.add_argument("--num_layers", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stats_path", default="/work/cache/stats_smollm2_w64x512",
                   help="step-1 statistics of exactly this calibration (profiled here when absent)")
    p.add_argument("--save_best", default=None, help="directory for the best model so far at each --save_ratios")
    p.add_argument("--save_ratios", default="0.2,0.6")
    p.add_argument("--summarize_only", action="store_true",
                   help="rewrite the summary of --out from its rows (for --ratios), run nothing")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows (and the original's figure) of an earlier run's --out JSON and run only the others")
    p.add_argument("--out", default=os.path.join(ROOT, "scripts", "results", "bench_refine",
                                                 "bench_refine_smollm2_cpu.json"))
    opts = p.parse_args(argv)
    variants = opts.variants.split(",")
    try:
        for variant in variants:
            parse_variant(variant)
    except ValueError as error:
        p.error(str(error))
    groups = [[float(r) for r in group.split(",") if r] for group in opts.ratios.split(";")]
    ratios = [r for group in groups for r in group]
    skip = {s for s in opts.skip.split(",") if s}
    save_ratios = {float(r) for r in opts.save_ratios.split(",") if r}
    torch.set_num_threads(opts.threads)
    if opts.summarize_only:  # the rows as they are (a run stopped for time stays partial)
        with open(opts.out) as handle:
            record = json.load(handle)
        summarize(record, ratios)
        write_json(opts.out, record)
        print(json.dumps(record["summary"], indent=1))
        return 0

    from api import (CompressOptions, Statistics, calibration_windows, compress_model, count_parameters,
                     load_model, load_text, profile_model, save_compressed, uniform_plan)
    from methods import AnchoredOptions, RefineOptions, UpdateOptions
    from utils.data import tokenize
    from pipeline.steps import compression_block

    record: dict = {"partial": True,
                    "settings": {**vars(opts), "torch": torch.__version__, "threads": torch.get_num_threads(),
                                 "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                 "load_avg_start": list(os.getloadavg())},
                    "scale_note": (f"update / anchored fit on the first {opts.updating_nsamples}, refinement on the "
                                   f"first {opts.refine_nsamples} of the {opts.nsamples} x {opts.seq_len} calibration "
                                   f"windows (CPU time on a shared 2-core machine); block: {opts.refine_epochs} epochs, "
                                   f"{opts.refine_batch_size} windows per step; GSVD: {opts.gradient_iters} steps per matrix"),
                    "runs": []}
    def save() -> None:
        summarize(record, ratios)
        write_json(opts.out, record)

    start = time.perf_counter()
    base, tokenizer = load_model(opts.model, torch.float32, opts.seed, opts.num_layers)
    record["load_s"] = round(time.perf_counter() - start, 3)
    windows = calibration_windows(opts.calibration, tokenizer, opts.nsamples, opts.seq_len, opts.seed,
                                  vocab_size=base.config.vocab_size)
    if os.path.isfile(os.path.join(opts.stats_path, "meta.json")):
        stats_source, profile_s = "reused", None
        timing = opts.stats_path.rstrip("/") + ".profile_s.json"
        if os.path.isfile(timing):
            with open(timing) as handle:
                profile_s = json.load(handle)
    else:
        stats_source = "profiled"
        start = time.perf_counter()
        profile_model(base, windows, "cpu", opts.stats_path,
                      meta={"model": opts.model, "dataset": opts.calibration, "seed": opts.seed}).close()
        profile_s = round(time.perf_counter() - start, 3)
    record["profile"] = {"stats_path": opts.stats_path, "source": stats_source, "seconds": profile_s}

    eval_ids = tokenize(tokenizer, load_text(opts.evaluation, "test"))
    earlier = None
    if opts.resume and os.path.isfile(opts.out):
        with open(opts.out) as handle:
            earlier = json.load(handle)
        record["runs"] = earlier["runs"]
        record["original"] = {**earlier["original"], "note": "measured by the first process of this resumed run"}
        record["saved_models"] = earlier.get("saved_models", {})
        record["resumed"] = earlier.get("resumed", []) + [{"settings": earlier["settings"]}]
    else:
        start = time.perf_counter()
        record["original"] = {"parameters": count_parameters(base),
                              **perplexity(base, eval_ids, opts.seq_len, opts.eval_limit),
                              "eval_s": round(time.perf_counter() - start, 3)}
    print(f"original: ppl {record['original']['ppl']:.2f}", flush=True)
    save()

    best_alpha: dict[float, tuple[float, float]] = {}  # ratio -> (ppl, alpha)
    best_saved: dict[float, float] = {float(k): v["ppl"] for k, v in record.get("saved_models", {}).items()}
    done = {(r["variant"], r["ratio"]) for r in record["runs"]}

    def consider_alpha(row: dict) -> None:
        """An anchored-fit-alone row sets its ratio's best alpha (for anchored_block) when it is the lowest so far."""
        if row.get("alpha") is not None and not row["variant"].startswith("anchored_block") \
                and row["ppl"] < best_alpha.get(row["ratio"], (float("inf"), 1.0))[0]:
            best_alpha[row["ratio"]] = (row["ppl"], row["alpha"])

    for r in record["runs"]:
        consider_alpha(r)

    def options_of(variant: str, ratio: float) -> CompressOptions:
        name, over = parse_variant(variant)
        updating = over.get("u", opts.updating_nsamples)
        anchored = lambda a: AnchoredOptions(nsamples=updating, alpha=a,  # noqa: E731
                                             holdout_fraction=over.get("h", 0.0))
        block = RefineOptions(target="block", nsamples=over.get("w", opts.refine_nsamples),
                              epochs=over.get("e", opts.refine_epochs),
                              lr=opts.refine_high_lr if name == "block_high_lr" else opts.refine_lr,
                              batch_size=opts.refine_batch_size, holdout=opts.refine_holdout, seed=opts.seed)
        if name == "whitening":
            return CompressOptions()
        if name == "closed_form":
            return CompressOptions(update=UpdateOptions(nsamples=updating))
        if name.startswith("anchored_") and name != "anchored_block":  # anchored_A
            return CompressOptions(update=anchored(float(name.split("_")[1])))
        if name in ("block", "block_high_lr"):
            return CompressOptions(refine=block)
        if name == "anchored_block":
            return CompressOptions(update=anchored(over.get("a", best_alpha.get(ratio, (None, 1.0))[1])), refine=block)
        return CompressOptions(refine=RefineOptions(target="matrix", nsamples=over.get("w", opts.refine_nsamples),
                                                    gradient_iters=opts.gradient_iters, lr=opts.refine_lr,
                                                    batch_size=opts.refine_batch_size, seed=opts.seed))

    for variant, ratio in [(v, r) for group in groups for v in variants for r in group]:
        if f"{variant}@{ratio:g}" in skip or (variant, ratio) in done:
            continue
        model = copy.deepcopy(base)
        options = options_of(variant, ratio)
        stats = Statistics.open(opts.stats_path)
        start = time.perf_counter()
        compression = compress_model(model, uniform_plan(model, ratio), options, "cpu", stats,
                                     windows if options.nsamples else None)
        stats.close()
        compress_s = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        result = perplexity(model, eval_ids, opts.seq_len, opts.eval_limit)
        eval_s = round(time.perf_counter() - start, 3)
        refine = compression.get("refine_losses")
        per = (refine or {}).get("per_block") or (refine or {}).get("per_module") or {}
        row = {"variant": variant, "ratio": ratio, "ppl": result["ppl"], "eval": result,
               "options": options.to_dict(),
               "removed_fraction": compression["parameters"]["removed_fraction"],
               "parameters": compression["parameters"]["compressed"],
               "seconds": {"compress": compress_s, "refine": round(sum(r["seconds"] for r in per.values()), 3)
                           if per else 0.0, "eval": eval_s},
               "refine_lowered": None if refine is None else [refine["lowered"], refine["count"]],
               "refine_loss_ratio_mean": (sum(r["loss_after"] / r["loss_before"] for r in per.values()
                                              if r["loss_before"] > 0) / len(per)) if per else None,
               "updates_accepted": compression.get("updates_accepted")}
        held = [r for r in per.values() if "holdout_after" in r]
        if held:  # the refinement's effect on calibration windows it did not train on
            row["holdout_lowered"] = [refine["holdout_lowered"], len(held)]
            row["holdout_loss_ratio_mean"] = sum(r["holdout_after"] / r["holdout_before"] for r in held) / len(held)
            row["train_loss_before_mean"] = sum(r["loss_before"] for r in held) / len(held)
            row["holdout_loss_before_mean"] = sum(r["holdout_before"] for r in held) / len(held)
        if options.update is not None and isinstance(options.update, AnchoredOptions):
            row["alpha"] = options.update.alpha
            consider_alpha(row)
        record["runs"].append(row)
        whitening = next((r["ppl"] for r in record["runs"] if r["variant"] == "whitening" and r["ratio"] == ratio), None)
        if whitening:
            row["ppl_over_whitening"] = round(result["ppl"] / whitening, 4)
        print(f"{variant} @ {ratio:g}: ppl {result['ppl']:.2f} (compress {compress_s:.0f} s, eval {eval_s:.0f} s)",
              flush=True)
        if opts.save_best and ratio in save_ratios and result["ppl"] < best_saved.get(ratio, float("inf")):
            path = os.path.join(opts.save_best, f"ratio_{ratio:g}")
            shutil.rmtree(path, ignore_errors=True)
            block = compression_block(compression, opts.model, model, stats, opts.seed, opts.num_layers, None)
            save_compressed(model, tokenizer, path, block)
            best_saved[ratio] = result["ppl"]
            record.setdefault("saved_models", {})[f"{ratio:g}"] = {"path": path, "variant": variant,
                                                                   "ppl": result["ppl"]}
        del model
        save()

    summarize(record, ratios)
    record["partial"] = False
    save()
    print(json.dumps(record["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
