"""SmolLM2-135M end to end: whitened SVD keeps the model usable where plain SVD breaks it."""
import copy
import math

import pytest

import api
from tests.conftest import WIKI_VALID

pytestmark = [pytest.mark.integration("smollm2", "wikitext2/wiki.valid.tokens"), pytest.mark.slow]

SEQ_LEN = 256


@pytest.fixture(scope="module")
def smollm2():
    from utils.model import load_model
    return load_model("smollm2-135m")


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
    windows = api.calibration_windows(f"{WIKI_VALID}[0:0.8]", tokenizer, 16, SEQ_LEN, seed=0)
    stats = api.profile_model(base, windows, "cpu")
    whitened = copy.deepcopy(base)
    block = api.compress_model(whitened, api.uniform_plan(whitened, 0.2), api.CompressOptions(), "cpu", stats)
    assert len(block["ranks"]) == 210 and block["plan"]["ratio"] == 0.2
    whitened_ppl = held_out_ppl(whitened, tokenizer)

    plain = copy.deepcopy(base)
    api.compress_model(plain, api.uniform_plan(plain, 0.2),
                       api.CompressOptions(api.DecomposeOptions(whitening="none")), "cpu")
    plain_ppl = held_out_ppl(plain, tokenizer)
    print(f"held-out ppl: original {original_ppl:.2f}, whitened {whitened_ppl:.2f}, plain {plain_ppl:.2f}")
    assert math.isfinite(whitened_ppl)
    assert original_ppl < whitened_ppl < plain_ppl / 5
