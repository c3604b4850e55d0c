"""Recipes: each published method as one flag (`python compress.py --recipe NAME`).

A recipe is a row of RECIPES: the steps it runs and the flag values its authors used (on a GPU,
with the hub), plus what it uses instead on the CPU (fewer, shorter calibration windows, fewer
training steps) and offline (a local WikiText-2 file for the hub's). `expand` turns a name into
that table of flag values; compress.py applies it under the flags the user typed, which always
win. Nothing here sees argparse: flags are their argparse destination names (`whitening_nsamples`
for `--whitening_nsamples`), values plain Python values (True for a switch).

Settings marked "uncertain" in `notes` were not found in the authors' code; they are our reading
of the paper or of the repository's scripts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

HUB_DATASETS = ("wikitext2", "ptb", "c4")
# offline stand-in for WikiText-2 train: the validation file, its first 80% (the benchmarks' calibration slice)
OFFLINE_WIKITEXT = os.path.join("..", "shared", "data", "wikitext2", "wiki.valid.tokens")
OFFLINE_DATASET = OFFLINE_WIKITEXT + "[0:0.8]"
OFFLINE_FALLBACK = "pydoc"  # offline everywhere
ALPACA_SAMPLE = os.path.join("..", "shared", "data", "alpaca_demo", "alpaca_en_demo.jsonl")

# SVD-LLM's calibration (SVDLLM.py's flags as svdllm_gptq.sh runs them): 256 windows x 2048 tokens
# of WikiText-2 train, seed 3; on the CPU 32 x 512 (the README's quick setting)
_SVDLLM_DATA = {"dataset": "wikitext2", "whitening_nsamples": 256, "model_seq_len": 2048, "seed": 3}
_CPU_DATA = {"whitening_nsamples": 32, "model_seq_len": 512}
_WHITENED_SVD = {"whitening": "cholesky", "decomposition": "svd", "allocation": "uniform", "update": "none",
                 "refine": "none"}
# SVD-LLM's LoRA.py command (their README, section 4; LLM-Pruner's settings for the rest)
_SVDLLM_LORA = {"lora_r": 8, "lora_alpha": 16.0, "lora_dropout": 0.05, "num_epochs": 2.0, "learning_rate": 1e-4,
                "batch_size": 64, "micro_batch_size": 4, "cutoff_len": 256, "lora_stages": "u,v"}


@dataclass(frozen=True)
class Recipe:
    name: str
    steps: tuple[int, ...]
    flags: dict  # destination -> value: the authors' setting (on a GPU, with the hub)
    source: str  # repository and file, or paper and section
    summary: str
    cpu: dict = field(default_factory=dict)  # destination -> value used instead on the CPU
    bands: tuple = ()  # ((upper ratio, exclusive), {destination: value}), ...: settings per --ratio band
    needs: dict = field(default_factory=dict)  # destination -> why: flags the recipe cannot supply itself
    same_as: dict = field(default_factory=dict)  # destination -> destination whose final value it takes
    notes: tuple[str, ...] = ()


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("svd-llm", (1, 3), {**_SVDLLM_DATA, **_WHITENED_SVD},
           "SVD-LLM (Wang et al., ICLR 2025): AIoT-MLSys-Lab/SVD-LLM, SVDLLM.py --step 1 (flags as in svdllm_gptq.sh)",
           "truncation-aware whitening (Cholesky), exact SVD, uniform ranks", cpu=_CPU_DATA),
    Recipe("svd-llm-update", (1, 3), {**_SVDLLM_DATA, **_WHITENED_SVD, "update": "closed_form",
                                      "updating_nsamples": 16},
           "SVD-LLM: AIoT-MLSys-Lab/SVD-LLM, SVDLLM.py --step 2 (README 2: whitening + layer-wise closed-form "
           "update, --updating_nsamples default 16)",
           "whitening, SVD, then the closed-form update of u on the compressed model's inputs", cpu=_CPU_DATA),
    Recipe("svd-llm-lora", (1, 3, 7), {**_SVDLLM_DATA, **_WHITENED_SVD, **_SVDLLM_LORA},
           "SVD-LLM: AIoT-MLSys-Lab/SVD-LLM, LoRA.py (README 4: --lora_r 8 --num_epochs 2 --learning_rate 1e-4 "
           "--batch_size 64 on yahma/alpaca-cleaned; LLM-Pruner's micro batch 4, cutoff 256, alpha 16, dropout 0.05)",
           "whitening, SVD, then sequential LoRA (u, merged, then v, merged)",
           cpu={**_CPU_DATA, "batch_size": 8, "max_steps": 40},
           needs={"data_path": "SVD-LLM trains on yahma/alpaca-cleaned from the hub; give a local Alpaca or text "
                               f"file, e.g. --data_path {ALPACA_SAMPLE}"}),
    Recipe("svd-llm-gptq", (1, 3, 8), {**_SVDLLM_DATA, **_WHITENED_SVD, "quant": "gptq", "wbits": 4,
                                       "groupsize": -1, "act_order": True, "nsamples": 128},
           "SVD-LLM: AIoT-MLSys-Lab/SVD-LLM, svdllm_gptq.sh (whitening at 20%, then quant_llama.py --wbits 4 "
           "--true-sequential --act-order; GPTQ's 128 windows)",
           "whitening, SVD, then GPTQ 4-bit (per output row, act order) of both factors",
           cpu={**_CPU_DATA, "nsamples": 32},
           notes=("svdllm_gptq.sh calibrates GPTQ on c4; here step 8 draws its windows from the same --dataset as "
                  "step 1",)),
    Recipe("rsvd-llm", (1, 3), {**_SVDLLM_DATA, **_WHITENED_SVD, "decomposition": "rsvd",
                                "rsvd_oversamples": 100, "rsvd_n_iter": 4},
           "the issue's RSVD seed (Halko, Martinsson & Tropp 2011, subspace iteration) on SVD-LLM's whitening; "
           "utils/rsvd.py's defaults",
           "whitening, randomized SVD (oversamples 100, 4 power iterations)", cpu=_CPU_DATA,
           notes=("uncertain: oversamples and iterations are the seed's defaults as this project recorded them",)),
    Recipe("svd-llm-v2", (1, 2, 3), {**_SVDLLM_DATA, **_WHITENED_SVD, "whitening": "eigen", "allocation": "v2"},
           "SVD-LLM V2 (Wang et al., NAACL 2025), sections 3.1-3.2 (no code released: SVD-LLM's README roadmap)",
           "eigen-decomposition whitening, per-type ranks from the whitened truncation losses", cpu=_CPU_DATA,
           notes=("uncertain: calibration as SVD-LLM's (the paper's setup section); --v2_max_shift is ours",)),
    Recipe("asvd", (1, 2, 3), {"dataset": "wikitext2", "whitening_nsamples": 256, "model_seq_len": 2048, "seed": 3,
                               "whitening": "none", "scaling": "abs_mean", "alpha": 0.5, "sigma_fuse": "UV",
                               "decomposition": "svd", "allocation": "asvd", "sensitivity_metric": "ppl",
                               "sensitivity_nsamples": 32, "update": "none", "refine": "none"},
           "ASVD (Yuan et al. 2023): hahnyuan/ASVD4LLM, asvd.py (--alpha 0.5 --scaling_method abs_mean "
           "--sensitivity_metric ppl --sigma_fuse UV; get_calib_data(..., 256): 256 x 2048, seed 3; "
           "--n_calib_samples 32)",
           "activation-aware scaling (abs_mean^0.5), sigma into U and V, ranks by perplexity sensitivity and "
           "ASVD's binary search to --ratio (or --ppl_target)",
           cpu={**_CPU_DATA, "sensitivity_nsamples": 2},
           notes=("uncertain: the sensitivity windows (--n_calib_samples 32); ASVD's --seed 233 seeds torch, its "
                  "calibration windows use get_calib_data's seed 3",
                  "the sensitivity pass costs minutes to hours on a CPU (matrices x candidates x windows)")),
    Recipe("duo-svd", (1, 2, 3), {**_SVDLLM_DATA, **_WHITENED_SVD, "allocation": "duo", "sensitivity_metric": "kl",
                                  "sensitivity_nsamples": 16, "column_preserve": True},
           "Duo-SVD: its code's seg_W_SVD (component/cal_r.py, column preservation) and --strategy dp (KL "
           "sensitivity, knapsack DP); calibration as SVD-LLM's (256 x 2048, seed 3)",
           "whitening, ranks by KL sensitivity and a DP, then rank traded for exactly kept columns",
           cpu={**_CPU_DATA, "sensitivity_nsamples": 1},
           notes=("uncertain: --sensitivity_nsamples 16 is ours",
                  "the sensitivity pass costs minutes to hours on a CPU (matrices x candidates x windows)")),
    Recipe("gsvd", (1, 3), {"dataset": "wikitext2", "whitening_nsamples": 256, "model_seq_len": 2048, "seed": 42,
                            **_WHITENED_SVD, "refine": "gradient", "refine_target": "matrix", "gradient_iters": 500,
                            "refine_nsamples": 256, "refine_batch_size": 8},
           "GSVD: MiquelObrador/GSVD, wgsvd.sh (--gradient-iters 500 --calib-samples 256) and svd_llm.sh "
           "(--seed 42 --batch-size 8)",
           "whitening, SVD, then each matrix's u, v by AdamW against its original outputs",
           cpu={**_CPU_DATA, "gradient_iters": 20, "refine_nsamples": 8, "refine_batch_size": 2},
           notes=("the seed's SiLU on gate_proj outputs and its importance-weighted loss are not reproduced "
                  "(docs/refinement.md)",
                  "uncertain: seed 42 and 8 windows per step are from the seed's SVD-LLM baseline script "
                  "(svd_llm.sh); its wgsvd.sh as stored gives only --gradient-iters, --matrix-iters 1, --ratio, "
                  "--calib-samples")),
    Recipe("aa-svd", (1, 3), {"dataset": "wikitext2", "whitening_nsamples": 256, "model_seq_len": 2048, "seed": 42,
                              **_WHITENED_SVD, "update": "anchored", "anchor_alpha": 1.0, "anchor_holdout": 0.0,
                              "updating_nsamples": 256, "refine": "gradient", "refine_target": "block",
                              "refine_epochs": 25, "refine_lr": 1e-4},
           "AA-SVD (arXiv 2604.02119): atulkumarin/AA-SVD, config/compression/compress.yaml (256 calibration "
           "samples, finetune all), config/data (block_size 2048), config.yaml (seed 42), aa_svd/compression/"
           "compress.py (finetune_layer num_steps=25, lr=1e-4, mse)",
           "anchored fit of u, v to the original outputs from the compressed inputs, then every parameter of each "
           "block by AdamW against the original block",
           cpu={**_CPU_DATA, "updating_nsamples": 32, "anchor_holdout": 0.25, "refine_epochs": 2,
                "refine_nsamples": 8, "refine_batch_size": 2},
           notes=("uncertain: --anchor_alpha 1 (the anchored objective's weight on the original outputs) and "
                  "the refinement batch; AA-SVD keeps every fit (--anchor_holdout 0); on the CPU the fit uses 32 "
                  "windows with the held-out guard (docs/refinement.md: it overfits fewer)",)),
    Recipe("best", (1, 3, 7), {"dataset": "wikitext2", "whitening_nsamples": 256, "model_seq_len": 2048, "seed": 0,
                               **_WHITENED_SVD, "refine": "gradient", "refine_target": "block", "refine_lr": 1e-4,
                               "refine_batch_size": 2, "lora_r": 8, "lora_alpha": 16.0, "lora_dropout": 0.05,
                               "learning_rate": 3e-4, "batch_size": 4, "micro_batch_size": 4, "cutoff_len": 256,
                               "lora_stages": "u,v", "lora_guard": True},
           "docs/refinement.md (\"Measured\"), scripts/results/bench_lora/bench_lora_on_block_refined_* and "
           "scripts/results/bench_recipes (validation slice): block refinement (AA-SVD's), below 50% removed after "
           "the anchored fit on 32 windows with the held-out guard, then step 7's LoRA with its guard",
           "whitening, anchored fit (32 windows, guarded; below 50% removed), block refinement, then LoRA U then V "
           "on --dataset, each stage merged only if it lowered the validation loss",
           cpu={"whitening_nsamples": 64, "model_seq_len": 512},
           bands=((0.3, {"update": "anchored", "anchor_alpha": 0.5, "anchor_holdout": 0.25, "updating_nsamples": 32,
                         "refine_epochs": 4, "refine_nsamples": 16, "max_steps": 8}),
                  (0.5, {"update": "anchored", "anchor_alpha": 1.0, "anchor_holdout": 0.25, "updating_nsamples": 32,
                         "refine_epochs": 8, "refine_nsamples": 8, "max_steps": 24}),
                  (1.0, {"refine_epochs": 8, "refine_nsamples": 8, "max_steps": 24})),
           same_as={"data_path": "dataset"},
           notes=("band ratio < 0.3 from the 20% rows (anchored alpha 0.5 on 32 windows + block 38.1, block on 16 "
                  "windows x 4 epochs 36.7, block + LoRA 8 + 8 steps 33.0 = 0.68x whitening); band 0.3-0.5 measured "
                  "whole at 40% by scripts/bench_recipes.py; band >= 0.5: the same composition at 60% failed on the "
                  "validation slice (after the anchored fit the block refinement lowered the loss of 1 of 30 blocks "
                  "and LoRA diverged), so it refines without the anchored fit (block 8 epochs alone 109.1, block + "
                  "LoRA 24 + 24 steps 83.4 = 0.29x whitening); --lora_guard keeps a diverging LoRA stage out",
                  "measured on SmolLM2-135M on the CPU with 64 x 512 windows of wiki.valid.tokens[0:0.8]; the "
                  "GPU setting (256 x 2048) is ours",
                  "chosen on the validation slice against every other recipe at 20, 40 and 60% removed "
                  "(scripts/bench_recipes.py; docs/recipes.md)")),
)}


@dataclass
class Expansion:
    """What a recipe sets: flags (destination -> value), where each value came from, and notes."""

    recipe: Recipe
    flags: dict
    origin: dict  # destination -> "recipe" | "recipe on the CPU (paper: X)" | "recipe offline (...)" | "ratio band"
    notes: list


def names() -> list[str]:
    return list(RECIPES)


def band_flags(recipe: Recipe, ratio: float) -> dict:
    for upper, flags in recipe.bands:
        if ratio < upper:
            return dict(flags)
    return dict(recipe.bands[-1][1]) if recipe.bands else {}


def offline_dataset() -> str:
    """The local stand-in for a hub calibration set: WikiText-2's validation file when the shared
    data is there, else Python's own documentation."""
    return OFFLINE_DATASET if os.path.isfile(OFFLINE_WIKITEXT) else OFFLINE_FALLBACK


