"""Step 9: text generation from a (compressed) model, optionally beside the original's.

Each prompt is wrapped in the tokenizer's chat template when it has one (a single user turn,
generation prompt appended; --no_chat_template turns it off), then decoded with the KV cache:
greedy by default, sampling with --temperature > 0 (and --top_p), seeded from --seed before every
prompt so that a completion does not depend on the prompts before it. Generation stops at the
model's end-of-sequence token(s) or after --max_new_tokens.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from torch import nn

from utils.data import DatasetError
from utils.prompts import end_tokens, prompt_ids, read_prompts  # noqa: F401 (also generate.<name> for callers)


@dataclass
class GenerationOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    chat_template: bool = True  # use the tokenizer's chat template when it has one

    def describe(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens,
                "decoding": "greedy" if self.temperature == 0 else "sampling",
                "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                "chat_template": self.chat_template, "kv_cache": True}


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, options: GenerationOptions,
             device: str | torch.device = "cpu") -> dict:
    """One completion of `prompt` by `model` (already placed; inputs go to `device`)."""
    from transformers import GenerationConfig
    ids, templated = prompt_ids(tokenizer, prompt, options.chat_template)
    ids = ids.to(device)
    end = end_tokens(model, tokenizer)
    sampling = options.temperature > 0
    config = GenerationConfig(max_new_tokens=options.max_new_tokens, do_sample=sampling, use_cache=True,
                              temperature=options.temperature if sampling else None,
                              top_p=options.top_p if sampling else None, top_k=None,
                              eos_token_id=end or None,
                              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                              else (end[0] if end else 0))
    torch.manual_seed(options.seed)
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:].tolist()
    stopped = "eos" if new and new[-1] in end else "max_new_tokens"
    return {"completion": tokenizer.decode(new, skip_special_tokens=True), "completion_ids": new,
            "prompt_tokens": int(ids.shape[1]), "new_tokens": len(new), "stopped": stopped,
            "chat_template": templated, "seconds": round(seconds, 3),
            "new_tokens_per_s": round(len(new) / seconds, 3) if seconds > 0 else None}


def options_from_args(args: argparse.Namespace) -> GenerationOptions:
    return GenerationOptions(args.max_new_tokens, args.temperature, args.top_p, args.seed, not args.no_chat_template)


def generate_step(args: argparse.Namespace, session) -> dict:
    """Step 9: every prompt through the model (and with --compare through its original); prints
    each prompt and completion; one JSON section."""
    from evaluater import load_original, prepare_text_step, results_path, update_results
    from fidelity import prefix_agreement, response_is_empty
    prompts = read_prompts(args.prompt, args.prompts)
    options = options_from_args(args)
    placement = prepare_text_step(args, session, "prompts cannot be tokenized: save the tokenizer with the model")
    model = session.model.eval()
    records = [{"prompt": p, "model": generate(model, session.tokenizer, p, options, placement.input_device)}
               for p in prompts]
    settings = {**options.describe(), "placement": {"model": placement.describe()}}
    if args.compare:
        if session.compression is None:
            raise DatasetError("--compare shows the original beside a compressed model: give --model_path "
                               "(or run step 3 in the same command)")
        original, original_placement = load_original(args, session)
        for record in records:
            record["original"] = generate(original, session.tokenizer, record["prompt"], options,
                                          original_placement.input_device)
        settings["placement"]["original"] = original_placement.describe()
        del original
    for number, record in enumerate(records, 1):
        print(f"prompt {number}: {record['prompt']}")
        print(f"  model ({record['model']['new_tokens']} tokens, {record['model']['stopped']}): "
              f"{record['model']['completion']}")
        if "original" in record:
            print(f"  original ({record['original']['new_tokens']} tokens, {record['original']['stopped']}): "
                  f"{record['original']['completion']}")
    data = {"settings": settings, "completions": records}
    if args.compare:  # free-generation agreement with the original (fidelity.py; greedy: deterministic)
        data["agreement"] = prefix_agreement([r["model"]["completion_ids"] for r in records],
                                             [r["original"]["completion_ids"] for r in records])
        ends = end_tokens(model, session.tokenizer)
        data["agreement"]["empty_share"] = sum(response_is_empty(r["model"]["completion_ids"], r["model"]["completion"],
                                                                 ends) for r in records) / len(records)
        print(f"agreement with the original on {len(records)} prompts: same response "
              f"{data['agreement']['exact_match_share']:.2f}, mean prefix agreement "
              f"{data['agreement']['prefix_agreement_mean']:.3f}, empty answers {data['agreement']['empty_share']:.2f}")
    path = results_path(args, session)
    update_results(path, args, session, "generation", data)
    print(f"generation: results -> {path}")
    return data


def ask_step(args: argparse.Namespace, session) -> dict:
    """--ask: one question answered greedily by the original and by the compressed model the run
    made or loaded (chat template unless --no_chat_template), printed one above the other at the
    end of the run and kept in the results JSON ("ask")."""
    from evaluater import load_original, prepare_text_step, results_path, update_results
    from fidelity import response_is_empty
    placement = prepare_text_step(args, session, "--ask's question cannot be tokenized: save the tokenizer "
                                  "with the model")
    if session.compression is None:
        raise DatasetError("--ask compares a compressed model with its original: give --model_path "
                           "(or run step 3 in the same command)")
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, seed=args.seed,
                                chat_template=not args.no_chat_template)
    model = session.model.eval()
    answers = {"compressed": generate(model, session.tokenizer, args.ask, options, placement.input_device)}
    original, original_placement = load_original(args, session)
    answers["original"] = generate(original, session.tokenizer, args.ask, options, original_placement.input_device)
    del original
    ends = end_tokens(model, session.tokenizer)
    print(f"asked: {args.ask}")
    for name in ("original", "compressed"):
        answer = answers[name]
        answer["empty"] = response_is_empty(answer["completion_ids"], answer["completion"], ends)
        text = "(no answer: it ended its turn at once)" if answer["empty"] else " ".join(answer["completion"].split())
        cut = "" if answer["stopped"] == "eos" else f" [cut at --max_new_tokens {args.max_new_tokens}]"
        print(f"  {name + ':':<12}{text}{cut}")
    data = {"question": args.ask, "settings": options.describe(), **answers}
    path = results_path(args, session)
    update_results(path, args, session, "ask", data)
    return data
