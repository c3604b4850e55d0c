"""A saved compressed directory loads in plain transformers only through its own remote code.

Without trust_remote_code=True transformers must refuse (it used to build the dense base model
and run on random weights); with it, modeling_svd_compress.py must give exactly our loader's logits.
"""
import ast
import builtins
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file, save_model
from transformers import AutoModelForCausalLM

from component import LowRankLinear
from tests.tiny_models import FAMILIES, tiny_model
from utils import hf_remote
from utils.io import is_compressed_model, load_compressed, save_compressed
from utils.model import decoder_layers, layer_prefix, set_submodule, target_linears


def make_low_rank(family: str) -> tuple[torch.nn.Module, dict]:
    """A tiny model with about half its target linears (biases kept) replaced by random factors."""
    model = tiny_model(family)
    generator = torch.Generator().manual_seed(7)
    prefix, ranks = layer_prefix(model), {}
    for index, layer in enumerate(decoder_layers(model)):
        for position, (name, dense) in enumerate(sorted(target_linears(layer).items())):
            if position % 2 != index % 2:
                continue
            rank = 3 + position
            u = torch.randn(dense.out_features, rank, generator=generator) / rank ** 0.5
            v = torch.randn(rank, dense.in_features, generator=generator) / dense.in_features ** 0.5
            bias = None if dense.bias is None else dense.bias.detach().clone()
            qualified = f"{prefix}.{index}.{name}"
            set_submodule(model, qualified, LowRankLinear.from_factors(u, v, bias, torch.float32, "cpu"))
            ranks[qualified] = rank
    return model.eval(), {"format_version": 1, "base_model": "tiny", "ranks": ranks}


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    family = request.param
    model, compression = make_low_rank(family)
    path = str(tmp_path_factory.mktemp("remote") / f"compressed-{family}")
    save_compressed(model, None, path, compression)
    return family, path, model


@pytest.fixture
def no_prompt(monkeypatch):
    """A non-interactive session: transformers' "run the custom code? [y/N]" prompt gets EOF.
    Yields the prompts shown, so a test can check that none was."""
    prompts = []

    def refuse(prompt=""):
        prompts.append(prompt)
        raise EOFError("no terminal")
    monkeypatch.setattr(builtins, "input", refuse)
    return prompts


def random_ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))


def test_remote_code_gives_our_loaders_logits(saved, no_prompt):
    family, path, original = saved
    ours, _, compression = load_compressed(path, fuse=True)  # as the remote code: v factors fused
    assert no_prompt == []
    remote = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    assert type(remote).__name__ == "SvdCompress" + compression["base_architecture"]
    for name, rank in compression["ranks"].items():
        module = remote.get_submodule(name)
        assert module.rank == rank and module.v.weight.shape[0] == rank
        assert (module.u.bias is None) == (ours.get_submodule(name).u.bias is None)
    ids = random_ids()
    with torch.no_grad():
        expected = ours(ids).logits
        # both loaders fuse the v factors of q/k/v and gate/up (one matmul): float rounding only
        unfused = original(ids).logits
        assert (unfused - expected).abs().max() <= 1e-6 * unfused.abs().max()
        assert torch.equal(remote(ids).logits, expected)
    if ours.config.tie_word_embeddings:
        assert remote.lm_head.weight is remote.get_input_embeddings().weight
    generated = remote.generate(ids[:1, :6], max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, ours.generate(ids[:1, :6], max_new_tokens=3, do_sample=False))


def test_saved_model_generates_with_the_kv_cache(saved, no_prompt):
    """Calibration turns the cache off on the model it compresses; the export must not keep that:
    generate() would run the whole sequence for every new token."""
    family, path, _ = saved
    model, compression = make_low_rank(family)
    model.config.use_cache = False  # as load_model leaves it
    save_compressed(model, None, path + "-nocache", compression)
    remote = AutoModelForCausalLM.from_pretrained(path + "-nocache", trust_remote_code=True)
    lengths = []
    hook = remote.get_input_embeddings().register_forward_hook(lambda m, i, o: lengths.append(i[0].shape[1]))
    remote.generate(random_ids()[:1, :6], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    hook.remove()
    assert lengths == [6, 1, 1]  # one new token per step after the prompt


def test_remote_base_model_gives_our_hidden_states(saved, no_prompt):
    """AutoModel (what vLLM's Transformers backend builds) must be the low-rank decoder, not the dense one."""
    from transformers import AutoModel
    _, path, _ = saved
    ours, _, compression = load_compressed(path)
    remote = AutoModel.from_pretrained(path, trust_remote_code=True)
    assert type(remote).__name__ == "SvdCompress" + type(ours.base_model).__name__
    prefix = ours.base_model_prefix + "."
    for name, rank in compression["ranks"].items():
        assert remote.get_submodule(name.removeprefix(prefix)).rank == rank
    with torch.no_grad():
        assert torch.equal(remote(random_ids()).last_hidden_state, ours.base_model(random_ids()).last_hidden_state)


@pytest.mark.parametrize("trust", [None, False])
def test_auto_class_refuses_without_trust_remote_code(saved, no_prompt, trust):
    _, path, _ = saved
    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)  # registering its classes changes nothing
    kwargs = {} if trust is None else {"trust_remote_code": trust}
    with pytest.raises(ValueError, match="contains custom code") as raised:
        AutoModelForCausalLM.from_pretrained(path, **kwargs)
    assert "trust_remote_code=True" in str(raised.value)


