import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
WIKI_VALID = os.path.join(SHARED_DATA, "wikitext2", "wiki.valid.tokens")


@pytest.fixture(scope="session")
def wiki_valid() -> str:
    if not os.path.isfile(WIKI_VALID):
        pytest.skip(f"shared data not found at {WIKI_VALID}")
    return WIKI_VALID


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices on a shared 2-core machine: a second OpenMP thread only adds waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def profiled_tiny_llama():
    """A tiny random Llama, 4 random windows of 16 tokens and its step-1 statistics (one per test module)."""
    from tests.tiny_models import tiny_model
    from utils.pipeline import profile_model
    model = tiny_model("llama")
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    return model, windows, profile_model(model, windows, "cpu")