def expand(name: str, ratio: float = 0.2, cpu: bool = False, offline: bool = False) -> Expansion:
    """The flag values of recipe `name` at `ratio` (its band), on the CPU or a GPU, with or without
    the hub. KeyError for an unknown name (callers name the choices)."""
    recipe = RECIPES[name]
    flags = dict(recipe.flags)
    origin = {k: "recipe" for k in flags}
    notes = list(recipe.notes)
    for key, value in band_flags(recipe, ratio).items():
        flags[key], origin[key] = value, f"recipe, ratio band of {ratio:g}"
    if cpu:
        for key, value in recipe.cpu.items():
            paper = f" (GPU: {flags[key]})" if key in flags else ""
            flags[key], origin[key] = value, f"recipe on the CPU{paper}"
    if offline and flags.get("dataset") in HUB_DATASETS:
        local = offline_dataset()
        origin["dataset"] = f"recipe offline (hub: {flags['dataset']})"
        flags["dataset"] = local
    return Expansion(recipe, flags, origin, notes)


def flag_text(dest: str, value) -> str:
    """How a destination and value are typed on the command line."""
    import shlex
    if value is True:
        return f"--{dest}"
    return f"--{dest} {value:g}" if isinstance(value, float) else f"--{dest} {shlex.quote(str(value))}"


