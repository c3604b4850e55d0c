"""Truncation-aware data whitening (SVD-LLM).

Let X (tokens x in) be a linear layer's calibration inputs and H = X^T X (in x in) their Gram
matrix. Any S with S S^T = H makes S^-1 X^T have orthonormal rows, so for W' = (W S)_r S^-1
(the rank-r truncation of W S mapped back):

    ||(W - W') X^T||_F = ||(W S - (W S)_r) S^-1 X^T||_F = sqrt(sum_{i>r} sigma_i(W S)^2),

i.e. the loss caused by truncating singular value i is exactly sigma_i: truncating the smallest
singular values of W S is optimal for the layer's output error on its calibration data.

Two factors are offered, both computed in float64:
  cholesky: S = L, the lower Cholesky factor of H (SVD-LLM v1). If H is not positive definite
            (fewer tokens than columns, dead channels), H is shifted by a small multiple of I
            (see cholesky_factor) and the fallback is reported to the caller.
  eigen:    S = Q diag(sqrt(l)) for H = Q diag(l) Q^T (SVD-LLM v2), Cholesky-free; eigenvalues
            are clamped at a small floor relative to the largest.
Any two such S differ by an orthogonal factor on the right, so both give the same W'.
S^-1 is only ever applied through triangular solves (cholesky) or the orthogonal Q (eigen).

ASVD's activation-aware scaling is the diagonal special case S = diag(s), s = stat^alpha per
input channel (ScalingFactor): the same W S / M S^-1 interface, so every consumer of a whitening
factor (low_rank_factors, the allocations' spectra) takes it unchanged. `input_transform` picks
one of the two for a stream (or a module, for fisher); they are alternatives, never combined.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

WHITENING_METHODS = ("cholesky", "eigen", "none")
SCALING_METHODS = ("none", "abs_mean", "abs_max", "fisher", "fisher_abs_mean")
# ASVD adds 1e-6 to the scale before dividing by it; here the guard is relative to the largest
# entry (activations of any magnitude), and only lifts entries that would make S singular
SCALING_REL_FLOOR = 1e-6


@dataclass
class WhiteningFactor:
    """S with S S^T = H (float64), plus how it was obtained."""

    method: str
    factor: torch.Tensor  # S, (in x in)
    fallback: bool = False  # True when H had to be shifted / clamped to be usable
    eigvals: torch.Tensor | None = None  # eigen only: clamped eigenvalues
    eigvecs: torch.Tensor | None = None  # eigen only: Q
    shift: float | None = None  # cholesky fallback only: S S^T = H + shift I

    def right_multiply(self, weight: torch.Tensor) -> torch.Tensor:
        """W S (float64)."""
        return weight.to(torch.float64) @ self.factor

    def right_solve(self, matrix: torch.Tensor) -> torch.Tensor:
        """M S^-1 (float64), without forming the inverse."""
        matrix = matrix.to(torch.float64)
        if self.method == "cholesky":
            return torch.linalg.solve_triangular(self.factor, matrix, upper=False, left=False)
        # S^-1 = diag(1/sqrt(l)) Q^T
        return (matrix / self.eigvals.sqrt()) @ self.eigvecs.T


def cholesky_factor(gram: "torch.Tensor | PackedGram", rel_eps: float = 1e-6, ladder_steps: int = 4) -> WhiteningFactor:
    """Lower Cholesky factor of H in float64, shifting H when it is not positive definite.

    SVD-LLM shifts H by (-lambda_min + eps) I, with lambda_min from a full eigenvalue solve (an
    absolute eps of 1e-6; here eps = rel_eps * mean(diag(H)), meaningful for any activation
    scale), which leaves a smallest eigenvalue of eps. A rank-deficient Gram's negative
    eigenvalues are round-off, of the order of eps (11008 wide, 4096 tokens: -0.7 eps), so the
    shifts s = eps, 10 eps, ... (`ladder_steps` of them) are tried first, one Cholesky each: the
    first s that factors proves lambda_min > -s, and H + (s + eps) I, factored once more, keeps
    SVD-LLM's margin of at least eps. Two or three Cholesky factorisations cost less than the
    eigenvalue solve alone (11008 wide, 2 CPU cores: 8 s each against 31 s). A Gram that needs
    more (a real negative eigenvalue: corrupted statistics) takes SVD-LLM's route.

    gram: H as a matrix, or as its packed upper triangle (utils.stats.PackedGram), which is
    unpacked into the one n x n buffer at each attempt: then no full H is held beside it.
    """
    from utils.stats import PackedGram
    if isinstance(gram, PackedGram):  # exactly symmetric: nothing to symmetrise
        n, device, fill = gram.n, gram.packed.device, gram.fill
    else:
        matrix = symmetric_float64(gram)
        n, device = matrix.shape[0], matrix.device

        def fill(out: torch.Tensor) -> torch.Tensor:
            return out.copy_(matrix)
    # One n x n buffer (an 11008-wide Gram is 0.97 GB in float64; H + s I, eye and each factor as
    # new tensors made five such matrices at once): each attempt writes H + s I into it and factors
    # it in place. Column-major (a transposed view), since LAPACK factors that where it lies and
    # cholesky_ex copies a row-major one.
    storage = torch.empty(n, n, dtype=torch.float64, device=device)
    work = storage.T
    info = torch.empty((), dtype=torch.int32, device=device)

    def factor() -> torch.Tensor:
        # the factor row-major, as the rest of the code (and its matmuls' rounding) always had it
        return transpose_in_place(storage)

    def factors(shift: float) -> bool:
        # H + 0 first, as H + s * eye computes it: an entry -0.0 becomes +0.0 (same bits as before)
        fill(work).add_(0.0)
        if shift:
            work.diagonal().add_(shift)
        torch.linalg.cholesky_ex(work, out=(work, info))
        return int(info) == 0

    def finite() -> bool:  # by blocks: isfinite of a whole matrix makes a float copy (abs) of it
        return all(bool(torch.isfinite(storage[row:row + 1024]).all()) for row in range(0, n, 1024))

    if factors(0.0) and finite():
        return WhiteningFactor("cholesky", factor())
    eps = rel_eps * float(fill(work).diagonal().mean().clamp_min(1e-30))
    for step in range(ladder_steps):
        probe = eps * 10.0 ** step
        if factors(probe):
            shift = probe + eps
            if factors(shift) and finite():
                return WhiteningFactor("cholesky", factor(), fallback=True, shift=shift)
    lambda_min = float(torch.linalg.eigvalsh(fill(work))[0])
    shift = max(-lambda_min, 0.0) + eps
    if not factors(shift):  # still indefinite through round-off: take a larger step
        shift += abs(lambda_min) + eps
        if not factors(shift):
            raise torch.linalg.LinAlgError(f"the Gram is not positive definite even shifted by {shift:g}")
    return WhiteningFactor("cholesky", factor(), fallback=True, shift=shift)


def transpose_in_place(matrix: torch.Tensor, block: int = 512) -> torch.Tensor:
    """A square contiguous matrix replaced by its transpose, one pair of blocks at a time (no
    second n x n matrix); returns it."""
    n = matrix.shape[0]
    for row in range(0, n, block):
        diagonal = matrix[row:row + block, row:row + block]
        diagonal.copy_(diagonal.T.clone())
        for col in range(row + block, n, block):
            upper = matrix[row:row + block, col:col + block]
            lower = matrix[col:col + block, row:row + block]
            kept = upper.clone()
            upper.copy_(lower.T)
            lower.copy_(kept.T)
    return matrix


def symmetric_float64(gram: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """(H + H^T) / 2 in float64, without a copy when H is float64 and symmetric already (a Gram
    unpacked from its upper triangle): then (H + H^T) / 2 is H exactly (x + x and the halving are
    exact in floating point), so either way the result is bit for bit the formula's."""
    gram = gram.to(torch.float64)
    n = gram.shape[0]
    if all(torch.equal(gram[start:start + block], gram[:, start:start + block].T) for start in range(0, n, block)):
        return gram
    return (gram + gram.T).div_(2)


