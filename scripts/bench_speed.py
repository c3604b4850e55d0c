"""Speed of compressed models against the original, beside the limit their smaller work allows (issue 28).

    OMP_NUM_THREADS=1 python scripts/bench_speed.py                       # CPU, SmolLM2-135M, every row and shape
    python scripts/bench_speed.py --rows original,svd20,gptq4 --shapes b1 --append   # more rows into the same JSON

One process: build (once; saved under --models_dir, reused by later runs) the compressed models
from statistics of a small calibration, through the Python API: whitened SVD (SVD-LLM) at 20 / 40 /
60 %, with ranks rounded to multiples of 8 / 16 / 64 (--rank_multiple), GPTQ 4-bit group 128 of the
original and of the 20 % model. Load them all (float32; fused shared inputs unless the row says
unfused; quantized linears on torch's low-bit CPU kernels with bfloat16 activations unless it says
dequant: then de-quantized per forward in float32) and time them
with evaluater.measure_efficiency, every model once per repetition in turn, median of --repeats:

    b1   prompts 1 x 512, 128 greedy new tokens with the KV cache: prefill 1 x 512 and decode batch 1
    p8   prompts 8 x 512: prefill 8 x 512 (one decode step, not reported)
    b16  prompts 16 x 64, 128 new tokens: decode batch 16

The limit of a ratio is what the model's smaller work allows: for decode, the original's weight
bytes read per step (the decoder layers' linears, factors or packed codes with their scales, plus
the lm_head) over the model's; for prefill, multiply-adds per token (the linears, and attention
scores and values at the average causal context, which compression does not change; the lm_head
runs once per prompt). Each ratio is reported with its limit and as a fraction of it. With
--fixed_cost the original is also timed with every linear a free stub: the share of its step that
compression cannot shrink (norms, rotary, attention over the cache, per-op overhead); a ratio is
then also given against what the limit allows once that share is kept ("attainable": the
original's step time over fixed + linear time / limit). Perplexity
(held-back text) is measured for every row. The JSON is rewritten after every phase; a run cut
short leaves "partial": true.

Quick check that it runs (not a benchmark):
    python scripts/bench_speed.py --num_layers 2 --nsamples 2 --seq_len 64 --prompt_len 64 --gen_len 4 \\
        --repeats 1 --eval_limit 1 --rows original,svd40,svd40_unfused,gptq4 --models_dir /tmp/bs_models --out /tmp/bs.json
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
from torch import nn  # noqa: E402

RESULTS = os.path.join(ROOT, "scripts", "results", "bench_speed")

# row -> (saved model it loads, or None for the original; load options)
#   saved model name -> (SVD ratio or None, rank multiple, GPTQ (bits, groupsize) or None)
MODELS = {
    "svd20": (0.2, 1, None), "svd40": (0.4, 1, None), "svd60": (0.6, 1, None),
    "svd20_r8": (0.2, 8, None), "svd40_r8": (0.4, 8, None), "svd60_r8": (0.6, 8, None),
    "svd20_r16": (0.2, 16, None), "svd40_r16": (0.4, 16, None), "svd60_r16": (0.6, 16, None),
    "svd20_r64": (0.2, 64, None), "svd40_r64": (0.4, 64, None), "svd60_r64": (0.6, 64, None),
    "gptq4": (None, 1, (4, 128)), "svd20_gptq4": (0.2, 1, (4, 128)),
}
ROWS = {"original": None, **{name: name for name in MODELS},
        **{f"{name}_unfused": name for name in ("svd20", "svd40", "svd60")},
        **{f"{name}_dequant": name for name in ("gptq4", "svd20_gptq4")}}
DEFAULT_ROWS = ["original", "svd20", "svd40", "svd60", "gptq4", "svd20_gptq4"]
SHAPES = {"b1": ("prompts 1 x L, decode batch 1", 1), "p8": ("prompts 8 x L (prefill only)", 8),
          "b16": ("prompts 16 x 64, decode batch 16", 16)}


def describe(row: str) -> str:
    name = ROWS[row]
    if name is None:
        return "original (float32)"
    ratio, multiple, quant = MODELS[name]
    parts = [f"whitened SVD {ratio:.0%}" if ratio else "original"]
    if multiple > 1:
        parts.append(f"ranks multiple of {multiple}")
    if quant:
        parts.append(f"GPTQ {quant[0]}-bit g{quant[1]}")
    if row.endswith("_unfused"):
        parts.append("q/k/v and gate/up v factors unfused")
    if row.endswith("_dequant"):
        parts.append("de-quantized per forward")
    return ", ".join(parts)


def decode_weight_bytes(model: nn.Module) -> int:
    """Weight bytes one decode step reads: the decoder layers' linears (dense, factors, or packed
    codes with scales and zeros) and the lm_head; embeddings read one row, norms are negligible."""
    from component.quant_linear import QuantLinear
    from utils.model import decoder_layers
    total = 0
    for module in decoder_layers(model).modules():
        if type(module) is nn.Linear:
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
        elif isinstance(module, QuantLinear):
            total += sum(t.numel() * t.element_size() for name, t in module.named_buffers(recurse=False)
                         if name != "weight_cache")
            total += 0 if module.bias is None else module.bias.numel() * module.bias.element_size()
    head = model.get_output_embeddings().weight
    return total + head.numel() * head.element_size()


def prefill_macs_per_token(model: nn.Module, prompt_len: int) -> float:
    """Multiply-adds per prompt token: the decoder layers' linears, plus attention's scores and
    weighted values at the average causal context (prompt_len + 1) / 2."""
    from evaluater import linear_flops_per_token
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attention = 2 * heads * head_dim * (prompt_len + 1) / 2 * config.num_hidden_layers
    return linear_flops_per_token(model) / 2 + attention


def build_models(names: list[str], args, tokenizer, original: nn.Module) -> dict:
    """Save every missing model of `names` under --models_dir; returns how each was built."""
    from methods.quantize import QuantizeOptions
    from utils.data import calibration_windows
    from utils.io import save_compressed
    from utils.model import count_parameters, target_shapes
    from pipeline.steps import CompressOptions, compress_model, compression_block, profile_model, quantize_model, \
        uncompressed_block
    from utils.plan import Plan
    missing = [n for n in names if not os.path.isfile(os.path.join(args.models_dir, n, "config.json"))]
    built = {}
    if not missing:
        return built
    windows = calibration_windows(args.calibration, tokenizer, args.nsamples, args.seq_len, args.seed,
                                  original.config.vocab_size)
    stats = None
    for name in missing:
        ratio, multiple, quant = MODELS[name]
        start = time.perf_counter()
        model = copy.deepcopy(original)
        if ratio is None:
            block = uncompressed_block(args.model, model, args.seed, args.num_layers)
        else:
            if stats is None:
                stats = profile_model(original, windows, args.device)
            plan = Plan.uniform(target_shapes(model), ratio)
            if multiple > 1:
                plan = plan.round_ranks(multiple)
            compressed = compress_model(model, plan, CompressOptions(), args.device, stats)
            block = compression_block(compressed, args.model, model, stats, args.seed, args.num_layers)
        if quant:
            section = quantize_model(model, QuantizeOptions("gptq", quant[0], quant[1]), args.device,
                                     windows[:args.gptq_nsamples], {"dataset": args.calibration, "seed": args.seed})
            block = {**block, "quantization": section}
        save_compressed(model, tokenizer, os.path.join(args.models_dir, name), block)
        built[name] = {"build_s": round(time.perf_counter() - start, 1), "parameters": count_parameters(model)}
        print(f"built {name} in {built[name]['build_s']} s", flush=True)
        del model
        gc.collect()
    if stats is not None:
        stats.close()
    return built


class FreeLinear(nn.Module):
    """A linear that costs nothing: the right shape of zeros, made once per input shape."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.outputs: dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.out_features)
        if shape not in self.outputs:
            self.outputs[shape] = torch.zeros(shape, dtype=x.dtype, device=x.device)
        return self.outputs[shape]