class RecipeError(ValueError):
    """A recipe that cannot run as asked: one line naming the problem and the fix."""


STEP_NEEDS = {7: "step 7 (LoRA)", 8: "step 8 (quantization)"}
# flags that belong to one choice of another flag (their checks refuse them elsewhere): a recipe's
# value is dropped when the user types that flag to another choice, e.g. `--recipe best --update none`
BELONGS_TO = {"anchor_alpha": ("update", ("anchored",)), "anchor_holdout": ("update", ("anchored",)),
              "sensitivity_metric": ("allocation", ("asvd", "duo"))}


def resolve(name: str, typed: dict, ratio: float, cpu: bool, offline: bool, steps: tuple | None = None,
            strict: bool = True) -> dict:
    """The recipe under the flags the user typed. typed: destination -> value of every flag typed
    (they win); steps: the steps that will run (default the recipe's). Returns {"set": the values
    to apply (destination -> value), "record": what the compression block keeps}; RecipeError when
    a step the recipe runs needs something it cannot supply (strict=False: a note instead, for --print)."""
    expansion = expand(name, ratio, cpu, offline)
    recipe = expansion.recipe
    steps = tuple(steps or recipe.steps)
    apply = {k: v for k, v in expansion.flags.items() if k not in typed}
    origin = {k: ("yours" if k in typed else o) for k, o in expansion.origin.items()}
    dropped = {}
    for dest, (control, choices) in BELONGS_TO.items():
        if dest in apply and control in typed and typed[control] not in choices:
            dropped[dest] = f"the recipe's --{dest} {apply.pop(dest)} belongs to --{control} {'/'.join(choices)}"
            del origin[dest]
    for dest, other in recipe.same_as.items():
        if dest in typed:
            origin[dest] = "yours"
            continue
        value = typed.get(other, expansion.flags.get(other))
        if value in ("random", "self") and strict:
            raise RecipeError(f"--recipe {name} trains step 7 (LoRA) on --{other}, which is {value} here (no text "
                              f"to train on): give --{dest} FILE, e.g. --{dest} {ALPACA_SAMPLE}")
        apply[dest], origin[dest] = value, f"recipe: the same as --{other}"
    for dest, why in recipe.needs.items():
        if dest not in typed and 7 in steps:
            problem = f"--recipe {name} runs step 7 (LoRA), which needs --{dest}: {why}"
            if strict:
                raise RecipeError(problem)
            expansion.notes.append(problem)
    final = {**expansion.flags, **apply, **{k: typed[k] for k in origin if k in typed}}
    record = {"name": name, "source": recipe.source, "steps": list(steps),
              "flags": {k: final[k] for k in origin}, "origin": origin,
              "overridden": sorted(k for k, o in origin.items() if o == "yours"), "dropped": dropped,
              "device": "cpu" if cpu else "gpu", "offline": bool(offline), "notes": expansion.notes}
    return {"set": apply, "record": record}


