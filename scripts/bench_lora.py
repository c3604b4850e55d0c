"""Benchmark of step 7 (issue 19): SVD-LLM's sequential LoRA (U then V) on a whitened SmolLM2.

    python scripts/bench_lora.py --out scripts/results/bench_lora/bench_lora_smollm2_cpu.json

Protocol (docs: the shared benchmark protocol): SmolLM2-135M float32 on the CPU, seed 0; whitened
(cholesky) SVD at each --ratios from the step-1 statistics of 64 x 512 calibration windows of
wiki.valid.tokens[0:0.8] (--stats_path; profiled here only when absent); then LoRA on the u factors
(merged), then on the v factors (merged), trained on windows of --cutoff_len tokens of the SAME
calibration slice (--data; --val_set_size of its windows held out for the validation loss) for
--steps optimizer steps per stage of --batch_size windows. Perplexity on the held-back slice
wiki.valid.tokens[0.8:1] (first 32 windows of 512) of the original model, after compression, after
the U stage and after the V stage; times of every stage. --model_path takes an already compressed
model instead of compressing (e.g. the best refined one), --ratios is then ignored.
--datasets text,alpaca adds a run per model trained on the offline Alpaca-form sample (loss on the
response tokens) instead of text; --datasets alpaca trains on it alone.

The JSON is rewritten (atomically) after every measurement, so an interrupted run keeps its figures.
Quick check that it runs (not a benchmark): --steps 1 --eval_limit 1 --batch_size 2 --micro_batch_size 1
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
WIKI = os.path.join(SHARED, "wikitext2", "wiki.valid.tokens")
ALPACA = os.path.join(SHARED, "alpaca_demo", "alpaca_en_demo.jsonl")
STATS = "/work/cache/stats_smollm2_w64x512"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--model_path", action="append", default=None,
                   help="an already compressed model to fine-tune instead of compressing (repeatable)")
    p.add_argument("--stats_path", default=STATS, help="step-1 statistics of the calibration (profiled if absent)")
    p.add_argument("--ratios", default="0.2,0.6")
    p.add_argument("--calibration", default=WIKI + "[0:0.8]")
    p.add_argument("--evaluation", default=WIKI + "[0.8:1]")
    p.add_argument("--nsamples", type=int, default=64, help="calibration windows (only when profiling here)")
    p.add_argument("--seq_len", type=int, default=512, help="calibration and evaluation window length")
    p.add_argument("--eval_limit", type=int, default=32)
    p.add_argument("--data", default=None, help="LoRA training data (default: the calibration slice)")
    p.add_argument("--datasets", default="text",
                   help=f"comma list of what to train on: text (--data), alpaca ({ALPACA}); each is a run per model")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per stage")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--cutoff_len", type=int, default=256)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--lora_alpha", type=float, default=16)
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--warmup_steps", type=int, default=100, help="capped at a tenth of the steps, as in lora.py")
    p.add_argument("--val_set_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(ROOT, "scripts", "results", "bench_lora", "bench_lora_smollm2_cpu.json"))
    return p


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    torch.set_num_threads(opts.threads)
    import evaluater
    import lora
    from api import (CompressOptions, Statistics, calibration_windows, compress_model, count_parameters,
                     load_compressed, load_model, load_text, profile_model, uniform_plan)
    from utils.data import tokenize
    from utils.io import write_json
    from pipeline.steps import compression_block

    record: dict = {"settings": {**vars(opts), "torch": torch.__version__, "threads": torch.get_num_threads(),
                                 "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                 "load_avg_start": os.getloadavg(), "device": "cpu", "dtype": "float32"},
                    "runs": {}}

    def save() -> None:
        write_json(opts.out, record)

    def perplexity(model) -> dict:
        start = time.perf_counter()
        result = evaluater.perplexity(model, eval_ids, opts.seq_len, 1, "cpu", opts.eval_limit, desc="ppl")
        return {"ppl": result["ppl"], "windows": result["windows"], "tokens": result["tokens"],
                "eval_s": round(time.perf_counter() - start, 3)}

    start = time.perf_counter()
    base, tokenizer = load_model(opts.model, torch.float32, opts.seed)
    record["load_s"] = round(time.perf_counter() - start, 3)
    eval_ids = tokenize(tokenizer, load_text(opts.evaluation, "test"))
    record["original"] = {"parameters": count_parameters(base), **perplexity(base)}
    print(f"original ppl {record['original']['ppl']:.3f}", flush=True)
    save()

    stats = None
    if not opts.model_path:
        if os.path.isfile(os.path.join(opts.stats_path, "meta.json")):
            record["stats"] = {"path": opts.stats_path, "profiled_here": False}
        else:
            windows = calibration_windows(opts.calibration, tokenizer, opts.nsamples, opts.seq_len, opts.seed)
            start = time.perf_counter()
            profile_model(base, windows, "cpu", opts.stats_path, meta={"model": opts.model,
                          "dataset": opts.calibration, "seed": opts.seed}).close()
            record["stats"] = {"path": opts.stats_path, "profiled_here": True,
                               "profile_s": round(time.perf_counter() - start, 3)}
        stats = Statistics.open(opts.stats_path)
        stats.check_model(base)
        record["stats"]["meta"] = {k: stats.meta.get(k) for k in ("dataset", "nsamples", "seq_len", "seed", "tokens")}
        stats.close()

    options = lora.LoraOptions(r=opts.lora_r, alpha=opts.lora_alpha, dropout=opts.lora_dropout,
                               learning_rate=opts.learning_rate, num_epochs=1e9, batch_size=opts.batch_size,
                               micro_batch_size=opts.micro_batch_size, max_steps=opts.steps,
                               warmup_steps=opts.warmup_steps, seed=opts.seed)
    options.check()
    sources = {"text": opts.data or opts.calibration, "alpaca": ALPACA}
    kinds = [kind.strip() for kind in opts.datasets.split(",") if kind.strip()]
    if not kinds or any(kind not in sources for kind in kinds):
        raise SystemExit(f"--datasets {opts.datasets}: a comma list of {', '.join(sources)}")
    datasets = {kind: sources[kind] for kind in kinds}
    examples = {}
    for name, spec in datasets.items():
        examples[name] = lora.load_examples(spec, tokenizer, opts.cutoff_len, opts.val_set_size, opts.seed)
        record.setdefault("data", {})[name] = examples[name].info

    def compressed_models():
        if opts.model_path:
            for path in opts.model_path:
                model, _, block = load_compressed(path, torch.float32)
                yield os.path.basename(os.path.normpath(path)), model, block, None
            return
        for ratio in [float(r) for r in opts.ratios.split(",")]:
            model = copy.deepcopy(base)
            statistics = Statistics.open(opts.stats_path)
            try:
                compressed = compress_model(model, uniform_plan(model, ratio), CompressOptions(), "cpu", statistics)
            finally:
                statistics.close()
            seconds = compressed.pop("seconds")
            yield f"whiten_svd@{ratio:g}", model, compression_block(compressed, opts.model, model, statistics,
                                                                     opts.seed), seconds

    for label, model, block, compress_s in compressed_models():
        params = count_parameters(model)
        compressed_ppl = perplexity(model)
        print(f"{label}: ppl {compressed_ppl['ppl']:.3f} ({params:,} parameters)", flush=True)
        for data_name, data in examples.items():
            tuned = copy.deepcopy(model) if len(examples) > 1 else model
            run = record["runs"][f"{label}+lora_{data_name}"] = {
                "model": label, "ratio": block.get("ratio"), "method": block.get("method"),
                "compress_s": compress_s, "parameters": params, "data": data_name,
                "compressed": compressed_ppl, "stages": []}
            save()
            for factor in lora.FACTORS:
                stage_options = dataclasses.replace(options, stages=(factor,))
                result = lora.sequential_lora(tuned, tokenizer, data, stage_options, "cpu")
                stage = result["stage_records"][0]
                after = perplexity(tuned)
                run["stages"].append({**{k: stage[k] for k in ("factor", "steps", "trainable_parameters", "tokens_seen",
                                                               "train_loss_first", "train_loss_final",
                                                               "val_loss_before", "val_loss_after", "train_loss_curve")},
                                      "stage_s": stage["seconds"], "validation_s": stage["validation_s"],
                                      "s_per_step": round((stage["seconds"] - stage["validation_s"]) / max(1, stage["steps"]), 3),
                                      "ppl_after": after})
                assert count_parameters(tuned) == params
                print(f"{label} + LoRA {factor} ({data_name}): ppl {after['ppl']:.3f} "
                      f"(stage {stage['seconds']:.0f} s)", flush=True)
                save()
            run["ppl_ratio_after_to_compressed"] = round(run["stages"][-1]["ppl_after"]["ppl"] / compressed_ppl["ppl"], 4)
            run["parameters_unchanged"] = count_parameters(tuned) == params
            save()
            del tuned
        del model
        gc.collect()
    record["load_avg_end"] = os.getloadavg()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
