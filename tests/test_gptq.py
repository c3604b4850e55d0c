"""Step 8's algorithmic core without a model: min-max grid, RTN, GPTQ and bit packing."""
import pytest
import torch

from gptq import (GPTQ, PACK_BITS, QUANT_BITS, QuantSpec, QuantizedWeight, dequantize, pack,
                  packed_nbytes, packed_row_bytes, rtn, unpack)
from gptq.quant import column_group_index

pytestmark = pytest.mark.usefixtures("one_thread")

OUT, IN, TOKENS = 64, 128, 2048
# Measured GPTQ / RTN output-error ratios on this layer (3 seeds, bits 3/4, groupsize -1/32):
# 0.42-0.46 in column order, 0.37-0.42 with act_order. The assertion leaves room for other seeds.
MAX_RATIO = 0.6


def correlated_inputs(seed: int = 0, tokens: int = TOKENS, width: int = IN) -> torch.Tensor:
    """X = Z A with the rows of A scaled over two decades: a few directions dominate, as in LLMs."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=g) * torch.logspace(0, -2, width)[:, None]
    return torch.randn(tokens, width, generator=g) @ mixing


def layer_weight(seed: int = 10, out: int = OUT, inp: int = IN) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float(torch.linalg.norm(x @ w.T - x @ q.T))


@pytest.fixture(scope="module")
def layer():
    x, w = correlated_inputs(), layer_weight()
    solver = GPTQ(IN)
    for chunk in x.split(512):  # several batches: exercises the running mean
        solver.add_batch(chunk)
    return x, w, solver


def damped_objective(solver: GPTQ, w: torch.Tensor, q: torch.Tensor, percdamp: float = 0.01) -> float:
    """tr((W - Q) (H + damp I) (W - Q)^T) / 2: what GPTQ's per-column losses add up to exactly."""
    H = solver.H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    d = (w - q).double()
    return 0.5 * float(torch.trace(d @ H @ d.T))


# ---------------------------------------------------------------- accumulation