def describe(record: dict, command: str) -> str:
    """--recipe NAME --print: the expansion, one flag a line with where it comes from, and the command."""
    from_steps = ",".join(map(str, record["steps"]))
    lines = [f"recipe {record['name']}: {RECIPES[record['name']].summary}",
             f"source: {record['source']}", f"steps: {from_steps}"]
    width = max(len(flag_text(k, v)) for k, v in record["flags"].items())
    for dest, value in record["flags"].items():
        lines.append(f"  {flag_text(dest, value):<{width}}  {record['origin'][dest]}")
    lines += [f"dropped: {why} (you typed another)" for why in record.get("dropped", {}).values()]
    lines += [f"note: {n}" for n in record["notes"]]
    lines.append(f"runs: {command}")
    return "\n".join(lines)


def statistics_match(meta: dict, model: str, dataset: str, nsamples: int, seq_len: int, seed: int,
                     fisher: bool = False) -> bool:
    """Step 1's meta.json describes the statistics a recipe run would profile (so step 1 is skipped;
    step 3 still checks the weights' fingerprint)."""
    return (meta.get("model") == model and meta.get("dataset") == dataset and meta.get("nsamples") == nsamples
            and meta.get("seq_len") == seq_len and meta.get("seed") == seed and (bool(meta.get("fisher")) or not fisher))