def without_linears(original: nn.Module) -> nn.Module:
    """A copy of `original` whose linears (the decoder layers' and the lm_head) are FreeLinear: its
    time is the part of a step that compression does not shrink (norms, rotary, attention over the
    cache, activations, residuals, the framework's per-op overhead)."""
    model = copy.deepcopy(original)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, FreeLinear(child.out_features))
    return model.eval()


def attainable(ratio_limit: float, step_s: float, fixed_s: float) -> float:
    """The ratio a model with `ratio_limit` times less linear work attains when the original's step
    of step_s seconds holds fixed_s seconds that compression does not shrink."""
    return step_s / (fixed_s + (step_s - fixed_s) / ratio_limit)


def load_row(row: str, args, original: nn.Module) -> nn.Module:
    from component.quant_linear import set_low_bit_kernel
    from utils.io import load_compressed
    if ROWS[row] is None:
        return original
    from utils.model import DTYPES
    model, _, _ = load_compressed(os.path.join(args.models_dir, ROWS[row]), DTYPES[args.dtype],
                                  fuse=not row.endswith("_unfused"))
    # quantized rows: torch's low-bit kernels, which are fast with bfloat16 activations only (the
    # float32 model's quantized layers round their inputs and outputs to bfloat16); _dequant rows:
    # de-quantize per forward in float32 (exact)
    set_low_bit_kernel(model, None if row.endswith("_dequant") else torch.bfloat16, cast=True)
    return model.to(args.device).eval()


