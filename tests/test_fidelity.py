"""Chat fidelity (fidelity.py, step 4 --eval_chat, step 9 --compare): a model agrees fully with
itself, a perturbed copy does not, the original's responses are cached, an end token first is an
empty answer, and the CLI writes the figures beside perplexity."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import compress
import fidelity
from scripts.sweep import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["hello there", "what is two and two", "name a colour"]
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def chat_model(tiny_dir):
    """The tiny random Llama and its byte tokenizer, given a chat template. Its weights are redrawn
    larger: at the default init (std 0.02) the residual stream is the input embedding, so the model
    only repeats its last token, whatever its layers do."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.chat_template = TEMPLATE
    return model, tokenizer


@pytest.fixture(scope="module")
def chat_dir(chat_model, tmp_path_factory):
    """chat_model saved, for the command line."""
    path = str(tmp_path_factory.mktemp("chat") / "tiny-chat")
    chat_model[0].save_pretrained(path)
    chat_model[1].save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def references(chat_model, tmp_path_factory):
    model, tokenizer = chat_model
    responses, info = fidelity.reference_responses(model, tokenizer, PROMPTS, 10,
                                                   cache_dir=str(tmp_path_factory.mktemp("cache")))
    return responses, info


def test_the_original_against_itself_agrees_fully(chat_model, references):
    model, tokenizer = chat_model
    responses, info = references
    assert not info["from_cache"] and all(len(r["ids"]) >= 1 for r in responses)
    result = fidelity.chat_fidelity(model, tokenizer, PROMPTS, responses)
    assert result["agreement"] == 1.0 and result["agreement_prompt_mean"] == 1.0
    assert result["empty_share"] == 0.0 and result["exact_match_share"] == 1.0
    assert result["prefix_agreement_mean"] == 1.0
    assert result["reference_tokens"] == sum(len(r["ids"]) for r in responses)
    assert 1.0 <= result["response_ppl"] < 256  # the model's own greedy tokens: likelier than uniform


def test_a_perturbed_model_agrees_less(chat_model, references):
    model, tokenizer = chat_model
    responses, _ = references
    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in noisy.model.layers.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * parameter.std())
    result = fidelity.chat_fidelity(noisy, tokenizer, PROMPTS, responses)
    itself = fidelity.chat_fidelity(model, tokenizer, PROMPTS, responses)
    assert result["agreement"] < 1.0 and result["exact_match_share"] < 1.0
    assert result["response_ppl"] > itself["response_ppl"]


def test_the_references_are_cached_and_keyed_by_the_weights(chat_model, references, monkeypatch):
    model, tokenizer = chat_model
    responses, info = references
    cache_dir = info["path"].rsplit("/", 1)[0]

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached responses should have been used")

    monkeypatch.setattr(fidelity, "greedy_responses", no_generation)
    again, second = fidelity.reference_responses(model, tokenizer, PROMPTS, 10, cache_dir=cache_dir)
    assert second["from_cache"] and second["key"] == info["key"] and again == responses
    # other settings or other weights: another key, so a generation
    for other_model, tokens in ((model, 11), (copy.deepcopy(model).requires_grad_(False), 10)):
        if tokens == 10:
            other_model.lm_head.weight.data[0, 0] += 1.0
        with pytest.raises(AssertionError, match="cached responses"):
            fidelity.reference_responses(other_model, tokenizer, PROMPTS, tokens, cache_dir=cache_dir)


def test_a_model_that_ends_its_turn_first_answers_nothing(chat_model, references):
    model, tokenizer = chat_model
    responses, _ = references
    end = fidelity.end_tokens(model, tokenizer)[0]
    silent = copy.deepcopy(model)

    def push_end_token(module, inputs, output):
        output[..., end] += 100.0
        return output

    silent.lm_head.register_forward_hook(push_end_token)
    result = fidelity.chat_fidelity(silent, tokenizer, PROMPTS, responses)
    assert result["empty_share"] == 1.0 and result["reference_empty_share"] == 0.0
    assert all(p["empty"] for p in result["per_prompt"])  # its end token is a plain byte here: empty by id
    assert fidelity.response_is_empty([5, 6], " \n", [end]) and not fidelity.response_is_empty([5], "a", [end])