def test_add_batch_is_running_mean_of_2xtx(layer):
    x, _, solver = layer
    expected = 2.0 * x.double().T @ x.double() / x.shape[0]
    assert solver.nsamples == TOKENS
    assert torch.allclose(solver.H, expected, rtol=1e-10, atol=1e-12)
    three_d = GPTQ(IN)
    three_d.add_batch(x.reshape(4, TOKENS // 4, IN))  # (batch, seq, in): tokens are rows
    assert three_d.nsamples == TOKENS and torch.allclose(three_d.H, expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- GPTQ vs RTN


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("groupsize", [-1, 32])
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_correlated_inputs(layer, bits, groupsize, act_order):
    x, w, solver = layer
    spec = QuantSpec(bits, groupsize)
    err_gptq = output_error(x, w, solver.solve(w, spec, act_order=act_order).dequantize())
    err_rtn = output_error(x, w, rtn(w, spec).dequantize())
    ratio = err_gptq / err_rtn
    assert ratio <= MAX_RATIO, (f"GPTQ/RTN output error {ratio:.3f} > {MAX_RATIO} "
                                f"(bits={bits}, groupsize={groupsize}, act_order={act_order}: "
                                f"{err_gptq:.4g} vs {err_rtn:.4g})")


@pytest.mark.parametrize("groupsize", [-1, 32])
def test_gptq_is_rtn_when_inputs_are_uncorrelated(groupsize):
    """A diagonal H means no error feedback: GPTQ must then pick exactly RTN's codes and grid."""
    w = layer_weight()
    solver = GPTQ(IN)
    solver.H = torch.diag(torch.rand(IN, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5)
    solver.nsamples = 1
    spec = QuantSpec(4, groupsize)
    got, ref = solver.solve(w, spec, blocksize=48), rtn(w, spec)
    assert torch.equal(got.codes, ref.codes)
    assert torch.equal(got.scale, ref.scale) and torch.equal(got.zero, ref.zero)


@pytest.mark.parametrize("act_order", [False, True])
def test_blocksize_does_not_change_the_result(layer, act_order):
    """Lazy batch updates are an exact regrouping, and dynamic groups read the columns' current
    values (eager in-block updates and the block's pending update alike), so any blocksize, also
    one that cuts groups in the middle, must give the same codes."""
    _, w, solver = layer
    spec = QuantSpec(4, 32)
    ref = solver.solve(w, spec, blocksize=128, act_order=act_order)
    for blocksize in (1, 20, 48):
        got = solver.solve(w, spec, blocksize=blocksize, act_order=act_order)
        flipped = (got.codes != ref.codes).float().mean().item()
        assert flipped <= 1e-3, f"blocksize {blocksize}: {flipped:.2%} of the codes differ"
        assert torch.allclose(got.scale, ref.scale, rtol=1e-4)


# ---------------------------------------------------------------- the stored result


def _group_value_counts(qw: QuantizedWeight) -> int:
    """The most distinct dequantized values any (row, group) has."""
    deq, groups = qw.dequantize(), qw.group_index()
    return max(int(torch.unique(deq[r, groups == g]).numel())
               for g in torch.unique(groups).tolist() for r in range(deq.shape[0]))


@pytest.mark.parametrize("act_order,static_groups", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("bits", [2, 3])
def test_dequantize_reproduces_the_solve_and_stays_on_the_grid(layer, bits, act_order, static_groups):
    _, w, solver = layer
    spec = QuantSpec(bits, 32)
    qw = solver.solve(w, spec, act_order=act_order, static_groups=static_groups, keep_q=True)
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == w.shape
    assert int(qw.codes.max()) < 2 ** bits
    assert qw.scale.shape == qw.zero.shape == (OUT, IN // 32) and qw.scale.dtype == torch.float32
    assert torch.equal(qw.dequantize(), solver.q_used), "dequantize() is not the Q the error feedback used"
    assert _group_value_counts(qw) <= 2 ** bits
    # and the total of GPTQ's own per-column losses is the damped objective of that Q
    objective = damped_objective(solver, w, qw.dequantize())
    assert solver.last_loss == pytest.approx(objective, rel=1e-5)


def test_act_order_groups_map_to_the_original_columns(layer):
    """With act_order, dynamic groups are runs of 32 columns in quantization order: scattered over
    the original columns. g_idx must say which; reading the codes with the plain j // 32 layout
    (the mix-up this guards against) gives a different, much worse weight."""
    x, w, solver = layer
    spec = QuantSpec(3, 32)
    qw = solver.solve(w, spec, act_order=True, keep_q=True)
    assert qw.perm is not None and sorted(qw.perm.tolist()) == list(range(IN))
    assert torch.equal(qw.g_idx.long(), torch.argsort(qw.perm) // 32)
    assert torch.bincount(qw.g_idx.long()).tolist() == [32] * (IN // 32)
    deq = qw.dequantize()
    assert torch.equal(deq, solver.q_used)
    assert solver.last_loss == pytest.approx(damped_objective(solver, w, deq), rel=1e-5)
    plain = dequantize(qw.codes, qw.scale, qw.zero, groupsize=32)
    assert not torch.equal(plain, deq)
    assert output_error(x, w, plain) > 2 * output_error(x, w, deq)
    # static groups: original column groups, no g_idx, parameters from the unmodified weight
    static = solver.solve(w, spec, act_order=True, static_groups=True, keep_q=True)
    assert static.g_idx is None and torch.equal(static.dequantize(), solver.q_used)
    assert torch.equal(static.scale, rtn(w, spec).scale)


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_input_columns(act_order):
    """Inputs that are always 0 give H_jj = 0: the solve must stay finite and store 0 there."""
    x, w = correlated_inputs(seed=1), layer_weight(seed=11)
    dead = [0, 5, 77, IN - 1]
    x[:, dead] = 0
    solver = GPTQ(IN)
    solver.add_batch(x)
    qw = solver.solve(w, QuantSpec(4, 32), act_order=act_order)
    deq = qw.dequantize()
    assert torch.isfinite(deq).all() and torch.isfinite(qw.scale).all()
    assert torch.equal(deq[:, dead], torch.zeros(OUT, len(dead)))
    assert output_error(x, w, deq) < MAX_RATIO * output_error(x, w, rtn(w, QuantSpec(4, 32)).dequantize())


# ---------------------------------------------------------------- RTN and the grid


@pytest.mark.parametrize("sym", [False, True])
def test_rtn_every_bit_width(sym):
    w = layer_weight(seed=4, out=16, inp=96)
    errors = []
    for bits in QUANT_BITS:
        qw = rtn(w, QuantSpec(bits, 32, sym))
        assert int(qw.codes.max()) <= 2 ** bits - 1
        step = qw.scale[:, column_group_index(96, 32)]
        err = (qw.dequantize() - w).abs()
        assert (err <= step / 2 * (1 + 1e-5)).all(), f"bits={bits}: an entry is off the min-max range"
        assert _group_value_counts(qw) <= 2 ** bits
        errors.append(float(err.norm()))
    assert errors == sorted(errors, reverse=True), f"more bits did not lower the error: {errors}"


def test_spec_validation_and_zero_rows():
    for bad in (1, 5, 7, 16):
        with pytest.raises(ValueError):
            QuantSpec(bad)
    with pytest.raises(ValueError):
        QuantSpec(4, groupsize=0)
    w = torch.zeros(3, 10)
    w[1, 3] = -2.0
    for sym in (False, True):
        deq = rtn(w, QuantSpec(4, 4, sym)).dequantize()
        assert torch.isfinite(deq).all() and torch.equal(deq[w == 0], w[w == 0])
        # -2 is as exact as the stored float16 scale allows (15 x 2/15 rounded up to float16)
        assert torch.allclose(deq, w, rtol=2 ** -10, atol=0)


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", PACK_BITS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 13), (2, 3, 17), (4, 24), (2, 0)])
def test_pack_round_trip(bits, shape):
    codes = torch.randint(0, 2 ** bits, shape, generator=torch.Generator().manual_seed(sum(shape)),
                          dtype=torch.uint8)
    if codes.numel():
        codes.view(-1)[0] = 2 ** bits - 1  # the largest code is in there
    packed, got_shape = pack(codes, bits)
    rows = 1
    for s in shape[:-1]:
        rows *= s
    per_unit = {8: (1, 1), 4: (2, 1), 2: (4, 1), 3: (8, 3)}[bits]
    row_bytes = -(-shape[-1] // per_unit[0]) * per_unit[1]
    assert packed.dtype == torch.uint8 and packed.shape == (rows, row_bytes)
    assert packed_row_bytes(shape[-1], bits) == row_bytes
    assert got_shape == torch.Size(shape)
    assert torch.equal(unpack(packed, bits, got_shape), codes)


def test_pack_documented_bit_layout():
    four, _ = pack(torch.tensor([[1, 2, 15]], dtype=torch.uint8), 4)
    assert four.tolist() == [[0x21, 0x0F]]  # low nibble first, padded with a zero code
    two, _ = pack(torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8), 2)
    assert two.tolist() == [[1 | 2 << 2 | 3 << 4, 3]]
    c = [5, 3, 6, 1, 7, 2, 4, 7]
    three, _ = pack(torch.tensor([c], dtype=torch.uint8), 3)
    expected = [c[0] | c[1] << 3 | (c[2] & 3) << 6,
                c[2] >> 2 | c[3] << 1 | c[4] << 4 | (c[5] & 1) << 7,
                c[5] >> 1 | c[6] << 2 | c[7] << 5]
    assert three.tolist() == [expected]


def test_pack_rejects_what_it_cannot_store():
    with pytest.raises(ValueError):
        pack(torch.zeros(2, 4, dtype=torch.uint8), 6)
    with pytest.raises(ValueError):
        pack(torch.full((2, 4), 8, dtype=torch.uint8), 3)
    with pytest.raises(TypeError):
        pack(torch.zeros(2, 4, dtype=torch.int32), 4)
    packed, shape = pack(torch.zeros(2, 9, dtype=torch.uint8), 3)
    with pytest.raises(ValueError):
        unpack(packed, 3, (2, 17))


@pytest.mark.parametrize("bits,groupsize", [(3, 128), (4, 128), (4, -1), (2, 64), (8, -1)])
def test_packed_size_is_theoretical(bits, groupsize):
    out, inp = 96, 1000
    n_groups = 1 if groupsize == -1 else -(-inp // groupsize)
    theory = packed_nbytes((out, inp), bits, groupsize)
    assert theory == -(-out * inp * bits // 8) + 4 * out * n_groups
    codes = torch.randint(0, 2 ** bits, (out, inp), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed, _ = pack(codes, bits)
    actual = packed.numel() + 2 * 2 * out * n_groups  # float16 scale and zero per (row, group)
    assert theory <= actual <= 1.02 * theory, (actual, theory)