def test_concrete_base_class_refuses(saved, no_prompt):
    _, path, _ = saved
    config = json.load(open(os.path.join(path, "config.json")))
    base_class = getattr(transformers, config["compression"]["base_architecture"])
    with pytest.raises(Exception, match="SVD low-rank compressed") as raised:
        base_class.from_pretrained(path)
    assert "trust_remote_code=True" in str(raised.value)
    with pytest.raises(Exception, match="SVD low-rank compressed"):
        base_class.config_class.from_pretrained(path)


def test_config_layout(saved):
    family, path, original = saved
    config = json.load(open(os.path.join(path, "config.json")))
    base_type = original.config.model_type
    assert config["model_type"] == f"svd_compress_{base_type}"
    assert config["compression"]["base_model_type"] == base_type
    assert config["compression"]["base_architecture"] == type(original).__name__
    module = os.path.splitext(hf_remote.MODELING_FILE)[0]
    # vLLM's Transformers backend imports them in this order and builds the AutoModel one
    assert list(config["auto_map"]) == ["AutoConfig", "AutoModel", "AutoModelForCausalLM"]
    assert all(ref.startswith(module + ".") for ref in config["auto_map"].values())
    assert config["architectures"] == [config["auto_map"]["AutoModelForCausalLM"].split(".")[1]]
    assert is_compressed_model(path)