def test_prefix_agreement_figures():
    result = fidelity.prefix_agreement([[1, 2, 3], [4, 5], [7]], [[1, 2, 9], [4, 5], [8, 9]])
    assert result["exact_match_share"] == pytest.approx(1 / 3)
    assert result["prefix_agreement_mean"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_step4_eval_chat_beside_perplexity_and_reused_cache(chat_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    saved, cache = tmp_path / "c", tmp_path / "cache"
    common = ["--eval_datasets", "pydoc", "--model_seq_len", "32", "--eval_limit", "1", "--device", "cpu",
              "--eval_chat", str(prompts), "--eval_chat_tokens", "6", "--eval_chat_cache", str(cache)]
    assert compress.main(["--step", "3,4", "--model", chat_dir, "--whitening", "none", "--ratio", "0.6",
                          "--save_path", str(saved)] + common) == 0
    assert "reference generated" in capsys.readouterr().out
    record = json.loads((saved / "results.json").read_text())
    chat = record["chat_fidelity"]
    assert "pydoc" in record["perplexity"] and chat["prompts"] == 3
    assert 0.0 <= chat["agreement"] < 1.0 and chat["settings"]["max_new_tokens"] == 6
    assert chat["settings"]["reference_cache"]["from_cache"] is False and len(list(cache.iterdir())) == 1
    assert compress.main(["--step", "4", "--model_path", str(saved)] + common) == 0
    assert "reference from cache" in capsys.readouterr().out
    again = json.loads((saved / "results.json").read_text())["chat_fidelity"]
    assert again["settings"]["reference_cache"]["from_cache"] is True and again["agreement"] == chat["agreement"]


def test_step9_compare_reports_agreement(chat_dir, tmp_path):
    saved = tmp_path / "c"
    assert compress.main(["--step", "3", "--model", chat_dir, "--whitening", "none", "--ratio", "0.6",
                          "--save_path", str(saved)]) == 0
    args = ["--step", "9", "--model_path", str(saved), "--compare", "--max_new_tokens", "6", "--device", "cpu",
            "--results", str(tmp_path / "r.json")] + [x for p in PROMPTS for x in ("--prompt", p)]
    assert compress.main(args) == 0
    data = json.loads((tmp_path / "r.json").read_text())["generation"]
    expected = fidelity.prefix_agreement([r["model"]["completion_ids"] for r in data["completions"]],
                                         [r["original"]["completion_ids"] for r in data["completions"]])
    assert data["agreement"]["exact_match_share"] == expected["exact_match_share"]
    assert data["agreement"]["prefix_agreement_mean"] == expected["prefix_agreement_mean"] < 1.0


@pytest.mark.parametrize("extra,needle", [
    (["--step", "4", "--eval_chat", "/nonexistent.txt"], "--eval_chat /nonexistent.txt"),
    (["--step", "9", "--prompt", "x", "--eval_chat", "PROMPTS"], "add 4 to --step"),
    (["--step", "4", "--eval_chat", "PROMPTS", "--eval_chat_tokens", "0"], "--eval_chat_tokens 0"),
    (["--step", "4", "--eval_chat_tokens", "8"], "give --eval_chat"),
    (["--step", "4", "--eval_chat", "EMPTY"], "has no prompts"),
])
def test_bad_chat_evaluation_input_exits_2(extra, needle, tiny_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a prompt\n")
    (tmp_path / "e.txt").write_text("\n")
    extra = [str(tmp_path / "p.txt") if x == "PROMPTS" else str(tmp_path / "e.txt") if x == "EMPTY" else x
             for x in extra]
    assert compress.main(["--model", tiny_dir, "--device", "cpu", "--eval_datasets", "pydoc"] + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


@pytest.mark.integration("smollm2")
@pytest.mark.slow
def test_smollm2_answers_and_agrees_with_itself(tmp_path):
    from utils.model import load_model
    model, tokenizer = load_model("smollm2-135m", torch.float32)
    prompts = ["What is the capital of France?", "List three primary colors."]
    responses, _ = fidelity.reference_responses(model, tokenizer, prompts, 24, cache_dir=str(tmp_path))
    assert "Paris" in responses[0]["text"] and responses[0]["stopped"] == "eos"
    result = fidelity.chat_fidelity(model, tokenizer, prompts, responses)
    # teacher forcing without the KV cache picks the tokens greedy decoding with it picked
    assert result["agreement"] == 1.0 and result["empty_share"] == 0.0 and result["exact_match_share"] == 1.0
