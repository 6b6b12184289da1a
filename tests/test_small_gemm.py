"""The backward's small products on 16 AVX-512 lanes (csrc/cpu/blas.h ``small_gemm``), through
the test op ``fused_lstm::_small_gemm``: C = alpha op(A) op(B) + beta C for every transpose, the
shapes the tutorial sizes give (thin, a dimension of 1), lane tails, 1-4 columns per block,
strided rows (gathered lanes), odd k, against float64. Where it runs inside the LSTM (the
``small_avx512`` library of explain): tests/test_cpu_variants.py's ``*small-products*`` cases.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from helpers import cpu_features

pytestmark = pytest.mark.skipif(not cpu_features()["avx512"],
                                reason="the small products' kernel needs AVX-512")

SMALL_GEMM = torch.ops.fused_lstm._small_gemm.default

# (m, n, k): seed-tiny's dW [12 x 368] x [368 x 3], dL/dx [368 x 12] x [12 x 3] and their
# matrix-vector forms; lane tails (17, 33), exactly one block (16), a tail of one column or row,
# widths 1-5 for the 1-4 column blocks, k of 1, 2 and odd.
SHAPES = [(12, 3, 368), (368, 3, 12), (12, 1, 368), (368, 1, 12), (1, 1, 1), (1, 7, 3),
          (16, 16, 16), (17, 33, 5), (33, 17, 9), (5, 40, 30), (40, 5, 30), (3, 70, 2),
          (70, 4, 3), (2, 2, 1), (64, 2, 128)]


def _matrix(rows, cols, pad, generator):
    """A [rows, cols] float32 matrix whose rows are `cols + pad` apart (a slice of a wider one)."""
    return torch.randn(rows, cols + pad, generator=generator)[:, :cols]


def _operands(m, n, k, trans_a, trans_b, pad, seed):
    g = torch.Generator().manual_seed(seed)
    a = _matrix(k, m, pad, g) if trans_a else _matrix(m, k, pad, g)
    b = _matrix(n, k, pad, g) if trans_b else _matrix(k, n, pad, g)
    c = _matrix(m, n, pad, g)
    return a, b, c


def _expected(a, trans_a, b, trans_b, c, alpha, beta):
    op_a = (a.t() if trans_a else a).double()
    op_b = (b.t() if trans_b else b).double()
    exact = alpha * (op_a @ op_b) + beta * c.double()
    # float32 rounding of a k-term sum: a few ulps of the sum of the terms' magnitudes
    bound = abs(alpha) * (op_a.abs() @ op_b.abs()) + abs(beta) * c.double().abs()
    return exact, bound * (op_a.shape[1] + 2) * 2.0 ** -23


@pytest.mark.parametrize("m,n,k", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("trans_a,trans_b", list(itertools.product([False, True], repeat=2)),
                         ids=["NN", "NT", "TN", "TT"])
def test_small_gemm_against_float64(m, n, k, trans_a, trans_b):
    for pad, (alpha, beta) in itertools.product((0, 3), [(1.0, 0.0), (1.0, 1.0), (0.5, -2.0)]):
        a, b, c = _operands(m, n, k, trans_a, trans_b, pad, seed=m * 1000 + n * 10 + k + pad)
        got = SMALL_GEMM(a, trans_a, b, trans_b, c, alpha, beta)
        exact, tol = _expected(a, trans_a, b, trans_b, c, alpha, beta)
        err = (got.double() - exact).abs()
        assert bool((err <= tol).all()), (pad, alpha, beta, float((err - tol).max()))


@pytest.mark.parametrize("trans_a,trans_b", list(itertools.product([False, True], repeat=2)),
                         ids=["NN", "NT", "TN", "TT"])
def test_small_gemm_nan_and_beta_zero(trans_a, trans_b):
    """beta == 0 does not read C (as BLAS: NaN there does not leak); a NaN in A reaches exactly
    the row of C it multiplies, and nothing else."""
    m, n, k = 33, 3, 7
    a, b, c = _operands(m, n, k, trans_a, trans_b, 2, seed=7)
    got = SMALL_GEMM(a, trans_a, b, trans_b, torch.full_like(c, float("nan")), 1.0, 0.0)
    assert not got.isnan().any()
    exact, tol = _expected(a, trans_a, b, trans_b, c, 1.0, 0.0)
    assert bool(((got.double() - exact).abs() <= tol).all())
    row = 20
    if trans_a:
        a[3, row] = float("nan")
    else:
        a[row, 3] = float("nan")
    got = SMALL_GEMM(a, trans_a, b, trans_b, c, 1.0, 1.0)
    nan_rows = got.isnan().any(dim=1).nonzero().flatten().tolist()
    assert nan_rows == [row] and bool(got[row].isnan().all())


def test_small_gemm_writes_only_c():
    """C's rows are a slice of a wider matrix (leading dimension past n): the kernel writes
    [m, n] and leaves the rest of each row (the op fills it with NaN) untouched, along either
    dimension of C (m >= n: lanes down the rows; m < n: along them)."""
    for m, n in [(20, 4), (4, 20), (17, 1)]:
        a, b, c = _operands(m, n, 6, False, False, 5, seed=m + n)
        got = SMALL_GEMM(a, False, b, False, c, 1.0, 1.0)
        exact, tol = _expected(a, False, b, False, c, 1.0, 1.0)
        assert bool(((got.double() - exact).abs() <= tol).all())
        ld = got.stride(0)
        assert ld == n + 5
        whole = torch.as_strided(got, (m, ld), (ld, 1))
        assert bool(whole[:, n:].isnan().all())