def eigen_factor(gram: torch.Tensor, rel_floor: float = 1e-12) -> WhiteningFactor:
    """S = Q diag(sqrt(l)) with eigenvalues clamped at rel_floor * max eigenvalue.

    The floor sits just above float64 round-off of eigh (about n * 1e-16 * max): real activation
    Grams span 1e-10 of their largest eigenvalue, and clamping above that would change the
    problem rather than regularise it.
    """
    gram = symmetric_float64(gram)
    eigvals, eigvecs = torch.linalg.eigh(gram)
    floor = rel_floor * float(eigvals[-1].clamp_min(1e-30))
    clamped = eigvals.clamp_min(floor)
    fallback = bool((eigvals < floor).any())
    return WhiteningFactor("eigen", eigvecs * clamped.sqrt(), fallback=fallback,
                           eigvals=clamped, eigvecs=eigvecs)


def whitening_factor(gram: torch.Tensor | None, method: str) -> WhiteningFactor | None:
    """Dispatch on --whitening; None for plain SVD."""
    if method == "none":
        return None
    if gram is None:
        raise ValueError(f"--whitening {method} needs calibration statistics (run step 1)")
    if method == "cholesky":
        return cholesky_factor(gram)
    if method == "eigen":
        return eigen_factor(gram)
    raise ValueError(f"unknown whitening {method!r}; choose one of {WHITENING_METHODS}")


