"""Write the measured tables of README.md and docs/ from the result JSONs under scripts/results/.

Every table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->` in a markdown file and is
preceded, inside the markers, by one line saying what it measured: the evaluation slice, the number
of windows and tokens per window, the calibration, and the date the result JSON was committed. So
two tables of the same method on different slices or window counts say why their figures differ.

    python scripts/write_tables.py            # rewrite the tables in place
    python scripts/write_tables.py --check    # exit 1, naming each table, if a file differs from the JSONs

A table is a function of its JSON files (and of the toolkit defaults it reports) only; nothing is measured here.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "scripts", "results")
if ROOT not in sys.path:  # run as a script: the toolkit's modules (the defaults a table states)
    sys.path.insert(0, ROOT)


def _load(relative: str) -> dict:
    with open(os.path.join(RESULTS, relative), encoding="utf-8") as handle:
        return json.load(handle)


def _date(*relatives: str) -> str:
    """The last commit date of the result files (the day they were measured and recorded)."""
    paths = [os.path.join(RESULTS, r) for r in relatives]
    try:
        done = subprocess.run(["git", "-C", RESULTS, "log", "-1", "--format=%cs", "--", *paths],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "date unknown"
    return done.stdout.strip() or "not committed yet"


def _slice(path: str) -> str:
    """A data set spec without the machine's folders: wiki.valid.tokens[0.8:1]."""
    return os.path.basename(path)


