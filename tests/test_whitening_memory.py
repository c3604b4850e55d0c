"""The Cholesky whitening factor in bounded memory: besides the Gram, one n x n float64 buffer
(an 11008-wide MLP Gram of a 7B model is 0.97 GB in float64), with the factor bit for bit what
the formula gives (cholesky of (H + H^T) / 2 + s I, H + s * eye as a new tensor)."""
import subprocess
import sys
import textwrap

import pytest
import torch

from utils.stats import pack_upper, unpack_upper
from utils.whitening import cholesky_factor, symmetric_float64, transpose_in_place


def formula_factor(gram: torch.Tensor, shift: float | None) -> torch.Tensor:
    gram = gram.to(torch.float64)
    gram = (gram + gram.T) / 2
    if shift is None:
        return torch.linalg.cholesky(gram)
    return torch.linalg.cholesky(gram + shift * torch.eye(gram.shape[0], dtype=torch.float64))


@pytest.mark.parametrize("tokens", [40, 400])  # rank-deficient (the shift ladder) and full rank
@pytest.mark.parametrize("layout", ["float32", "packed_float64", "asymmetric"])
def test_factor_is_the_formulas_bit_for_bit(tokens, layout):
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 300, generator=generator, dtype=torch.float64)
    if tokens < 300:
        x[:, 7] = 0.0  # a dead channel: its Gram row is signed zeros
    x[:, 8] *= -1e-3
    gram = (x.T @ x).float()
    if layout == "packed_float64":
        gram = unpack_upper(pack_upper(gram), 300, dtype=torch.float64)
    elif layout == "asymmetric":  # a full Gram summed in another order: not exactly symmetric
        gram = gram + 1e-7 * torch.randn(300, 300, generator=generator)
    factor = cholesky_factor(gram)
    assert factor.fallback == (tokens < 300)
    expected = formula_factor(gram, factor.shift)
    assert factor.factor.is_contiguous()
    assert torch.equal(factor.factor, expected)
    assert torch.equal(factor.factor.signbit(), expected.signbit())


@pytest.mark.parametrize("n", [1, 5, 512, 1100])
def test_transpose_in_place(n):
    matrix = torch.randn(n, n, dtype=torch.float64)
    expected = matrix.T.clone()
    assert torch.equal(transpose_in_place(matrix, block=256), expected)


def test_symmetric_float64_copies_only_when_needed():
    symmetric = unpack_upper(pack_upper(torch.randn(50, 50).double()), 50)
    assert symmetric_float64(symmetric) is symmetric
    other = symmetric.clone()
    other[0, 1] += 1.0
    assert torch.equal(symmetric_float64(other), (other + other.T) / 2)


def matrices_above_base(build: str, factor: str, n: int = 3000) -> float:
    """Peak resident memory a factorisation adds, in n x n float64 matrices, measured in a fresh
    process: `build` makes the input (nothing of it counted), `factor` is timed against VmHWM."""
    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, %r)
        from utils.stats import PackedGram, pack_upper
        from utils.whitening import cholesky_factor
        def hwm():
            return int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))) * 1024
        n = %d
    """ % (sys.path[0], n)) + textwrap.dedent(build) + textwrap.dedent("""
        base = hwm()
    """) + textwrap.dedent(factor) + textwrap.dedent("""
        assert result.fallback
        print((hwm() - base) / (n * n * 8))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": ""}, cwd=sys.path[0])
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.strip().splitlines()[-1])


def test_cholesky_ladder_holds_one_buffer_besides_the_gram():
    """A rank-deficient 3000-wide factorisation (four Cholesky attempts): under 1.4 matrices above
    the Gram itself (the factor and small blocks). The old code (H + s * eye, eye and every factor
    as new tensors) took about 5."""
    matrices = matrices_above_base("""
        x = torch.randn(1000, n, dtype=torch.float64)
        gram = torch.empty(n, n, dtype=torch.float64)
        torch.mm(x.T, x, out=gram)
        del x
    """, "result = cholesky_factor(gram)")
    assert matrices < 1.4, matrices


@pytest.mark.parametrize("tokens", [40, 400])
def test_factor_from_the_packed_triangle_is_the_same(tokens):
    from utils.stats import PackedGram
    x = torch.randn(tokens, 300, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gram = (x.T @ x).float()
    packed = pack_upper(gram)
    from_packed = cholesky_factor(PackedGram(packed, 300))
    from_matrix = cholesky_factor(unpack_upper(packed, 300))
    assert from_packed.shift == from_matrix.shift and from_packed.fallback == (tokens < 300)
    assert torch.equal(from_packed.factor, from_matrix.factor)
    assert torch.equal(from_packed.factor, formula_factor(unpack_upper(packed, 300), from_packed.shift))


def test_packed_cholesky_holds_its_buffer_alone():
    """From the packed triangle, the rank-deficient factorisation's peak is the factor's buffer
    (one matrix) and small blocks: no full Gram beside it."""
    matrices = matrices_above_base("""
        x = torch.randn(1000, n)
        packed = pack_upper(x.T @ x)
        del x
    """, "result = cholesky_factor(PackedGram(packed, n))")
    assert matrices < 1.25, matrices


@pytest.mark.parametrize("extra, kept", [([], 0), (["--update", "closed_form"], 7)])
def test_dense_weights_are_kept_only_for_a_pass_that_reads_them(tmp_path, monkeypatch, extra, kept):
    """After the decomposition, a layer's replaced dense weights stay in memory only when a later
    pass (closed-form / anchored update, refinement) reads them: 7 per Llama layer, else none."""
    import compress
    from methods.decompose import Decompose
    from tests.tiny_models import save_tiny_model
    held: list[int] = []
    decompose = Decompose.__call__

    def counting(self, context):
        decompose(self, context)
        held.append(len(context.scratch.get("original_weights", {})))

    monkeypatch.setattr(Decompose, "__call__", counting)
    model = save_tiny_model("llama", str(tmp_path / "m"))
    assert compress.main(["--step", "1,3", "--model", model, "--dataset", "random", "--whitening_nsamples", "4",
                          "--model_seq_len", "16", "--ratio", "0.4", "--device", "cpu",
                          "--save_path", str(tmp_path / "out"), *extra]) == 0
    assert held and all(count == kept for count in held), held