@dataclass
class ScalingFactor:
    """ASVD's S = diag(s) (float64): W S scales input column j by s_j, M S^-1 divides by it."""

    scale: torch.Tensor  # s, (in,)
    method: str = "scaling"
    fallback: bool = False  # True when zero / tiny entries had to be lifted to the floor
    shift: float | None = None  # never set (the WhiteningFactor interface)
    scaling: str = "abs_mean"  # which statistic s came from
    alpha: float = 0.5

    @property
    def factor(self) -> torch.Tensor:
        """The dense diag(s), for consumers that want the matrix (tests, analysis)."""
        return torch.diag(self.scale)

    def right_multiply(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.to(torch.float64) * self.scale

    def right_solve(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.to(torch.float64) / self.scale


def scaling_factor(stat: torch.Tensor, alpha: float, scaling: str = "abs_mean",
                   rel_floor: float = SCALING_REL_FLOOR) -> ScalingFactor:
    """s = stat^alpha (float64), entries below rel_floor * max(s) lifted to it (dead channels
    would make S singular). alpha 0 gives s = 1: plain SVD exactly."""
    stat = stat.detach().to(torch.float64).flatten()
    if not bool(torch.isfinite(stat).all()) or bool((stat < 0).any()):
        raise ValueError(f"--scaling {scaling}: the per-channel statistic has non-finite or negative entries")
    scale = stat.pow(alpha) if alpha != 0 else torch.ones_like(stat)
    largest = float(scale.max()) if scale.numel() else 0.0
    if largest <= 0:
        raise ValueError(f"--scaling {scaling}: every channel's statistic is zero (a matrix that never saw input)")
    floor = rel_floor * largest
    fallback = bool((scale < floor).any())
    return ScalingFactor(scale.clamp_min(floor), fallback=fallback, scaling=scaling, alpha=alpha)


def channel_statistic(stats_tensors: dict[str, torch.Tensor], stream: str, scaling: str,
                      fisher: torch.Tensor | None = None) -> torch.Tensor:
    """The per-input-channel statistic that --scaling names, from step 1's saved tensors of one
    layer (abs_sum / tokens, abs_max) and, for fisher*, the module's fisher vector.
    fisher_abs_mean is ASVD's product abs_mean * fisher (each raised to alpha there, so the
    product's power is the same)."""
    if scaling in ("abs_mean", "fisher_abs_mean"):
        tokens = float(stats_tensors[f"{stream}.tokens"].flatten()[0])
        abs_mean = stats_tensors[f"{stream}.abs_sum"].to(torch.float64) / max(tokens, 1.0)
    if scaling == "abs_max":
        key = f"{stream}.abs_max"
        if key not in stats_tensors:
            raise ValueError(f"--scaling abs_max: these statistics have no {key} (collected by an older "
                             f"step 1); rerun step 1, or use --scaling abs_mean")
        return stats_tensors[key].to(torch.float64)
    if scaling in ("fisher", "fisher_abs_mean"):
        if fisher is None:
            raise ValueError(f"--scaling {scaling} needs fisher statistics: run step 1 with --fisher")
        fisher = fisher.to(torch.float64)
        return fisher if scaling == "fisher" else abs_mean * fisher
    if scaling == "abs_mean":
        return abs_mean
    raise ValueError(f"unknown scaling {scaling!r}; choose one of {SCALING_METHODS}")


def input_transform(stats_tensors: dict[str, torch.Tensor] | None, stream: str, device: torch.device | str,
                    whitening: str, scaling: str = "none", alpha: float = 0.5,
                    fisher: torch.Tensor | None = None) -> "WhiteningFactor | ScalingFactor | None":
    """The right factor S of one matrix's decomposition: SVD-LLM's whitening of its input stream's
    Gram, ASVD's diagonal scaling of its per-channel statistic, or None (plain SVD).

    stats_tensors: one layer's step-1 tensors (Statistics.layer(i)[0]); stream: the matrix's input
    stream there; fisher: the matrix's own fisher vector (in,) for scaling fisher / fisher_abs_mean.
    Whitening and scaling together are refused (they are alternatives: ASVD is whitening none)."""
    if scaling not in SCALING_METHODS:
        raise ValueError(f"unknown scaling {scaling!r}; choose one of {SCALING_METHODS}")
    if whitening not in WHITENING_METHODS:
        raise ValueError(f"unknown whitening {whitening!r}; choose one of {WHITENING_METHODS}")
    if scaling != "none" and whitening != "none":
        raise ValueError(f"--scaling {scaling} with --whitening {whitening}: they are alternatives "
                         f"(ASVD: --whitening none --scaling {scaling}; SVD-LLM: --whitening {whitening}); pick one")
    if scaling != "none":
        if stats_tensors is None:
            raise ValueError(f"--scaling {scaling} needs calibration statistics (run step 1)")
        stat = channel_statistic(stats_tensors, stream, scaling, fisher)
        return scaling_factor(stat.to(device), alpha, scaling)
    if whitening == "none":
        return None
    from utils.stats import saved_gram
    from utils.stats import packed_gram
    packed = packed_gram(stats_tensors, stream, device)
    if whitening == "cholesky" and packed is not None:
        return cholesky_factor(packed)  # unpacked into the factor's own buffer: no full Gram beside it
    # unpacked straight into float64: the factor's precision, with no float32 copy beside it
    return whitening_factor(saved_gram(stats_tensors, stream, device, torch.float64), whitening)