def _ppl(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _caption(evaluation: str, windows: int, seq_len: int, calibration: str, nsamples: int, sources: list[str],
             extra: str = "") -> str:
    return (f"*Perplexity on the first {windows} windows of {seq_len} tokens of {_slice(evaluation)}; whitening "
            f"from {nsamples} x {seq_len} windows of {_slice(calibration)}{extra}. "
            f"`{'`, `'.join('scripts/results/' + s for s in sources)}`, {_date(*sources)}.*")


# ------------------------------------------------------------------------------------------ tables

def table_update() -> str:
    """The closed-form update against whitening alone (scripts/sweep.py runs)."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(RESULTS, "update_smollm2_cpu", "runs", "*.json"))):
        with open(path, encoding="utf-8") as handle:
            run = json.load(handle)
        runs[(run["sweep"]["variant"], run["sweep"]["ratio"])] = run
    first = runs[("whiten_svd", 0.2)]
    key = next(iter(first["perplexity"]))
    ppl = {k: r["perplexity"][key] for k, r in runs.items()}
    calibration = first["compression"]["calibration"]
    update = runs[("whiten_svd_update", 0.2)]["compression"]
    original = _load("update_smollm2_cpu/original.json")["perplexity"][key]["ppl"]
    lines = [_caption(key, ppl[("whiten_svd", 0.2)]["windows"], calibration["seq_len"], calibration["dataset"],
                      calibration["nsamples"], ["update_smollm2_cpu/"],
                      f"; the update on {update['updating_nsamples']} of them; the original model: {original:.2f}"),
             "",
             "| removed | whitening only | + update (sequential) | change | updates kept | compress time (1 thread) |",
             "|---|---|---|---|---|---|"]
    for ratio in sorted({r for _, r in runs}):
        base, new = ppl[("whiten_svd", ratio)]["ppl"], ppl[("whiten_svd_update", ratio)]["ppl"]
        change = new / base - 1
        record = runs[("whiten_svd_update", ratio)]["compression"]
        kept = record["updates_accepted"]
        kept = f"{kept} of {record['ranks']['matrices']}" if kept is not None else "-"
        times = (f"{runs[('whiten_svd', ratio)]['timings']['compress_s']:.0f} s -> "
                 f"{runs[('whiten_svd_update', ratio)]['timings']['compress_s']:.0f} s")
        lines.append(f"| {ratio:.0%} | {base:.2f} | {new:.2f} | {change:+.1%}{' (worse)' if change > 0 else ''} "
                     f"| {kept} | {times} |")
    return "\n".join(lines)


ALLOCATION_ROWS = [("uniform", False, "uniform"), ("v2", False, "v2"), ("asvd_ppl", False, "asvd ppl"),
                   ("asvd_stable_rank", False, "asvd stable_rank"), ("duo", False, "duo"),
                   ("uniform", True, "uniform + `--column_preserve`"), ("duo", True, "duo + `--column_preserve`"),
                   ("asvd_ppl", True, "asvd ppl + `--column_preserve`")]


def table_allocation() -> str:
    """Rank allocations at 20/40/60% (scripts/bench_allocation.py, merged JSON)."""
    source = "bench_allocation/smollm2_cpu_merged.json"
    data = _load(source)
    settings = data["settings"]
    ratios = [0.2, 0.4, 0.6]
    ppl = {(r["ratio"], r["allocation"], r["column_preserve"]): r["ppl"] for r in data["runs"]}
    windows = {r["windows"] for r in data["runs"]}
    lines = [_caption(settings["evaluation"], min(windows), settings["seq_len"], settings["calibration"],
                      settings["nsamples"], [source], f"; the original model: {data['original_ppl']:.2f}; "
                      f"sensitivity passes scaled to the CPU (the JSON's notes)"),
             "",
             "| allocation | " + " | ".join(f"{r:.0%} removed" for r in ratios) + " |",
             "|---|" + "---|" * len(ratios)]
    for allocation, preserve, label in ALLOCATION_ROWS:
        cells = [ppl.get((r, allocation, preserve)) for r in ratios]
        if any(c is not None for c in cells):
            lines.append(f"| {label} | " + " | ".join(_ppl(c) if c is not None else "not run" for c in cells) + " |")
    return "\n".join(lines)


TASKS = [("arc_challenge_local", "ARC-C"), ("arc_easy_local", "ARC-E"), ("boolq_local", "BoolQ"),
         ("openbookqa_local", "OBQA"), ("piqa_local", "PIQA"), ("winogrande_local", "WinoGrande")]


def table_tasks(detailed: bool = False) -> str:
    """Zero-shot accuracy on the local tasks (scripts/bench_tasks.py); `detailed` adds the parameter
    count and the mean acc_norm (docs/evaluation.md)."""
    source = "bench_tasks_smollm2_cpu.json"
    data = _load(source)
    settings = data["settings"]
    norm_tasks = len(data["original"]["acc_norm_tasks"])
    extra = (" | params", f" | mean acc | mean acc_norm ({norm_tasks} tasks) |") if detailed else ("", " | mean |")
    lines = [f"*First {settings['limit']} documents of each task, zero-shot acc; whitening from "
             f"{settings['nsamples']} x {settings['seq_len']} windows of {_slice(settings['calibration'])}. "
             f"`scripts/results/{source}`, {_date(source)}.*",
             "",
             "| model" + extra[0] + " | " + " | ".join(label for _, label in TASKS) + extra[1],
             "|---|" + "---|" * (len(TASKS) + (3 if detailed else 1))]

    def row(label: str, record: dict) -> str:
        accs = [record["tasks"][task]["acc"] for task, _ in TASKS]
        parameters = record["parameters"]
        parameters = parameters["compressed"] if isinstance(parameters, dict) else parameters
        cells = f"| {label} | " + (f"{parameters / 1e6:.1f}M | " if detailed else "")
        cells += " | ".join(f"{a:.2f}" for a in accs) + f" | {record['mean_acc']:.3f} |"
        return cells + (f" {record['mean_acc_norm']:.3f} |" if detailed else "")
    lines.append(row("original", data["original"]))
    for ratio, record in sorted(data["whiten_svd"].items(), key=lambda item: float(item[0])):
        lines.append(row(f"whitened SVD {float(ratio):.0%}", record))
    return "\n".join(lines)


def table_tasks_detailed() -> str:
    return table_tasks(detailed=True)


def table_save_dtype() -> str:
    """README's first command's model in each dtype it can be saved in (step 4 on one saved model)."""
    source = "save_dtype_smollm2_cpu.json"
    data = _load(source)
    runs = data["runs"]
    first = runs["float32"]
    lines = [f"*README's first command (ratio 0.2, computed in float32); perplexity on the first {first['windows']} "
             f"windows of {first['seq_len']} tokens of {data['evaluation']}, each dtype evaluated by step 4 "
             f"`--dtype` on the same compressed weights; the GGUF it came from: {data['gguf_bytes'] / 1e6:.0f} MB. "
             f"`scripts/results/{source}`, {_date(source)}.*",
             "",
             "| saved dtype | model.safetensors | perplexity | change |",
             "|---|---|---|---|"]
    for dtype in ("float32", "bfloat16", "float16"):
        run = runs[dtype]
        change = run["ppl"] / first["ppl"] - 1
        lines.append(f"| {dtype} | {run['model_bytes'] / 1e6:.0f} MB | {run['ppl']:.4f} | {change:+.2%} |")
    return "\n".join(lines)


def table_rsvd() -> str:
    """Randomized against exact SVD on synthetic matrices (scripts/bench_rsvd.py), at the defaults."""
    from utils.rsvd import DEFAULT_N_ITER, DEFAULT_OVERSAMPLES
    source = "bench_rsvd_cpu.json"
    data = _load(source)
    settings = data["settings"]
    lines = [f"*{settings['threads']} CPU threads, spectrum s_i = i^-{settings['alpha']:g}, oversamples "
             f"{DEFAULT_OVERSAMPLES}, {DEFAULT_N_ITER} iterations (the defaults), the route `auto` picks; "
             f"time ratio and extra truncation loss against the exact SVD. `scripts/results/{source}`, {_date(source)}.*",
             "",
             "| matrix | 20% removed | 40% | 60% |",
             "|---|---|---|---|"]
    for row, (shape, record) in enumerate(data["synthetic"].items()):
        runs = {r["ratio"]: r for r in record["runs"] if r["method"].startswith("rsvd-auto")
                and r["oversamples"] == DEFAULT_OVERSAMPLES and r["n_iter"] == DEFAULT_N_ITER}
        words = row == 0  # the first cell says what the figures are
        cells = [f"{runs[r]['speedup']:.2f}x{' faster' if words and r == 0.2 else ''}, "
                 f"{runs[r]['excess_vs_exact']:+.2%}{' loss' if words and r == 0.2 else ''}" for r in (0.2, 0.4, 0.6)]
        lines.append(f"| {shape.replace('x', ' x ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


QUANT_LABELS = {"original_fp16": "original, float16", "svdllm20_fp16": "SVD-LLM 20%, float16",
                "svdllm40_fp16": "SVD-LLM 40%, float16", "svdllm20_rtn8": "SVD-LLM 20% + RTN int8 per channel",
                "gptq4_g128": "GPTQ 4-bit g128", "rtn4_g128": "RTN 4-bit g128 (reference)",
                "svdllm75_fp16": "SVD-LLM 75%, float16", "svdllm20_gptq4_g128": "SVD-LLM 20% + GPTQ 4-bit g128",
                "gptq3_g128": "GPTQ 3-bit g128", "rtn3_g128": "RTN 3-bit g128 (reference)"}


def table_quant() -> str:
    """Low rank against quantization at equal bytes (scripts/bench_quant.py, two runs)."""
    sources = ["bench_quant_smollm2_cpu.json", "bench_quant_smollm2_cpu_rtn.json"]
    main = _load(sources[0])
    settings = main["settings"]
    points = {k: v for source in sources for k, v in _load(source)["points"].items()}
    first = points["original_fp16"]["perplexity"]
    lines = [_caption(settings["evaluation"], first["windows"], first["seq_len"], settings["calibration"],
                      settings["nsamples"], sources, f"; GPTQ on the first {settings['gptq_nsamples']} of them; "
                      f"floats stored in {settings['stored_float_dtype']}, computed in {settings['compute_dtype']}"),
             "",
             "| point | perplexity | linear weights on disk | bits / weight | of float16 | file | time to make |",
             "|---|---|---|---|---|---|---|"]
    mib = 2 ** 20
    order = sorted(points, key=lambda k: (-points[k]["storage"]["linear_bytes"], k.startswith("rtn")))
    for key in order:
        point, storage = points[key], points[key]["storage"]
        time = ("-" if key == "original_fp16" else
                f"{point['compress_s']:.0f} s" + (" + profile" if key.startswith("svdllm") else ""))
        lines.append(f"| {QUANT_LABELS.get(key, point['description'])} | {point['perplexity']['ppl']:.2f} "
                     f"| {storage['linear_bytes'] / mib:.1f} MiB | {storage['bits_per_weight']:.2f} "
                     f"| {storage['fraction_of_fp16']:.1%} | {point['file_bytes'] / mib:.1f} MiB | {time} |")
    return "\n".join(lines)


def table_efficiency() -> str:
    """Perplexity and speed of whitened SVD at 20/40/60% (scripts/sweep.py --efficiency)."""
    source = "efficiency_smollm2_cpu/"
    runs = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "efficiency_smollm2_cpu", "runs", "*.json"))):
        with open(path, encoding="utf-8") as handle:
            runs.append(json.load(handle))
    runs.sort(key=lambda run: run["sweep"]["ratio"])
    first = runs[0]
    key = next(iter(first["perplexity"]))
    original = _load("efficiency_smollm2_cpu/original.json")["perplexity"][key]["ppl"]
    calibration, speed = first["compression"]["calibration"], first["efficiency"]["settings"]
    lines = [_caption(key, first["perplexity"][key]["windows"], first["perplexity"][key]["seq_len"],
                      calibration["dataset"], calibration["nsamples"], [source],
                      f" (seq_len {calibration['seq_len']}); step 5: a {speed['prefill_len']}-token prompt, batch "
                      f"{speed['batch_size']}, {speed['gen_seq_len']} greedy tokens, median of {speed['repeats']} after "
                      f"{speed['warmup']} warm-up, {speed['dtype']}, threads: {speed['torch_threads']}, load average "
                      f"about {speed['load_average_1min']:.0f}; linear work is 1 - ratio (every matrix keeps that "
                      f"share of its parameters) and the ideal speedup its inverse"),
             "",
             f"| ratio | params kept | linear work | ppl (original {original:.2f}) | prefill speedup (ideal) "
             f"| decode speedup |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        ratio, ratios = run["sweep"]["ratio"], run["efficiency"]["ratios"]
        lines.append(f"| {ratio} | {ratios['parameters']:.3f} | {1 - ratio:.2f} | {run['perplexity'][key]['ppl']:.1f} "
                     f"| {ratios['prefill_throughput']:.2f}x ({1 / (1 - ratio):.2f}x) "
                     f"| {ratios['decode_throughput']:.2f}x |")
    return "\n".join(lines)


REFINE = "bench_refine/bench_refine_smollm2_cpu.json"
REFINE_EPOCHS = "bench_refine/bench_refine_epochs_smollm2_cpu.json"
REFINE_EPOCHS_60 = "bench_refine/bench_refine_epochs_60_smollm2_cpu.json"
LORA_ON_REFINED = "bench_lora/bench_lora_on_block_refined_smollm2_cpu.json"
LORA_ON_REFINED_24 = "bench_lora/bench_lora_on_block_refined_60_24steps_smollm2_cpu.json"
# (label, [(source, variant)]): the first source with that variant at a ratio fills its cell
REFINE_ROWS = [
    ("whitening (SVD-LLM)", [(REFINE, "whitening")]),
    ("+ closed-form update", [(REFINE, "closed_form")]),
    ("anchored, alpha 0", [(REFINE, "anchored_0")]),
    ("anchored, alpha 0.5", [(REFINE, "anchored_0.5")]),
    ("anchored, alpha 1", [(REFINE, "anchored_1")]),
    ("+ block refinement (AA-SVD), 2 epochs, lr 1e-4", [(REFINE, "block")]),
    ("+ block refinement, 4 epochs (`block:e4`)", [(REFINE_EPOCHS, "block:e4")]),
    ("+ block refinement, 8 epochs (`block:e8`)", [(REFINE_EPOCHS, "block:e8"), (REFINE_EPOCHS_60, "block:e8")]),
    ("+ block refinement, 16 windows, 4 epochs (`block:w16:e4`)", [(REFINE_EPOCHS, "block:w16:e4")]),
    ("+ block refinement, lr 1e-3", [(REFINE, "block_high_lr")]),
    ("anchored (best alpha, 8 windows) + block", [(REFINE, "anchored_block")]),
    ("anchored on 32 windows + block (`anchored_block:a0.5:u32`, `:a1:u32`)",
     [(REFINE_EPOCHS, "anchored_block:a0.5:u32"), (REFINE_EPOCHS_60, "anchored_block:a1:u32")]),
    ("the same with `--anchor_holdout 0.25` (`...:u32:h0.25`)", [(REFINE_EPOCHS, "anchored_block:a0.5:u32:h0.25")]),
    ("GSVD per matrix (20 steps)", [(REFINE, "gsvd_matrix")]),
]
# step 7 LoRA on the 2-epoch block-refined models that bench_refine saved
LORA_ROWS = [("block refinement + step 7 LoRA (8 + 8 steps of 4 x 256 tokens, lr 3e-4)", LORA_ON_REFINED),
             ("block refinement + step 7 LoRA (24 + 24 steps, otherwise the same)", LORA_ON_REFINED_24)]


def table_refinement() -> str:
    """Closed-form and anchored fits, block / matrix refinement and LoRA on top (scripts/bench_refine.py,
    scripts/bench_lora.py on its saved models)."""
    ratios = [0.2, 0.4, 0.6]
    found = {}  # (source, variant, ratio) -> run
    for source in (REFINE, REFINE_EPOCHS, REFINE_EPOCHS_60):
        for run in _load(source)["runs"]:
            found.setdefault((source, run["variant"], run["ratio"]), run)
    whitening = {r: found[(REFINE, "whitening", r)]["ppl"] for r in ratios}
    rows = []  # (label, {ratio: (ppl, text)})
    for label, places in REFINE_ROWS:
        cells = {}
        for ratio in ratios:
            run = next((found[(s, v, ratio)] for s, v in places if (s, v, ratio) in found), None)
            if run is not None:
                alpha = f", alpha {run['alpha']:g}" if "alpha" in run and "anchored_block" in run["variant"] else ""
                cells[ratio] = (run["ppl"], f"{run['ppl']:.1f} ({run['ppl_over_whitening']:.2f}x{alpha}), "
                                            f"{run['seconds']['compress']:.0f}")
        rows.append((label, cells))
    for label, source in LORA_ROWS:
        cells = {}
        for run in _load(source)["runs"].values():
            ppl = run["stages"][-1]["ppl_after"]["ppl"]
            lora_s = sum(stage["stage_s"] for stage in run["stages"])
            cells[run["ratio"]] = (ppl, f"{ppl:.1f} ({ppl / whitening[run['ratio']]:.2f}x), + {lora_s:.0f} s LoRA")
        rows.append((label, cells))
    best = {r: min(cells[r][0] for _, cells in rows if r in cells) for r in ratios}
    data = _load(REFINE)
    settings = data["settings"]
    first = found[(REFINE, "whitening", ratios[0])]["eval"]
    sources = [REFINE, REFINE_EPOCHS, REFINE_EPOCHS_60, LORA_ON_REFINED, LORA_ON_REFINED_24]
    lines = [_caption(settings["evaluation"], first["windows"], first["seq_len"], settings["calibration"],
                      settings["nsamples"], sources,
                      f"; update, anchored fit and refinement on the first {settings['updating_nsamples']} of them "
                      f"unless the row says otherwise; the original model: {data['original']['ppl']:.2f}; "
                      f"x whitening: against the first row; bold: the lowest perplexity of each column; "
                      f"compress s: wall seconds of step 3 on a shared 2-core machine"),
             "",
             "| variant | " + " | ".join(f"{r}: ppl (x whitening), compress s" for r in ratios) + " |",
             "|---|" + "---|" * len(ratios)]
    for label, cells in rows:
        texts = []
        for ratio in ratios:
            if ratio not in cells:
                texts.append("not run")
                continue
            ppl, text = cells[ratio]
            if ppl == best[ratio]:
                number, _, rest = text.partition(" ")
                text = f"**{number}** {rest}"
            texts.append(text)
        lines.append(f"| {label} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def _table_lora(source: str) -> str:
    """Step 7's two LoRA stages on whitened SVD models (scripts/bench_lora.py)."""
    data = _load(source)
    settings = data["settings"]
    runs = sorted(data["runs"].values(), key=lambda run: run["ratio"])
    compressed = runs[0]["compressed"]
    trained_on = {"text": f"windows of {_slice(data['data'].get('text', {}).get('path', ''))}",
                  "alpaca": "Alpaca-form rows (response tokens scored)"}
    kind = runs[0]["data"]
    lines = [_caption(settings["evaluation"], compressed["windows"], settings["seq_len"], settings["calibration"],
                      settings["nsamples"], [source],
                      f"; LoRA r {settings['lora_r']}, alpha {settings['lora_alpha']}, lr {settings['learning_rate']:g}, "
                      f"{settings['steps']} steps per stage of {settings['batch_size']} x {settings['cutoff_len']} tokens "
                      f"of {trained_on.get(kind, kind)}; stage times on a shared 2-core machine"),
             "",
             "| removed | whitened | + LoRA U | + LoRA V | after / whitened | stage times (U, V) |",
             "|---|---|---|---|---|---|",
             f"| 0% (original) | {data['original']['ppl']:.2f} | | | | |"]
    for run in runs:
        stages = {stage["factor"]: stage for stage in run["stages"]}
        before, after = run["compressed"]["ppl"], run["stages"][-1]["ppl_after"]["ppl"]
        lines.append(f"| {run['ratio']:.0%} | {before:.2f} | {stages['u']['ppl_after']['ppl']:.2f} "
                     f"| {stages['v']['ppl_after']['ppl']:.2f} | {after / before:.3f} "
                     f"| {stages['u']['stage_s']:.0f} s, {stages['v']['stage_s']:.0f} s |")
    return "\n".join(lines)


def table_lora_text() -> str:
    return _table_lora("bench_lora/bench_lora_smollm2_cpu.json")


def table_lora_alpaca() -> str:
    return _table_lora("bench_lora/bench_lora_smollm2_cpu_alpaca.json")


def table_scale() -> str:
    """One layer of a LLaMA-2-7B-shaped random model on the CPU (scripts/bench_scale.py)."""
    source = "bench_scale_cpu-2cores_llama2-7b_1L_8x512_float32.json"
    data = _load(source)
    settings, results = data["settings"], data["results"]
    excess = ", ".join(f"{m['excess_vs_float64']:.0e}" for m in data["truncation_check"]["matrices"])
    checked = ", ".join(m["matrix"].rpartition(".")[2] for m in data["truncation_check"]["matrices"])
    layers = "the first layer" if settings["num_layers"] == 1 else f"the first {settings['num_layers']} layers"
    lines = [f"*`{settings['model']}`, {layers}, {settings['dtype']}, "
             f"{settings['nsamples']} x {settings['seq_len']} {settings['dataset']} windows, ratio {settings['ratio']}, "
             f"{settings['whitening']} whitening, {settings['decomposition']} in {settings['svd_dtype']}; "
             f"{data['device_name']}, {data['cpu_threads']} threads, commit {data['git_commit']}, load average "
             f"{data['load_average_at_end'][0]:.1f} at the end. `scripts/results/{source}`, {_date(source)}.*",
             "",
             f"| forward | profile | profile / forward | decompose | total | peak RSS "
             f"| truncation excess vs float64 ({checked}) |",
             "|---|---|---|---|---|---|---|",
             f"| {results['forward_s']:.1f} s | {results['profile_s']:.1f} s | {results['profile_over_forward']:.2f} "
             f"| {results['decompose_s']:.0f} s | {results['total_s']:.0f} s | {results['peak_rss_gib']:.1f} GiB "
             f"| {excess} |"]
    return "\n".join(lines)


def table_speed() -> str:
    """Speed against the limit the weights set, per model and shape (scripts/bench_speed.py's own table)."""
    from scripts.bench_speed import markdown
    source = "bench_speed/smollm2_cpu.json"
    data = _load(source)
    settings = data["settings"]
    windows = {entry["perplexity"]["windows"] for entry in data["rows"].values() if entry.get("perplexity")}
    lines = [f"*Perplexity on the first {min(windows)} windows of {settings['seq_len']} tokens of "
             f"{_slice(settings['evaluation'])}; whitening from {settings['nsamples']} x {settings['seq_len']} windows "
             f"of {_slice(settings['calibration'])}; {settings['prompt_len']}-token prompts, {settings['gen_len']} new "
             f"tokens, median of {settings['repeats']}, {settings['dtype']}, threads: {settings['torch_threads']}, "
             f"{settings['cpu_capability']}. `scripts/results/{source}`, {_date(source)}.*",
             "",
             markdown(data)]
    return "\n".join(lines)


def table_serve() -> str:
    """vLLM serving the exported directory against the dense original (compress.py --step 10): one row per
    engine that served the compressed model, for each record (ratio, and vLLM's compiled or eager mode)."""
    source = "serve_vllm/smollm2_cpu.json"
    data = _load(source)
    records = sorted((value for key, value in data.items() if key.startswith("ratio_")),
                     key=lambda record: (record["serving"]["settings"]["enforce_eager"], "idle" not in
                                         record.get("machine_state", ""), record["compression"]["ratio"]))
    settings = records[0]["serving"]["settings"]
    calibration = records[0]["compression"]["calibration"]
    lines = [f"*vLLM {settings['vllm_version']}, {settings['dtype']}, batch {settings['batch_size']}, "
             f"{settings['speed_new_tokens']} new tokens (decode tokens/s leave the prefill out), medians of "
             f"{' or '.join(str(n) for n in sorted({r['serving']['settings']['repeats'] for r in records}))} rounds in turn; greedy text: {settings['max_new_tokens']} tokens; whitening from "
             f"{calibration['nsamples']} x {calibration['seq_len']} windows of {_slice(calibration['dataset'])}; "
             f"vLLM's default mode compiles the model (torch.compile), `--serve_eager` does not. "
             f"`scripts/results/{source}`, {_date(source)}.*",
             "",
             "| model | vLLM mode; machine | served by | greedy text = ours | decode tokens/s | vs dense (vLLM's Llama) "
             "| vs dense (Transformers backend) |",
             "|---|---|---|---|---|---|---|"]
    for record in records:
        engines = record["serving"]["engines"]
        speed = {name: engine["speed"]["decode_tokens_per_s"] for name, engine in engines.items()}
        text = engines["compressed"]["text"]
        compression = record["compression"]
        mode = "eager" if record["serving"]["settings"]["enforce_eager"] else "compiled (default)"
        if record.get("machine_state"):
            mode += f"; {record['machine_state']}"
        model = (f"whitened SVD {compression['ratio']:.0%} ({compression['parameters']['removed_fraction']:.1%} "
                 f"of the model)")
        rows = [("compressed", f"{text['equal']} of {text['prompts']}")]
        if "compressed_transformers_backend" in engines:
            rows.append(("compressed_transformers_backend", "-"))
        for name, equal in rows:
            architecture = engines[name]["architecture"]
            # the plugin registers our export's architecture names (SvdCompress<Family>ForCausalLM)
            served_by = ("vLLM's Llama + our factors (plugin)" if architecture.startswith("SvdCompress") else
                         "Transformers backend" if architecture == "TransformersForCausalLM" else architecture)
            lines.append(f"| {model} | {mode} | {served_by} "
                         f"| {equal} | {speed[name]:.1f} | x{speed[name] / speed['dense']:.3f} ({speed['dense']:.1f}) "
                         f"| x{speed[name] / speed['dense_transformers_backend']:.3f} "
                         f"({speed['dense_transformers_backend']:.1f}) |")
    return "\n".join(lines)


def table_chat() -> str:
    """Chat fidelity by calibration data (scripts/bench_chat.py's own table)."""
    from scripts.bench_chat import markdown
    source = "bench_chat/smollm2_cpu.json"
    data = _load(source)
    settings, first = data["settings"], data["original"]["ppl"]
    lines = [f"*Fidelity on {data['reference']['prompts']} prompts against the original's greedy responses "
             f"({settings['max_new_tokens']} tokens at most, {data['reference']['tokens']} reference tokens); WikiText-2 "
             f"perplexity on the first {first['windows']} windows of {settings['seq_len']} tokens of "
             f"{_slice(settings['evaluation'])}; whitening from {settings['nsamples']} x {settings['seq_len']} windows "
             f"of each calibration. `scripts/results/{source}`, {_date(source)}.*",
             "",
             markdown(data)]
    return "\n".join(lines)


MEMORY_RESULTS = ("bench_memory/llama-1024_float32_4x128_steps.json", "bench_memory/llama-1024_float32_4x128_streamed.json",
                  "bench_memory/llama-1024_float32_4x128_rerun_7offload.json",
                  "bench_memory/llama-1024_float32_4x128_rerun_asvd.json",
                  "bench_memory/llama-1024_float32_4x128_asvd.json",
                  "bench_memory/llama2-7b_float16_bf16_4x512_steps.json",
                  "bench_memory/llama2-7b_float16_bf16_4x512_after.json",
                  "bench_memory/llama2-7b_float16_bf16_4x512_16L.json",
                  "bench_memory/llama2-7b_float16_bf16_4x512_7offload.json",
                  "bench_memory/llama2-7b_float16_bf16_4x512_step1.json")


def table_memory() -> str:
    """Peak host memory of every step against depth (scripts/bench_memory.py's own tables)."""
    from scripts.bench_memory import markdown
    sources = [source for source in MEMORY_RESULTS if os.path.isfile(os.path.join(RESULTS, source))]
    return (f"*Peak RSS (VmHWM) of a fresh process per step and depth, random weights; "
            f"`scripts/results/bench_memory/`, {_date(*sources)}.*\n\n"
            + markdown([os.path.join(RESULTS, source) for source in sources]).rstrip("\n"))


TABLES = {"quant": table_quant, "rsvd": table_rsvd, "update": table_update, "allocation": table_allocation,
          "tasks": table_tasks, "save_dtype": table_save_dtype, "efficiency": table_efficiency,
          "refinement": table_refinement, "lora_text": table_lora_text, "lora_alpaca": table_lora_alpaca,
          "scale": table_scale, "speed": table_speed, "serve": table_serve,
          "tasks_detailed": table_tasks_detailed, "chat": table_chat, "memory": table_memory}
DOCS = ("README.md", "docs/evaluation.md", "docs/refinement.md", "docs/quantization.md", "docs/lora.md",
        "docs/scale.md")
MARKED = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)


def render(text: str, tables: dict[str, str]) -> str:
    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in tables:
            raise KeyError(f"no table named {name!r} (known: {', '.join(TABLES)})")
        return match.group(1) + tables[name] + "\n\n" + match.group(4)
    return MARKED.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file's table differs")
    args = parser.parse_args(argv)
    tables = {name: make() for name, make in TABLES.items()}
    stale, used = [], set()
    for doc in DOCS:
        path = os.path.join(ROOT, doc)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        used |= {m["name"] for m in MARKED.finditer(text)}
        try:
            new = render(text, tables)
        except KeyError as error:
            print(f"write_tables: {doc}: {error.args[0]}", file=sys.stderr)
            return 2
        if new != text:
            stale += [f"{doc}: table {m['name']}" for m in MARKED.finditer(text)
                      if m["body"] != tables[m["name"]] + "\n\n"]
            if not args.check:
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write(new)
    for line in stale:
        print(("differs from the JSONs: " if args.check else "rewrote ") + line)
    unused = sorted(set(TABLES) - used)
    if unused:
        print(f"write_tables: no file has a marker for {', '.join(unused)}", file=sys.stderr)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
