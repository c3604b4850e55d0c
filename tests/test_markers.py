"""The conftest's integration marker: a missing need skips the test and the default output says why;
with CI set it fails instead (CI installs the bundled model and the shared data)."""
import os
import shutil
import subprocess
import sys

import pytest

CONFTEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conftest.py")
TEST = '''
import pytest

@pytest.mark.integration("no/such/file")
def test_needs_a_missing_file():
    pass

def test_plain():
    pass
'''


def run_pytest(directory, ci: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(directory)],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    directory = tmp_path_factory.mktemp("suite")
    shutil.copy(CONFTEST, directory / "conftest.py")
    (directory / "test_needs.py").write_text(TEST)
    return directory


def test_missing_need_skips_and_the_default_output_says_why(suite):
    result = run_pytest(suite, ci=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 1 skipped" in result.stdout
    assert "1 integration test(s) skipped: shared data not found at " in result.stdout
    assert os.path.join("no", "such", "file") in result.stdout


def test_missing_need_fails_when_ci_is_set(suite):
    result = run_pytest(suite, ci=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 passed, 1 error" in result.stdout and "skipped" not in result.stdout
    assert "CI is set: integration tests must run, not skip" in result.stdout
