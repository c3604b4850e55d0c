"""Benchmark of the issue "compressed chat models that still answer": chat fidelity and perplexity
of SmolLM2-135M-Instruct compressed with calibration on different data.

    python scripts/bench_chat.py --out scripts/results/bench_chat/smollm2_cpu.json

Protocol: SmolLM2-135M-Instruct in float32 on the CPU, seed 0. Every row compresses a fresh copy
of the model with uniform ranks at its ratio from step-1 statistics of 32 x 512 calibration
windows of its data set (profiled once per data set, kept under --stats_dir and reused):
  pydoc     Python's documentation, pydoc[0:0.9]
  wikitext  wiki.valid.tokens[0:0.8]
  chat      the Alpaca demo rows alpaca_en_demo.jsonl[0:0.9] rendered through the chat template
  self      text the original model writes itself (--dataset self: utils.self_calibration's defaults,
            an empty user turn, temperature 1.0, top_p 0.95; cached in STATS_DIR/self_..._text)
Recipes: whitening (cholesky, exact SVD: steps 1 + 3), and block_lora: block refinement on the
first --refine_nsamples calibration windows (--refine_epochs epochs), then LoRA on u then v
(--lora_steps steps each) on the chat-formatted Alpaca rows [0:0.9] (loss on the response tokens).
distill: distillation from the original's own answers. The original answers --distill_prompts
instructions of the Alpaca demo rows [0:0.9] (a seeded draw; none is a held-out prompt), and with
--distill_self_prompts N also up to N questions it writes itself (user turns sampled from its chat
template, utils.self_calibration.user_turns; empty and repeated ones dropped), greedily in
its chat template (at most --distill_tokens new tokens, as the references are made); these
conversations (prompt and answer token ids, cached in STATS_DIR) are packed end to end into windows
of --seq_len for block refinement (the first --distill_refine_nsamples windows, --refine_epochs
epochs), then LoRA on u then v (--distill_lora_steps steps each) is trained on them, the loss on the
original's answer tokens: the tokens the agreement scores, on other prompts. Its whitening is that
of the row's DATA. After refinement it is measured by teacher forcing only (agreement, response
ppl: no generation), after LoRA in full. distill_lora: the same LoRA on the whitened model, without
refinement (what the distillation LoRA adds alone). distill_kl: distill with the LoRA loss the KL
from the original's next-token distribution (its --distill_top_k most likely tokens and the rest, at
every answer token: lora.distilled) instead of the cross-entropy of its greedy tokens. --lora_stages
factors (a row tagged e.g. "#factors") trains u and v themselves in one stage instead of adapters.
Each row is measured by fidelity.chat_fidelity on the 100 held-out prompts of
data/chat_prompts.txt against the original's greedy responses (--max_new_tokens, cached), and by
perplexity on the held-back wiki.valid.tokens[0.8:1] (first 16 windows of 512).

Rows are "RECIPE@RATIO:DATA" (--rows, run in that order), with an optional "#TAG" naming a row run
with other flags (e.g. "distill_lora@0.2:chat#lora48" with --distill_lora_steps 48). The JSON is rewritten after every row
with "partial": true until the last; --resume keeps the rows of an earlier run's JSON.
Quick check that it runs (minutes; not a benchmark):
    python scripts/bench_chat.py --rows whitening@0.2:pydoc --prompts_limit 2 --max_new_tokens 8 \\
        --nsamples 2 --seq_len 64 --eval_limit 2 --stats_dir /tmp/bench_chat_stats --out /tmp/bench_chat.json
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from scripts.bench_refine import write_json  # noqa: E402  (the benchmarks' one JSON layout)

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
WIKI = os.path.join(SHARED, "wikitext2", "wiki.valid.tokens")
ALPACA = os.path.join(SHARED, "alpaca_demo", "alpaca_en_demo.jsonl")
CALIBRATION = {"pydoc": "pydoc[0:0.9]", "wikitext": WIKI + "[0:0.8]", "chat": ALPACA + "[0:0.9]", "self": "self"}
RECIPES = ("whitening", "block_lora", "distill", "distill_lora", "distill_kl")
DEFAULT_ROWS = ",".join([f"whitening@0.2:{d}" for d in ("chat", "self", "pydoc", "wikitext")] +
                        [f"whitening@0.4:{d}" for d in ("chat", "self", "pydoc", "wikitext")] +
                        ["block_lora@0.2:chat", "distill_lora@0.2:chat", "distill@0.2:chat", "distill@0.2:self",
                         "distill_kl@0.2:chat"])
EXAMPLES = 3  # before/after answers kept per row: the first prompts of the file


def parse_row(row: str) -> tuple[str, float, str]:
    """'whitening@0.2:chat' -> ('whitening', 0.2, 'chat'); a '#TAG' suffix (e.g. #lora48) only names a
    row run with other flags than the default ones (recorded in its settings)."""
    try:
        recipe, rest = row.split("#")[0].split("@")
        ratio, data = rest.split(":")
        ratio = float(ratio)
    except ValueError:
        raise ValueError(f"row {row!r}: write RECIPE@RATIO:DATA, e.g. whitening@0.2:chat") from None
    if recipe not in RECIPES or data not in CALIBRATION or not 0 < ratio < 1:
        raise ValueError(f"row {row!r}: recipe one of {RECIPES}, data one of {tuple(CALIBRATION)}, ratio in (0, 1)")
    return recipe, ratio, data


def summarize(record: dict) -> None:
    """One line per row, and the issue's targets: at 20% with chat or self calibration and with the
    best recipe, no empty answer and teacher-forced agreement >= 0.75."""
    record["table"] = [{"row": r["row"], "agreement": round(r["fidelity"]["agreement"], 4),
                        "response_ppl": r["fidelity"]["response_ppl"] and round(r["fidelity"]["response_ppl"], 3),
                        "empty_share": r["fidelity"]["empty_share"],
                        "exact_match_share": r["fidelity"]["exact_match_share"],
                        "prefix_agreement_mean": round(r["fidelity"]["prefix_agreement_mean"], 4),
                        "wiki_ppl": round(r["ppl"]["ppl"], 3)} for r in record["runs"]]
    targets = {}
    for run, found in zip(record["runs"], record["table"]):  # every row the target speaks of, variants too
        if run["ratio"] == 0.2 and run["data"] in ("chat", "self"):
            targets[run["row"]] = {"empty_share": found["empty_share"], "agreement": found["agreement"],
                                   "met": found["empty_share"] == 0 and found["agreement"] >= 0.75}
    record["targets"] = {"rule": "no empty answer on the held-out prompts and teacher-forced agreement >= 0.75",
                         "rows": targets}


def markdown(record: dict) -> str:
    """The table of the docs, from the JSON."""
    teacher = record["original"].get("teacher_forced", {"agreement": 1.0, "response_ppl": float("nan")})
    lines = ["| recipe | removed | calibration | agreement | response ppl | empty answers | same response | "
             "prefix agreement | WikiText-2 ppl |", "|---|---|---|---|---|---|---|---|---|",
             f"| original | 0 | - | {teacher['agreement']:.3f} | {teacher['response_ppl']:.2f} | "
             f"{record['reference']['empty_share']:.2f} | 1 | 1 | "
             f"{record['original']['ppl']['ppl']:.2f} |"]
    for r in record["runs"]:
        f = r["fidelity"]
        ppl = "-" if f["response_ppl"] is None else f"{f['response_ppl']:.2f}"
        tag = r.get("row", "").partition("#")[2]  # a variant run with other flags (recorded with the row)
        recipe = f"{r['recipe']} ({tag})" if tag else r["recipe"]
        lines.append(f"| {recipe} | {r['ratio']:.0%} | {r['data']} | {f['agreement']:.3f} | {ppl} | "
                     f"{f['empty_share']:.2f} | {f['exact_match_share']:.2f} | {f['prefix_agreement_mean']:.3f} | "
                     f"{r['ppl']['ppl']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", default=DEFAULT_ROWS, help="comma list of RECIPE@RATIO:DATA, run in this order")
    p.add_argument("--prompts", default=os.path.join(ROOT, "data", "chat_prompts.txt"))
    p.add_argument("--prompts_limit", type=int, default=None, help="the first N prompts only (quick checks)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--evaluation", default=WIKI + "[0.8:1]")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows of step 1")
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--eval_limit", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--refine_nsamples", type=int, default=16)
    p.add_argument("--refine_epochs", type=int, default=2)
    p.add_argument("--refine_batch_size", type=int, default=2)
    p.add_argument("--refine_lr", type=float, default=1e-4)
    p.add_argument("--lora_steps", type=int, default=8, help="optimizer steps per LoRA stage")
    p.add_argument("--lora_batch_size", type=int, default=8)
    p.add_argument("--lora_micro_batch_size", type=int, default=4)
    p.add_argument("--lora_learning_rate", type=float, default=3e-4)
    p.add_argument("--lora_r", type=int, default=8, help="adapter rank (step 7's default)")
    p.add_argument("--lora_guard", action="store_true", help="merge a LoRA stage only if its validation loss fell")
    p.add_argument("--lora_stages", default="u,v", help="step 7's stages (u,v; factors: u and v themselves)")
    p.add_argument("--lora_eval_steps", type=int, default=None, help="also record the validation loss every N steps")
    p.add_argument("--cutoff_len", type=int, default=256)
    p.add_argument("--distill_prompts", type=int, default=192, help="distill: Alpaca instructions the original answers")
    p.add_argument("--distill_self_prompts", type=int, default=0,
                   help="distill: also this many questions the original writes itself (sampled user turns)")
    p.add_argument("--distill_question_tokens", type=int, default=48, help="distill: tokens per self-written question at most")
    p.add_argument("--distill_tokens", type=int, default=64, help="distill: new tokens per answer at most")
    p.add_argument("--distill_refine_nsamples", type=int, default=32, help="distill: refinement windows")
    p.add_argument("--distill_lora_steps", type=int, default=16, help="distill: optimizer steps per LoRA stage")
    p.add_argument("--distill_top_k", type=int, default=32, help="distill_kl: the original's tokens kept per position")
    p.add_argument("--column_preserve", action="store_true",
                   help="Duo-SVD's column level in every row's decomposition (kept input columns for rank)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stats_dir", default="/work/cache/bench_chat", help="step-1 statistics per data set (reused)")
    p.add_argument("--cache_dir", default=None, help="the original's cached responses (default: fidelity's)")
    p.add_argument("--resume", action="store_true", help="keep the rows of an earlier run's --out and run the others")
    p.add_argument("--out", default=os.path.join(ROOT, "scripts", "results", "bench_chat", "smollm2_cpu.json"))
    p.add_argument("--markdown", action="store_true", help="print the table of --out in markdown, run nothing")
    opts = p.parse_args(argv)
    if opts.markdown:
        with open(opts.out) as handle:
            print(markdown(json.load(handle)))
        return 0
    try:
        rows = [(r, *parse_row(r)) for r in opts.rows.split(",") if r]
    except ValueError as error:
        p.error(str(error))
    torch.set_num_threads(opts.threads)

    import evaluater
    import fidelity
    import lora
    from api import CompressOptions, DecomposeOptions, RefineOptions, SelfCalibrationOptions, Statistics, \
        calibration_data, compress_model, count_parameters, load_model, load_text, profile_model, \
        self_calibration_data, uniform_plan
    from generate import read_prompts
    from utils.data import tokenize

    prompts = read_prompts(None, opts.prompts)[:opts.prompts_limit]
    record: dict = {"partial": True,
                    "settings": {**vars(opts), "calibration": CALIBRATION, "torch": torch.__version__,
                                 "threads": torch.get_num_threads(), "device": "cpu", "dtype": "float32",
                                 "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                 "load_avg_start": list(os.getloadavg())},
                    "runs": []}
    if opts.resume and os.path.isfile(opts.out):
        with open(opts.out) as handle:
            earlier = json.load(handle)
        record["runs"] = earlier["runs"]
        record["original"] = {**earlier["original"], "note": "measured by the first process of this resumed run"}
        record["resumed"] = earlier.get("resumed", []) + [{"settings": earlier["settings"]}]

    def save() -> None:  # rows in the order of the default list whatever order they ran in
        order = DEFAULT_ROWS.split(",")
        record["runs"].sort(key=lambda r: order.index(r["row"]) if r["row"] in order else len(order))
        summarize(record)
        write_json(opts.out, record)

    def perplexity(model) -> dict:
        start = time.perf_counter()
        result = evaluater.perplexity(model, eval_ids, opts.seq_len, 1, "cpu", opts.eval_limit, desc="ppl")
        return {"ppl": result["ppl"], "windows": result["windows"], "tokens": result["tokens"],
                "seconds": round(time.perf_counter() - start, 3)}

    def measure(model) -> dict:
        start = time.perf_counter()
        result = fidelity.chat_fidelity(model, tokenizer, prompts, references)
        result["seconds"] = round(time.perf_counter() - start, 3)
        return result

    base, tokenizer = load_model(opts.model, torch.float32, opts.seed)
    eval_ids = tokenize(tokenizer, load_text(opts.evaluation, "test"))
    start = time.perf_counter()
    references, cache = fidelity.reference_responses(base, tokenizer, prompts, opts.max_new_tokens,
                                                     cache_dir=opts.cache_dir)
    record["reference"] = {**cache, "seconds": round(time.perf_counter() - start, 3),
                           "prompts": len(prompts), "tokens": sum(len(r["ids"]) for r in references),
                           "empty_share": sum(r["empty"] for r in references) / len(references),
                           "stopped_at_end_token": sum(r["stopped"] == "eos" for r in references)}
    record["examples"] = [{"prompt": prompts[i], "original": references[i]["text"]} for i in range(min(EXAMPLES, len(prompts)))]
    if "original" not in record:
        record["original"] = {"parameters": count_parameters(base), "ppl": perplexity(base)}
    if "teacher_forced" not in record["original"]:  # the baseline of response_ppl; agreement 1 checks the measure
        from generate import prompt_ids
        hits = nll = 0.0
        for prompt, reference in zip(prompts, references):
            hit, loss = fidelity.teacher_forced(base, prompt_ids(tokenizer, prompt, True)[0][0].tolist(), reference["ids"])
            hits, nll = hits + hit, nll + loss
        tokens = record["reference"]["tokens"]
        record["original"]["teacher_forced"] = {"agreement": hits / tokens, "response_ppl": math.exp(nll / tokens)}
    print(f"original: wiki ppl {record['original']['ppl']['ppl']:.2f}; references "
          f"{'from cache' if cache['from_cache'] else 'generated'} ({record['reference']['seconds']:.0f} s)", flush=True)
    save()

    def statistics_for(data: str) -> tuple[str, torch.Tensor, dict]:
        """The calibration windows of `data` and their step-1 statistics (profiled once, kept on disk)."""
        spec = CALIBRATION[data]
        path = os.path.join(opts.stats_dir, f"{data}_w{opts.nsamples}x{opts.seq_len}_seed{opts.seed}")
        start = time.perf_counter()
        if data == "self":  # the model's own text, cached in a folder of its own (the statistics' is ours alone)
            os.makedirs(path + "_text", exist_ok=True)
            windows, what = self_calibration_data(base, tokenizer, opts.nsamples, opts.seq_len, opts.seed,
                                                  SelfCalibrationOptions(), "cpu", cache_dir=path + "_text",
                                                  progress=False)
        else:
            windows, what = calibration_data(spec, tokenizer, opts.nsamples, opts.seq_len, opts.seed,
                                             vocab_size=base.config.vocab_size)
        info = {"dataset": spec, "windows": what, "windows_s": round(time.perf_counter() - start, 3)}
        if not os.path.isfile(os.path.join(path, "meta.json")):
            start = time.perf_counter()
            profile_model(base, windows, "cpu", path, meta={"model": opts.model, "dataset": spec,
                                                            "seed": opts.seed}).close()
            info["profile_s"] = round(time.perf_counter() - start, 3)
        return path, windows, info

    def distillation_set() -> dict:
        """The original's greedy answers to --distill_prompts Alpaca instructions of rows [0:0.9]
        (cached in --stats_dir): prompts, prompt ids, answer ids."""
        extra = f"_self{opts.distill_self_prompts}q{opts.distill_question_tokens}" if opts.distill_self_prompts else ""
        path = os.path.join(opts.stats_dir, f"distill_p{opts.distill_prompts}{extra}_t{opts.distill_tokens}_seed{opts.seed}.json")
        if os.path.isfile(path):
            with open(path) as handle:
                return json.load(handle)
        from generate import prompt_ids
        with open(ALPACA) as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
        rows = rows[:int(0.9 * len(rows))]
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(opts.seed)).tolist()
        held_out = {q.strip().lower() for q in prompts}
        chosen = [rows[i] for i in order if rows[i]["instruction"].strip().lower() not in held_out]
        questions = [r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
                     for r in chosen[:opts.distill_prompts]]
        start = time.perf_counter()
        source = ALPACA + "[0:0.9]"
        if opts.distill_self_prompts:
            from utils.self_calibration import user_turns
            written = user_turns(base, tokenizer, opts.distill_self_prompts, opts.distill_question_tokens,
                                 SelfCalibrationOptions(), opts.seed, "cpu")
            questions += [q for q in written if q.strip().lower() not in held_out]
            source += (f" and {len(questions) - opts.distill_prompts} questions the original wrote "
                       f"(utils.self_calibration.user_turns, {opts.distill_self_prompts} sampled)")
        answers = fidelity.greedy_responses(base, tokenizer, questions, opts.distill_tokens)
        data = {"source": source, "seed": opts.seed, "max_new_tokens": opts.distill_tokens,
                "seconds": round(time.perf_counter() - start, 3), "prompts": questions,
                "prompt_ids": [prompt_ids(tokenizer, q, True)[0][0].tolist() for q in questions],
                "answer_ids": [a["ids"] for a in answers],
                "stopped_at_end_token": sum(a["stopped"] == "eos" for a in answers),
                "empty": sum(a["empty"] for a in answers)}
        write_json(path, data)
        return data

    def distillation_windows(data: dict, count: int) -> torch.Tensor:
        """The conversations end to end, cut into `count` windows of --seq_len."""
        stream = [t for p, a in zip(data["prompt_ids"], data["answer_ids"]) for t in p + a]
        if len(stream) < count * opts.seq_len:
            raise SystemExit(f"distill: {len(stream)} tokens make fewer than {count} windows of {opts.seq_len}: "
                             f"raise --distill_prompts")
        return torch.tensor(stream[:count * opts.seq_len]).view(count, opts.seq_len)

    def distillation_examples(data: dict):
        """LoRA examples: prompt and answer ids, the loss on the answer tokens only."""
        pairs = [(p + a, [lora.IGNORE_INDEX] * len(p) + a) for p, a in zip(data["prompt_ids"], data["answer_ids"]) if a]
        val = min(8, len(pairs) // 10)
        return lora.Examples(pairs[val:], pairs[:val], {"source": "the original's greedy answers", "rows": len(pairs),
                                                        "train_examples": len(pairs) - val, "val_examples": val})

    def teacher_forced_only(model) -> dict:
        """Agreement and response perplexity of the references, without generating (cheap)."""
        from generate import prompt_ids
        start = time.perf_counter()
        hits = nll = 0.0
        for prompt, reference in zip(prompts, references):
            hit, loss = fidelity.teacher_forced(model, prompt_ids(tokenizer, prompt, True)[0][0].tolist(),
                                                reference["ids"])
            hits, nll = hits + hit, nll + loss
        tokens = record["reference"]["tokens"]
        return {"agreement": hits / tokens, "response_ppl": math.exp(nll / tokens) if nll / tokens < 700 else None,
                "seconds": round(time.perf_counter() - start, 3)}

    done = {r["row"] for r in record["runs"]}
    lora_examples = None
    for name, recipe, ratio, data in rows:
        if name in done:
            continue
        stats_path, windows, calibration = statistics_for(data)
        model = copy.deepcopy(base)
        stages = {}
        refine = None
        if recipe in ("block_lora", "distill", "distill_kl"):
            nsamples = opts.refine_nsamples if recipe == "block_lora" else opts.distill_refine_nsamples
            refine = RefineOptions(target="block", nsamples=nsamples, epochs=opts.refine_epochs, lr=opts.refine_lr,
                                   batch_size=opts.refine_batch_size, seed=opts.seed)
        options = CompressOptions(decompose=DecomposeOptions(column_preserve=opts.column_preserve), refine=refine)

        def run_lora(examples, steps: int) -> None:
            """SVD-LLM's sequential LoRA (u then v) for `steps` optimizer steps per stage, timed and recorded."""
            lora_options = lora.LoraOptions(learning_rate=opts.lora_learning_rate, num_epochs=1e9,
                                            batch_size=opts.lora_batch_size,
                                            micro_batch_size=opts.lora_micro_batch_size, max_steps=steps,
                                            seed=opts.seed, r=opts.lora_r, alpha=2.0 * opts.lora_r,
                                            guard=opts.lora_guard, stages=tuple(opts.lora_stages.split(",")),
                                            eval_steps=opts.lora_eval_steps)
            start = time.perf_counter()
            lora_record = lora.sequential_lora(model, tokenizer, examples, lora_options, "cpu", progress=False)
            seconds["lora"] = round(time.perf_counter() - start, 3)
            stages["lora"] = {"data": examples.info, "steps_per_stage": steps, "stages": opts.lora_stages,
                              "objective": lora_record["stage_records"][0]["objective"], "r": opts.lora_r,
                              "learning_rate": opts.lora_learning_rate,
                              "merged": [s["merged"] for s in lora_record["stage_records"]],
                              "val_loss": [(s["val_loss_before"], s["val_loss_after"])
                                           for s in lora_record["stage_records"]],
                              "val_loss_curves": [s["val_loss_curve"] for s in lora_record["stage_records"]],
                              "train_loss_curves": [s["train_loss_curve"] for s in lora_record["stage_records"]]}

        if recipe in ("distill", "distill_lora", "distill_kl"):
            distilled = distillation_set()
            if recipe != "distill_lora":
                windows = distillation_windows(distilled, opts.distill_refine_nsamples)
            stages["distillation_set"] = {k: v for k, v in distilled.items() if k not in ("prompt_ids", "answer_ids", "prompts")}
            stages["distillation_set"].update(prompts=len(distilled["prompts"]),
                                              answer_tokens=sum(map(len, distilled["answer_ids"])),
                                              refine_windows=0 if recipe == "distill_lora" else int(windows.shape[0]))
        stats = Statistics.open(stats_path)
        start = time.perf_counter()
        compression = compress_model(model, uniform_plan(model, ratio), options, "cpu", stats,
                                     windows if options.nsamples else None)
        stats.close()
        seconds = {"compress": round(time.perf_counter() - start, 3)}
        if recipe in ("distill", "distill_lora", "distill_kl"):
            stage = "before_lora" if recipe == "distill_lora" else "after_refinement"
            stages[stage] = {"teacher_forced": teacher_forced_only(model)}
            print(f"{name} {stage}: {stages[stage]}", flush=True)
            examples = distillation_examples(distilled)
            if recipe == "distill_kl":  # the original's next-token distributions at the answer tokens
                start = time.perf_counter()
                examples = lora.distilled(examples, base, opts.distill_top_k, opts.lora_micro_batch_size,
                                          lora._pad_id(tokenizer), "cpu")
                stages["teacher_targets_s"] = round(time.perf_counter() - start, 3)
            run_lora(examples, opts.distill_lora_steps)
        if recipe == "block_lora":
            stages["after_refinement"] = {"fidelity": {k: v for k, v in measure(model).items() if k != "per_prompt"}}
            if lora_examples is None:  # Alpaca rows in the chat template, loss on the assistant's tokens
                lora_examples = lora.load_examples(ALPACA + "[0:0.9]", tokenizer, opts.cutoff_len, 8, opts.seed)
            run_lora(lora_examples, opts.lora_steps)
        result = measure(model)
        ppl = perplexity(model)
        seconds.update(fidelity=result.pop("seconds"), ppl=ppl["seconds"])
        per_prompt = result.pop("per_prompt")
        row = {"row": name, "recipe": recipe, "ratio": ratio, "data": data, "calibration": calibration,
               "options": options.to_dict(), "removed_fraction": compression["parameters"]["removed_fraction"],
               "parameters": compression["parameters"]["compressed"], "fidelity": result, "ppl": ppl,
               "seconds": seconds, "stages": stages,
               "per_prompt_agreement": [round(p["agreement"], 4) for p in per_prompt],
               "empty_prompts": [i for i, p in enumerate(per_prompt) if p["empty"]],
               "examples": [p["response"] for p in per_prompt[:EXAMPLES]]}
        record["runs"].append(row)
        print(f"{name}: agreement {result['agreement']:.3f}, response ppl {result['response_ppl']}, empty "
              f"{result['empty_share']:.2f}, same response {result['exact_match_share']:.2f}, wiki ppl "
              f"{ppl['ppl']:.2f} ({seconds})", flush=True)
        model = None  # (freed before the next row is copied)
        save()
    record["partial"] = any(name not in {x["row"] for x in record["runs"]} for name, *_ in rows)
    record["load_avg_end"] = list(os.getloadavg())
    save()
    print(json.dumps(record["targets"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