def test_modeling_file_imports_only_torch_and_transformers(saved):
    _, path, _ = saved
    tree = ast.parse(open(os.path.join(path, hf_remote.MODELING_FILE)).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("__import__", "exec", "eval"):
            pytest.fail(f"dynamic import or exec in the modeling file: line {node.lineno}")
    assert imported == {"torch", "transformers"}


def test_our_loader_never_runs_the_remote_code(saved, no_prompt, tmp_path):
    _, path, original = saved
    booby_trapped = str(tmp_path / "trapped")
    os.makedirs(booby_trapped)
    for name in ("config.json", "model.safetensors"):
        os.link(os.path.join(path, name), os.path.join(booby_trapped, name))
    with open(os.path.join(booby_trapped, hf_remote.MODELING_FILE), "w") as handle:
        handle.write("raise RuntimeError('remote code was executed')\n")
    model, _, _ = load_compressed(booby_trapped)
    assert no_prompt == []
    with torch.no_grad():
        assert torch.equal(model(random_ids()).logits, original(random_ids()).logits)


def test_old_layout_still_loads(saved, tmp_path):
    """Directories written before the remote code: plain base model_type, no auto_map, no .py."""
    family, path, original = saved
    old = str(tmp_path / "old")
    os.makedirs(old)
    compression = json.load(open(os.path.join(path, "config.json")))["compression"]
    compression = {k: v for k, v in compression.items() if k not in ("base_model_type", "base_architecture")}
    config = original.config.to_dict()
    config["compression"] = compression
    save_model(original, os.path.join(old, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(old, "config.json"), "w") as handle:
        json.dump(config, handle, default=str)
    assert is_compressed_model(old)
    model, _, loaded = load_compressed(old)
    assert loaded["ranks"] == compression["ranks"]
    with torch.no_grad():
        assert torch.equal(model(random_ids()).logits, original(random_ids()).logits)


def test_remote_code_refuses_tensors_that_do_not_match(saved, no_prompt, tmp_path):
    _, path, _ = saved
    bad = str(tmp_path / "missing")
    os.makedirs(bad)
    for name in ("config.json", hf_remote.MODELING_FILE):
        os.link(os.path.join(path, name), os.path.join(bad, name))
    tensors = load_file(os.path.join(path, "model.safetensors"))
    tensors.pop(next(k for k in sorted(tensors) if k.endswith(".u.weight")))
    save_file(tensors, os.path.join(bad, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="do not match the recorded low-rank"):
        AutoModelForCausalLM.from_pretrained(bad, trust_remote_code=True)


def test_saved_tokenizer_loads_without_a_prompt(no_prompt, tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer(WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    model, compression = make_low_rank("llama")
    path = str(tmp_path / "with-tokenizer")
    save_compressed(model, tokenizer, path, compression)
    _, loaded, _ = load_compressed(path)
    assert loaded is not None and loaded("hello world")["input_ids"] == [1, 2]
    assert no_prompt == []  # AutoTokenizer reads config.json too: it must not offer to run the code


def _word_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer(WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def _run_quiet(code: str, tmp_path) -> tuple[str, str]:
    """Run `code` in a fresh interpreter with stdin closed (a prompt would read EOF) and a timeout
    (a prompt waiting on a terminal would hang); (stdout, stderr)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "default"})
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def test_loading_a_compressed_model_prints_nothing(tmp_path):
    # every load used to log transformers' "You are using a model of type `svd_compress_llama` to
    # instantiate a model of type ``" (AutoTokenizer falling back to a generic config)
    model, compression = make_low_rank("llama")
    path = str(tmp_path / "quiet")
    save_compressed(model, _word_tokenizer(), path, compression)
    out, err = _run_quiet(f"from utils.io import load_compressed\n"
                          f"_, t, _ = load_compressed({path!r})\nprint(t('hello world')['input_ids'])", tmp_path)
    assert out.strip() == "[1, 2]"
    assert err == ""


def test_exported_tokenizer_loads_without_remote_code_or_prompt(tmp_path):
    # README's sharing line: AutoTokenizer with trust_remote_code=False asks nothing (a prompt would
    # read EOF from the closed stdin and print its question), executes nothing from the directory (the
    # modeling file is booby-trapped) and warns nothing; the ids are the source tokenizer's
    tokenizer = _word_tokenizer()
    model, compression = make_low_rank("llama")
    path = str(tmp_path / "shared")
    save_compressed(model, tokenizer, path, compression)
    with open(os.path.join(path, hf_remote.MODELING_FILE), "w") as handle:
        handle.write("raise RuntimeError('remote code was executed')\n")
    out, err = _run_quiet(f"from transformers import AutoTokenizer\n"
                          f"t = AutoTokenizer.from_pretrained({path!r}, trust_remote_code=False)\n"
                          f"print(t('hello world there')['input_ids'])", tmp_path)
    assert out.strip() == str(tokenizer("hello world there")["input_ids"]) == "[1, 2, 0]"
    assert err == ""


def test_exported_tokenizer_in_process_asks_nothing(no_prompt, tmp_path):
    from transformers import AutoTokenizer
    tokenizer = _word_tokenizer()
    model, compression = make_low_rank("qwen2")
    path = str(tmp_path / "in-process")
    save_compressed(model, tokenizer, path, compression)
    loaded = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    assert loaded("world hello [UNK] x")["input_ids"] == tokenizer("world hello [UNK] x")["input_ids"] == [2, 1, 0, 0]
    assert no_prompt == []
    # left unset, transformers asks before it reads the tokenizer files (resolve_trust_remote_code);
    # a refused question still loads the tokenizer: nothing in the directory is needed for it
    unset = AutoTokenizer.from_pretrained(path)
    assert len(no_prompt) == 1 and "[y/N]" in no_prompt[0]
    assert unset("hello world")["input_ids"] == [1, 2]


@pytest.mark.parametrize("loader", ["AutoConfig", "AutoModel", "AutoModelForCausalLM"])
def test_the_model_still_needs_trust_remote_code(saved, no_prompt, loader):
    """The tokenizer entry must not open a way around the guard: every Auto class refuses loudly
    with trust_remote_code=False, before building anything."""
    _, path, _ = saved
    with pytest.raises(ValueError, match="contains custom code") as raised:
        getattr(transformers, loader).from_pretrained(path, trust_remote_code=False)
    assert "trust_remote_code=True" in str(raised.value)
    assert no_prompt == []


@pytest.mark.integration("smollm2")
def test_exported_smollm2_tokenizer_matches_the_source(tmp_path):
    # the bundled model's byte-level BPE tokenizer (read from its GGUF) through README's line: same ids,
    # same special tokens and chat template, no prompt, no warning
    from utils.model import load_tokenizer, resolve_model
    source = load_tokenizer(resolve_model("smollm2-135m"))
    model, compression = make_low_rank("llama")
    path = str(tmp_path / "smollm2-tokenizer")
    save_compressed(model, source, path, compression)
    text = "Hello world, the quick brown fox <|im_start|>user\n 123 ünïcode\tdef f(x): return x"
    out, err = _run_quiet(f"from transformers import AutoTokenizer\n"
                          f"t = AutoTokenizer.from_pretrained({path!r}, trust_remote_code=False)\n"
                          f"print(t({text!r})['input_ids'])\nprint(t.chat_template == {source.chat_template!r})",
                          tmp_path)
    ids, same_template = out.strip().splitlines()
    assert ids == str(source(text)["input_ids"]) and same_template == "True"
    assert err == ""