def kernels(model: nn.Module, dequant: bool) -> dict[str, int]:
    """How many quantized linears take each matmul path (CPU)."""
    from component.quant_linear import QuantLinear
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            path = "dequantize (asked)" if dequant else module.kernel()
            path += "" if path.startswith("dequantize") else " (bfloat16 activations)"
            counts[path] = counts.get(path, 0) + 1
    return counts


def prompts_for(shape: str, ids: torch.Tensor, args) -> torch.Tensor:
    batch = SHAPES[shape][1]
    length = 64 if shape == "b16" else args.prompt_len
    need = batch * length
    if ids.numel() < need:
        ids = ids.repeat(-(-need // ids.numel()))
    return ids[:need].view(batch, length)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration", default="pydoc[0:0.9]")
    p.add_argument("--evaluation", default="pydoc[0.9:1]", help="held-back text: perplexity and the prompts")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows of --seq_len (profile and GPTQ)")
    p.add_argument("--gptq_nsamples", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--eval_limit", type=int, default=8, help="perplexity windows of --seq_len tokens (0: none)")
    p.add_argument("--prompt_len", type=int, default=512)
    p.add_argument("--gen_len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--shapes", default="b1,p8,b16", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--fixed_cost", action="store_true",
                   help="also time the original with every linear free (a stub): what compression cannot shrink")
    p.add_argument("--num_layers", type=int, default=None, help="first N decoder layers only (quick checks)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models_dir", default=os.path.join(RESULTS, "models"), help="built models (git-ignored)")
    p.add_argument("--out", default=os.path.join(RESULTS, "smollm2_cpu.json"))
    p.add_argument("--append", action="store_true", help="merge into --out instead of starting it anew")
    p.add_argument("--build_only", action="store_true", help="build the rows' models and stop")
    p.add_argument("--table", action="store_true", help="print the markdown table and the plot of --out, and stop")
    p.add_argument("--merge", default=None, help="comma list of JSON of other runs (other rows or shapes, each "
                                                 "against its own original): merge into --out, table, plot, stop")
    p.add_argument("--plot", default=None, help="PNG of the ratios against their limits (default: --out with .png)")
    args = p.parse_args(argv)
    rows, shapes = args.rows.split(","), args.shapes.split(",")
    for value, known, what in ((rows, ROWS, "row"), (shapes, SHAPES, "shape")):
        unknown = [v for v in value if v not in known]
        if unknown:
            print(f"error: unknown {what} {unknown[0]!r}; choose from {', '.join(known)}", file=sys.stderr)
            return 2
    if "original" not in rows:
        rows.insert(0, "original")  # every ratio is against it, measured in the same process

    import evaluater
    from utils.data import load_text, tokenize
    from utils.io import read_json, write_json
    if args.merge:
        result = read_json(args.out)
        for path in args.merge.split(","):
            other = read_json(path)
            for row, entry in other["rows"].items():
                target = result["rows"].setdefault(row, {k: v for k, v in entry.items() if k != "shapes"})
                target.setdefault("shapes", {}).update(entry.get("shapes", {}))
                if "perplexity" not in target and "perplexity" in entry:
                    target["perplexity"] = entry["perplexity"]
            result["runs"] += other.get("runs", [])
            result["partial"] = result.get("partial") or other.get("partial")
        write_json(args.out, result)
    if args.table or args.merge:
        result = read_json(args.out)
        plot(result, args.plot or os.path.splitext(args.out)[0] + ".png")
        print(markdown(result))
        return 0
    from utils.model import load_model

    started = time.perf_counter()
    result = read_json(args.out) if args.append and os.path.isfile(args.out) else {"rows": {}}
    result.update({"benchmark": "bench_speed", "model": args.model, "num_layers": args.num_layers, "partial": True})
    settings = {"device": args.device, "dtype": args.dtype, "calibration": args.calibration,
                "nsamples": args.nsamples, "seq_len": args.seq_len, "evaluation": args.evaluation,
                "eval_limit": args.eval_limit, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
                "repeats": args.repeats, "warmup": 1, "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                "timing": "evaluater.measure_efficiency: every model once per repetition in turn, median"}
    result.setdefault("runs", []).append({"rows": rows, "shapes": shapes, "settings": settings})
    result["settings"] = settings

    original, tokenizer = load_model(args.model, args.dtype, args.seed, args.num_layers)
    original.eval()
    os.makedirs(args.models_dir, exist_ok=True)
    built = build_models(list(dict.fromkeys(ROWS[r] for r in rows if ROWS[r])), args, tokenizer, original)
    if args.build_only:
        return 0
    original.to(args.device)
    models = {row: load_row(row, args, original) for row in rows}
    if tokenizer is not None:
        ids = tokenize(tokenizer, load_text(args.evaluation, "test"))
    else:
        ids = torch.randint(0, original.config.vocab_size, (1 << 16,), generator=torch.Generator().manual_seed(args.seed))

    base_bytes = decode_weight_bytes(original)
    base_macs = prefill_macs_per_token(original, args.prompt_len)
    for row, model in models.items():
        entry = result["rows"].setdefault(row, {})
        entry.update({"description": describe(row), "decode_weight_bytes": decode_weight_bytes(model),
                      "prefill_macs_per_token": prefill_macs_per_token(model, args.prompt_len),
                      "quantized_kernels": kernels(model, row.endswith("_dequant"))})
        entry["limits"] = {"decode": base_bytes / entry["decode_weight_bytes"],
                           "prefill": base_macs / entry["prefill_macs_per_token"]}
        if ROWS[row] in built:
            entry["build"] = built[ROWS[row]]
        entry.setdefault("shapes", {})
    write_json(args.out, result)

    timed = {**models, "no_linears": without_linears(original)} if args.fixed_cost else models
    for shape in shapes:
        prompts = prompts_for(shape, ids, args)
        gen_len = 1 if shape == "p8" else args.gen_len
        figures = evaluater.measure_efficiency(timed, prompts, gen_len, args.repeats, args.device, memory=False)
        base = figures["original"]
        free = figures.get("no_linears")
        for row in rows:
            f, entry = figures[row], result["rows"][row]
            batch, length = prompts.shape
            found = {}
            if shape in ("b1", "p8"):
                found[f"prefill_{batch}x{length}"] = ("prefill", f["prefill_tokens_per_s"], base["prefill_tokens_per_s"],
                                                      f["runs"]["prefill_tokens_per_s"])
            if shape in ("b1", "b16"):
                found[f"decode_b{batch}"] = ("decode", f["decode_tokens_per_s"], base["decode_tokens_per_s"],
                                             f["runs"]["decode_tokens_per_s"])
            for key, (kind, value, reference, runs) in found.items():
                ratio = value / reference
                entry["shapes"][key] = {"tokens_per_s": value, "ratio": ratio, "limit": entry["limits"][kind],
                                        "fraction_of_limit": ratio / entry["limits"][kind],
                                        "runs_tokens_per_s": runs, "load_average_1min": round(os.getloadavg()[0], 2)}
                if free is not None:
                    # seconds per token of the original and of its steps without the linears' work
                    fixed_share = reference / free[f"{kind}_tokens_per_s"]
                    reach = attainable(entry["limits"][kind], 1.0, fixed_share)
                    entry["shapes"][key].update({"fixed_share_of_original": fixed_share, "attainable": reach,
                                                 "fraction_of_attainable": ratio / reach})
            if shape == "b1":
                entry["decode_latency_ms"] = f["decode_latency_ms"]
        result["settings"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        write_json(args.out, result)
        print(f"shape {shape} (ratio / limit):", flush=True)
        for row in rows:
            shown = {k: f"{v['ratio']:.3f}x / {v['limit']:.3f}x" for k, v in result["rows"][row]["shapes"].items()}
            print(f"  {row}: {shown}", flush=True)

    if args.eval_limit and tokenizer is not None:
        for row, model in models.items():
            start = time.perf_counter()
            ppl = evaluater.perplexity(model, ids, args.seq_len, 1, args.device, args.eval_limit, desc=f"ppl {row}")
            result["rows"][row]["perplexity"] = {"ppl": ppl["ppl"], "windows": ppl["windows"],
                                                 "seq_len": args.seq_len, "eval_s": round(time.perf_counter() - start, 1)}
            print(f"  {row}: perplexity {ppl['ppl']:.4f}", flush=True)
            write_json(args.out, result)

    result["partial"] = False
    result["total_s"] = round(time.perf_counter() - started, 1)
    write_json(args.out, result)
    plot(result, args.plot or os.path.splitext(args.out)[0] + ".png")
    print(markdown(result))
    print(f"-> {args.out} ({result['total_s']:.0f} s)")
    return 0


def markdown(result: dict) -> str:
    """The README table: per row, each measured ratio with its limit and the fraction of it, and perplexity."""
    keys = sorted({k for entry in result["rows"].values() for k in entry.get("shapes", {})},
                  key=lambda k: (not k.startswith("prefill"), k))
    lines = ["| model | " + " | ".join(f"{k}: x orig. / limit" for k in keys) + " | perplexity |",
             "|---|" + "---|" * (len(keys) + 1)]
    for row, entry in result["rows"].items():
        cells = []
        for key in keys:
            f = entry.get("shapes", {}).get(key)
            cells.append("" if f is None else f"{f['ratio']:.2f} / {f['limit']:.2f} ({f['fraction_of_limit']:.0%})"
                         + (f"; {f['attainable']:.2f} ({f['fraction_of_attainable']:.0%})" if "attainable" in f else ""))
        ppl = (entry.get("perplexity") or {}).get("ppl")
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {'' if ppl is None else f'{ppl:.3f}'} |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """One panel per measured shape: each row's speed ratio (bar) and its limit (black tick)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    rows = [r for r in result["rows"] if r != "original"]
    keys = sorted({k for r in rows for k in result["rows"][r].get("shapes", {})})
    if not rows or not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 0.45 * len(rows) + 1.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        shown = [r for r in rows if key in result["rows"][r]["shapes"]]
        ratios = [result["rows"][r]["shapes"][key]["ratio"] for r in shown]
        limits = [result["rows"][r]["shapes"][key]["limit"] for r in shown]
        positions = range(len(shown))
        ax.barh(positions, ratios, color="tab:blue", label="measured")
        ax.scatter(limits, positions, marker="|", s=300, color="black", label="limit")
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_yticks(list(positions), shown)
        ax.invert_yaxis()
        ax.set_title(f"{key}: speed vs original")
        ax.set_xlabel("x original")
    axes[0][0].legend(loc="best")
    fig.suptitle(f"{result['model']} on {result['settings']['device']} ({result['settings']['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot -> {path}")


if __name__ == "__main__":
    sys.exit(main())
