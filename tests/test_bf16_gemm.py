"""The bfloat16 GEMM of csrc/cpu/bf16_gemm.{h,cpp} (AVX512_BF16, vdpbf16ps), on its own.

csrc/cpu/bf16_gemm.cpp is built with tests/bf16_gemm_ext.cpp (plain C hooks on raw pointers,
no torch/extension.h: a few seconds) by torch.utils.cpp_extension.load and called through
ctypes. The packing tests run on any x86-64 CPU; the products are skipped where the CPU lacks
AVX512_BF16.

Most products use small nonzero integers, exact in bfloat16 and summed exactly in float32, so
the result must equal the float64 reference bit for bit: any wrong index shows. Storage past
the logical rows of A, W and C is filled with NaN (read) or a sentinel (written) to catch reads
of padding and writes outside the requested columns.
"""

import ctypes
import itertools
import os
import sys

import pytest
import torch

from helpers import ROOT

BLOCK_N = 16  # kBf16GemmBlockN
F32, BF16 = 0, 1
SENTINEL = 12345.0


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        pytest.skip("bf16_gemm is x86-64 (Linux) code")
    from torch.utils import cpp_extension

    build = tmp_path_factory.mktemp("bf16_gemm_build")
    path = cpp_extension.load(
        "fused_lstm_bf16_gemm_test",
        [str(ROOT / "tests" / "bf16_gemm_ext.cpp"), str(ROOT / "csrc" / "cpu" / "bf16_gemm.cpp")],
        extra_cflags=["-O2", "-DNDEBUG", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
        is_python_module=False,
    )
    so = ctypes.CDLL(path)
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    so.fl_bf16_last_error.restype = ctypes.c_char_p
    so.fl_bf16_available.restype = ctypes.c_int
    so.fl_bf16_force_portable.argtypes = [ctypes.c_int]
    so.fl_bf16_packed_size.restype = i64
    so.fl_bf16_packed_size.argtypes = [i64, i64]
    so.fl_bf16_pack.argtypes = [ctypes.c_int, vp, i64, i64, i64, vp]
    so.fl_bf16_pack_t.argtypes = [ctypes.c_int, vp, i64, i64, i64, vp]
    so.fl_bf16_packed_panels_size.restype = i64
    so.fl_bf16_packed_panels_size.argtypes = [i64, i64, i64]
    so.fl_bf16_pack_panels.argtypes = [ctypes.c_int, vp, i64, i64, i64, i64, ctypes.c_int, vp]
    so.fl_bf16_row_stride.restype = i64
    so.fl_bf16_row_stride.argtypes = [i64]
    so.fl_bf16_transpose_rows.argtypes = [vp, i64, i64, i64, vp, i64]
    so.fl_bf16_transpose_rows_bf16.argtypes = [vp, i64, i64, i64, vp, i64]
    so.fl_bf16_gemm.argtypes = [ctypes.c_int, i64, i64, i64, vp, i64, vp, vp, i64, ctypes.c_int,
                                i64, i64, ctypes.c_int]
    so.path = path
    return so


@pytest.fixture(scope="module")
def gemm_lib(lib):
    if not lib.fl_bf16_available():
        pytest.skip("this CPU lacks AVX512_BF16: bf16_gemm is not usable here")
    return lib


@pytest.fixture(params=["vectorised", "portable"])
def packer(lib, request):
    """The library with its packing code as this CPU runs it, and as CPUs without AVX512_BF16
    run it (bf16_gemm_force_portable): each packing test checks both give the expected bits."""
    if request.param == "vectorised" and not lib.fl_bf16_available():
        pytest.skip("this CPU lacks AVX512_BF16: the packing runs its portable code only")
    lib.fl_bf16_force_portable(int(request.param == "portable"))
    try:
        yield lib
    finally:
        lib.fl_bf16_force_portable(0)


def check(lib, rc):
    if rc != 0:
        raise RuntimeError(lib.fl_bf16_last_error().decode())


def _packed(lib, packer, M, N, K):
    """The int16 tensor `packer` (fl_bf16_pack or fl_bf16_pack_t) fills from the float32 or
    bfloat16 view M (unit column stride) for an [N, K] weight."""
    assert M.stride(1) == 1
    out = torch.full((lib.fl_bf16_packed_size(N, K),), -1, dtype=torch.int16)
    dtype = F32 if M.dtype == torch.float32 else BF16
    check(lib, packer(dtype, M.data_ptr(), N, K, M.stride(0), out.data_ptr()))
    return out


def pack(lib, W):
    """Packed weight (int16 tensor) of a [N, K] float32/bfloat16 view with unit column stride."""
    N, K = W.shape
    return _packed(lib, lib.fl_bf16_pack, W, N, K)


def pack_t(lib, Wt):
    """bf16_pack_weight_t of a [K, N] view with unit column stride: the packed form of Wt^T."""
    K, N = Wt.shape
    return _packed(lib, lib.fl_bf16_pack_t, Wt, N, K)


def transpose_rows(lib, At, ldo=None, fill=-1):
    """bf16_transpose_rows of a float32 [K, M] view: ([M, ldo] int16 storage, its bf16 [M, K] view).
    ldo defaults to bf16_row_stride(K); storage past what is written keeps `fill`."""
    K, M = At.shape
    assert At.stride(1) == 1 and At.dtype == torch.float32
    ldo = lib.fl_bf16_row_stride(K) if ldo is None else ldo
    out = torch.full((M, ldo), fill, dtype=torch.int16)
    check(lib, lib.fl_bf16_transpose_rows(At.data_ptr(), K, M, At.stride(0), out.data_ptr(), ldo))
    return out, out[:, :K].view(torch.bfloat16)


def gemm(lib, A, packed, C, N, accumulate, n0=0, n1=-1, parallel=False):
    M, K = A.shape
    assert A.stride(1) == 1 and C.stride(1) == 1 and C.dtype == torch.float32
    dtype = F32 if A.dtype == torch.float32 else BF16
    check(lib, lib.fl_bf16_gemm(dtype, M, N, K, A.data_ptr(), A.stride(0), packed.data_ptr(),
                                C.data_ptr(), C.stride(0), int(accumulate), n0, n1, int(parallel)))


def padded(rows, cols, pad, dtype, fill):
    """A [rows, cols] view into [rows, cols + pad] storage whose extra columns hold `fill`."""
    storage = torch.full((rows, cols + pad), fill, dtype=dtype)
    return storage, storage[:, :cols]


def small_ints(*shape):
    """Nonzero integers in [-4, 4]: exact in bfloat16, products summed exactly in float32."""
    v = torch.randint(1, 5, shape) * (torch.randint(0, 2, shape) * 2 - 1)
    return v.to(torch.float32)


def reference(A, W, C0=None):
    """float64 product of the bfloat16-rounded operands (plus C0)."""
    out = A.to(torch.bfloat16).double() @ W.to(torch.bfloat16).double().T
    return out if C0 is None else out + C0.double()


def layout_reference(W, panel=BLOCK_N):
    """The documented packed layout, element by element (bf16 bits as int16), in panels of
    `panel` columns (bf16_gemm's: 16)."""
    N, K = W.shape
    kp = (K + 1) // 2
    blocks = (N + panel - 1) // panel
    bits = W.to(torch.bfloat16).view(torch.int16)
    full = torch.zeros(blocks * panel, 2 * kp, dtype=torch.int16)
    full[:N, :K] = bits
    # packed[((n // panel) * kp + k // 2) * 2 * panel + (n % panel) * 2 + k % 2]
    return full.view(blocks, panel, kp, 2).permute(0, 2, 1, 3).reshape(-1)


# ---- packing (portable C++, any CPU) -------------------------------------------------------


@pytest.mark.parametrize("N,K", [(1, 1), (1, 2), (16, 2), (17, 3), (33, 64), (48, 31), (5, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_layout(packer, N, K, dtype):
    assert packer.fl_bf16_packed_size(N, K) == ((N + 15) // 16) * 16 * ((K + 1) // 2) * 2
    storage, W = padded(N, K, 3, dtype, float("nan"))  # row padding must not be read
    W.copy_(torch.randn(N, K))
    assert torch.equal(pack(packer, W), layout_reference(W))


def test_pack_float_rounds_like_torch(packer):
    """A float32 W is rounded as torch's .to(torch.bfloat16): to nearest, ties to even."""
    base = torch.randn(64, 40)
    bits = base.view(torch.int32)
    tie = (bits & ~0xFFFF) | 0x8000  # exactly halfway between two bf16 values
    W = torch.cat([base, tie.view(torch.float32), (tie + 1).view(torch.float32),
                   (tie - 1).view(torch.float32)])
    W[0, :6] = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.4e38, -0.0, 1e-40])
    got = pack(packer, W)
    want = pack(packer, W.to(torch.bfloat16))
    nan = torch.isnan(want.view(torch.bfloat16))  # any NaN will do (torch's bits vary)
    assert nan.sum() == 1 and torch.isnan(got.view(torch.bfloat16)[nan]).all()
    assert torch.equal(got[~nan], want[~nan])
    assert torch.equal(got[~nan], layout_reference(W)[~nan])


@pytest.mark.parametrize("N,K", [(1, 1), (1, 2), (16, 2), (17, 3), (33, 64), (48, 31), (5, 129),
                                 (256, 1024), (100, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_t_layout(packer, N, K, dtype):
    """bf16_pack_weight_t of Wt [K, N] is bf16_pack_weight of Wt^T: the same documented layout."""
    _, Wt = padded(K, N, 3, dtype, float("nan"))  # row padding must not be read
    Wt.copy_(torch.randn(K, N))
    assert torch.equal(pack_t(packer, Wt), layout_reference(Wt.T))


def test_pack_t_rounds_like_torch(packer):
    """Ties, near-ties, inf, NaN, -0, denormals: the bits of torch's .to(torch.bfloat16)."""
    base = torch.randn(40, 35)
    bits = base.view(torch.int32)
    tie = (bits & ~0xFFFF) | 0x8000
    Wt = torch.cat([base, tie.view(torch.float32), (tie + 1).view(torch.float32),
                    (tie - 1).view(torch.float32)])
    Wt[0, :7] = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.4e38, -0.0, 1e-40,
                              -3e-39])
    got = pack_t(packer, Wt)
    want = layout_reference(Wt.T)
    nan = torch.isnan(want.view(torch.bfloat16))
    assert nan.sum() == 1 and torch.isnan(got.view(torch.bfloat16)[nan]).all()
    assert torch.equal(got[~nan], want[~nan])


def pack_panels(lib, M, panel, given_t):
    """bf16_pack_panels of a [N, K] view, or bf16_pack_panels_t of a [K, N] view (`given_t`)."""
    assert M.stride(1) == 1
    N, K = (M.shape[1], M.shape[0]) if given_t else M.shape
    out = torch.full((lib.fl_bf16_packed_panels_size(N, K, panel),), -1, dtype=torch.int16)
    dtype = F32 if M.dtype == torch.float32 else BF16
    check(lib, lib.fl_bf16_pack_panels(dtype, M.data_ptr(), N, K, M.stride(0), panel,
                                       int(given_t), out.data_ptr()))
    return out


@pytest.mark.parametrize("N,K", [(1, 1), (16, 2), (21, 6), (33, 64), (48, 31), (64, 33),
                                 (65, 129), (130, 100), (512, 2048)])
@pytest.mark.parametrize("panel", [16, 32, 64])
@pytest.mark.parametrize("given_t", [False, True], ids=["W", "Wt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_panels_layout(packer, N, K, panel, given_t, dtype):
    """Panels of 16 to 64 columns (the AMX tiles' B, amx.h), from W [N, K] or Wt [K, N]: the
    documented layout in panels, zero past N within the last panel and past an odd K."""
    rows, cols = (K, N) if given_t else (N, K)
    _, M = padded(rows, cols, 3, dtype, float("nan"))  # row padding must not be read
    M.copy_(torch.randn(rows, cols))
    W = M.T if given_t else M
    want = layout_reference(W, panel)
    assert packer.fl_bf16_packed_panels_size(N, K, panel) == want.numel()
    assert torch.equal(pack_panels(packer, M, panel, given_t), want)


def test_pack_panels_round_like_torch(packer):
    """Ties, near-ties, inf, NaN, -0, denormals through both panel packers."""
    base = torch.randn(40, 35)
    tie = (base.view(torch.int32) & ~0xFFFF) | 0x8000
    W = torch.cat([base, tie.view(torch.float32), (tie + 1).view(torch.float32),
                   (tie - 1).view(torch.float32)])
    W[0, :7] = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.4e38, -0.0, 1e-40,
                             -3e-39])
    for M, given_t in ((W, False), (W.T.contiguous(), True)):
        got = pack_panels(packer, M, 64, given_t)
        want = layout_reference(W, 64)
        nan = torch.isnan(want.view(torch.bfloat16))
        assert nan.sum() == 1 and torch.isnan(got.view(torch.bfloat16)[nan]).all()
        assert torch.equal(got[~nan], want[~nan])


TRANSPOSE_K = (1, 2, 3, 31, 32, 33, 34, 63, 64, 65, 100)
TRANSPOSE_M = tuple(range(1, 21)) + (31, 32, 33, 64, 100)


def test_transpose_rows_layout(packer):
    """out[m, k] = bf16(At[k, m]) for k < K, 0 at k = K for odd K, nothing written past that;
    At's row padding (NaN) not read; every K and M around the 16 x 32 tiles."""
    for K, M in itertools.product(TRANSPOSE_K, TRANSPOSE_M):
        _, At = padded(K, M, 5, torch.float32, float("nan"))
        At.copy_(torch.randn(K, M))
        ldo = K + (K & 1) + 3  # any stride from K rounded up to even
        out, rows = transpose_rows(packer, At, ldo=ldo, fill=-7)
        assert torch.equal(rows.view(torch.int16), At.T.to(torch.bfloat16).view(torch.int16)), (K, M)
        if K & 1:
            assert (out[:, K] == 0).all(), (K, M)
        assert (out[:, K + (K & 1):] == -7).all(), (K, M)


def test_transpose_rows_of_bf16(packer):
    """The bf16 overload (At already bf16: the AMX backward's dgates rows) gives the float
    overload's bits for the same values; padding as there."""
    for K, M in itertools.product(TRANSPOSE_K, TRANSPOSE_M):
        _, At16 = padded(K, M, 5, torch.bfloat16, float("nan"))
        At16.copy_(torch.randn(K, M))
        ldo = K + (K & 1) + 3
        out = torch.full((M, ldo), -7, dtype=torch.int16)
        check(packer, packer.fl_bf16_transpose_rows_bf16(At16.data_ptr(), K, M, At16.stride(0),
                                                         out.data_ptr(), ldo))
        want, _ = transpose_rows(packer, At16.float(), ldo=ldo, fill=-7)
        assert torch.equal(out, want), (K, M)


def test_transpose_rows_rounds_like_torch(packer):
    base = torch.randn(45, 19) * 100
    bits = base.view(torch.int32)
    tie = (bits & ~0xFFFF) | 0x8000
    At = torch.cat([base, tie.view(torch.float32), (tie + 1).view(torch.float32),
                    (tie - 1).view(torch.float32)])
    At[3, :6] = torch.tensor([float("inf"), -float("inf"), 3.39e38, -0.0, 1e-40, -3e-39])
    _, rows = transpose_rows(packer, At)
    assert torch.equal(rows.view(torch.int16), At.T.to(torch.bfloat16).view(torch.int16))
    At[5, 2] = float("nan")
    _, rows = transpose_rows(packer, At)
    assert torch.isnan(rows[2, 5]) and torch.isnan(rows).sum() == 1


def test_row_stride(lib):
    for K in (1, 2, 3, 100, 2047, 2048, 2049, 4096, 3200):
        ld = lib.fl_bf16_row_stride(K)
        assert ld >= K and ld % 2 == 0 and ld % 2048 != 0 and ld <= K + 33, K


# ---- products (AVX512_BF16) ----------------------------------------------------------------

M_SIZES = (1, 2, 7, 8, 9, 15, 16, 17, 25, 40)
N_SIZES = (1, 15, 16, 17, 47, 48, 49, 64, 100)
K_SIZES = (1, 2, 3, 31, 32, 33, 64, 65)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("accumulate", [False, True])
def test_exact_shapes(gemm_lib, dtype, accumulate):
    """Every M x N x K around the micro-kernel's 8 rows x 48 columns and odd K, strided A, W and
    C; NaN in the padding of A and W, a sentinel in C's: exact result, sentinel intact."""
    for M, N, K in itertools.product(M_SIZES, N_SIZES, K_SIZES):
        _, A = padded(M, K, 5, dtype, float("nan"))
        A.copy_(small_ints(M, K))
        _, W = padded(N, K, 3, dtype, float("nan"))
        W.copy_(small_ints(N, K))
        c_storage, C = padded(M, N, 7, torch.float32, SENTINEL)
        C0 = small_ints(M, N)
        C.copy_(C0 if accumulate else torch.full((M, N), float("nan")))  # overwritten
        gemm(gemm_lib, A, pack(gemm_lib, W), C, N, accumulate)
        expected = reference(A, W, C0 if accumulate else None)
        assert torch.equal(C.double(), expected), (M, N, K)
        assert (c_storage[:, N:] == SENTINEL).all(), (M, N, K)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [11, 70])  # column groups outer; rows outer (more than 64 rows)
def test_column_ranges(gemm_lib, dtype, M):
    """Only columns [n0, n1) are written, whatever their alignment to the 16-column blocks."""
    N, K = 100, 37
    A = small_ints(M, K).to(dtype)
    W = small_ints(N, K)
    packed = pack(gemm_lib, W)
    expected = reference(A, W)
    for n0, n1 in [(0, 100), (0, 16), (16, 48), (5, 6), (15, 17), (3, 99), (48, 100), (99, 100),
                   (32, 32), (7, 64), (64, 97)]:
        for accumulate in (False, True):
            C0 = small_ints(M, N)
            C = C0.clone()
            gemm(gemm_lib, A, packed, C, N, accumulate, n0, n1)
            want = C0.double().clone()
            want[:, n0:n1] = expected[:, n0:n1] + (C0[:, n0:n1].double() if accumulate else 0)
            assert torch.equal(C.double(), want), (n0, n1, accumulate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(200, 70, 1100), (90, 1024, 513), (3, 33, 2050)])
def test_exact_large(gemm_lib, dtype, M, N, K):
    """K past one K chunk (256 pairs), M past one converted row panel, N past many blocks."""
    A = small_ints(M, K).to(dtype)
    W = small_ints(N, K)
    for accumulate in (False, True):
        C0 = small_ints(M, N)
        C = C0.clone()
        gemm(gemm_lib, A, pack(gemm_lib, W), C, N, accumulate)
        assert torch.equal(C.double(), reference(A, W, C0 if accumulate else None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 1024, 256), (32, 1024, 256), (700, 333, 129)])
def test_parallel(gemm_lib, dtype, M, N, K):
    """bf16_gemm_parallel, splitting rows (large M) or column blocks (small M)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        A = small_ints(M, K).to(dtype)
        W = small_ints(N, K)
        for accumulate in (False, True):
            C0 = small_ints(M, N)
            C = C0.clone()
            gemm(gemm_lib, A, pack(gemm_lib, W), C, N, accumulate, parallel=True)
            assert torch.equal(C.double(), reference(A, W, C0 if accumulate else None))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("accumulate", [False, True])
def test_exact_weight_given_transposed(gemm_lib, dtype, accumulate):
    """C = A B with B stored [K, N] (packed by bf16_pack_weight_t): the backward's
    dL/dh = dgates_t W_hh and dL/dx = dgates W_ih. M of 1..20 (a batch slice's rows), N and K
    around the blocks, odd K; NaN in B's padding, a sentinel in C's."""
    for M, N, K in itertools.product(range(1, 21), (1, 15, 16, 17, 48, 49, 100),
                                     (1, 2, 3, 32, 33, 65)):
        A = small_ints(M, K).to(dtype)
        _, B = padded(K, N, 3, dtype, float("nan"))
        B.copy_(small_ints(K, N))
        c_storage, C = padded(M, N, 7, torch.float32, SENTINEL)
        C0 = small_ints(M, N)
        C.copy_(C0 if accumulate else torch.full((M, N), float("nan")))
        gemm(gemm_lib, A, pack_t(gemm_lib, B), C, N, accumulate)
        assert torch.equal(C.double(), reference(A, B.T, C0 if accumulate else None)), (M, N, K)
        assert (c_storage[:, N:] == SENTINEL).all(), (M, N, K)


@pytest.mark.parametrize("parallel", [False, True])
def test_exact_both_transposed(gemm_lib, parallel):
    """C = At^T B with At [K, M] (bf16_transpose_rows, read in place as a bf16 A) and B [K, N]
    (bf16_pack_weight_t): the weight gradients dW = dgates^T x, K being the rows of a batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        shapes = list(itertools.product((1, 7, 8, 9, 16, 17, 20, 64, 70, 130), (1, 16, 17, 49, 128),
                                        (1, 2, 3, 31, 64, 513)))
        shapes += [(1024, 128, 3200), (68, 256, 3201), (200, 33, 1100)]
        for M, N, K in shapes:
            _, At = padded(K, M, 5, torch.float32, float("nan"))
            At.copy_(small_ints(K, M))
            _, B = padded(K, N, 3, torch.float32, float("nan"))
            B.copy_(small_ints(K, N))
            out, _ = transpose_rows(gemm_lib, At)
            A = out.view(torch.bfloat16)[:, :K]  # row stride bf16_row_stride(K)
            C0 = small_ints(M, N)
            for accumulate in (False, True):
                C = C0.clone()
                gemm(gemm_lib, A, pack_t(gemm_lib, B), C, N, accumulate, parallel=parallel)
                expected = reference(At.T, B.T, C0 if accumulate else None)
                assert torch.equal(C.double(), expected), (M, N, K, accumulate)
    finally:
        torch.set_num_threads(threads)


def test_a_rounding(gemm_lib):
    """A float32 A is rounded to bf16 to nearest, ties to even: with W = I the product is
    bf16(A) exactly (torch's .to(torch.bfloat16)), ties and near-ties included."""
    K = 77
    base = torch.randn(6, K) * 100
    bits = base.view(torch.int32)
    tie = (bits & ~0xFFFF) | 0x8000
    A = torch.cat([base, tie.view(torch.float32), (tie + 1).view(torch.float32),
                   (tie - 1).view(torch.float32), torch.randn(3, K) * 1e-30])
    A[0, :4] = torch.tensor([3.39e38, -0.0, 1e-37, 65504.0])
    C = torch.empty(A.shape[0], K)
    gemm(gemm_lib, A, pack(gemm_lib, torch.eye(K)), C, K, False)
    assert torch.equal(C, A.to(torch.bfloat16).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(16, 1024, 256), (33, 97, 513), (5, 64, 4000)])
def test_random_values(gemm_lib, dtype, M, N, K):
    """Random normal operands: the float32 sums stay within float32 summation error of the
    float64 product of the rounded operands (and far from the unrounded float32 product)."""
    A = torch.randn(M, K).to(dtype)
    W = torch.randn(N, K)
    C = torch.empty(M, N)
    gemm(gemm_lib, A, pack(gemm_lib, W), C, N, False)
    expected = reference(A, W)
    scale = A.to(torch.bfloat16).double().abs() @ W.to(torch.bfloat16).double().abs().T
    err = (C.double() - expected).abs()
    assert (err <= K * 2.0**-24 * scale).all()
    assert err.max() <= 2.0**-16 * scale.max()  # typical error: ~sqrt(K) ulp
    if dtype == torch.float32:  # A was rounded: the float32 product differs by ~2^-9
        assert (C.double() - A.double() @ W.to(torch.bfloat16).double().T).abs().max() > 1e-3


def test_special_values(gemm_lib):
    """inf and NaN in A propagate to their row only."""
    M, N, K = 4, 20, 10
    A = small_ints(M, K)
    A[1, 3] = float("inf")
    A[2, 7] = float("nan")
    W = small_ints(N, K)
    C = torch.empty(M, N)
    gemm(gemm_lib, A, pack(gemm_lib, W), C, N, False)
    expected = reference(A, W)
    assert torch.equal(C[[0, 3]].double(), expected[[0, 3]])
    assert torch.isinf(C[1]).all() and torch.isnan(C[2]).all()


def test_zero_sizes(gemm_lib):
    """M = 0 or an empty column range: nothing written; K = 0: C = 0 (or kept, accumulating)."""
    W = small_ints(20, 0)
    packed = pack(gemm_lib, W)
    assert packed.numel() == 0
    C = torch.full((3, 20), 7.0)
    gemm(gemm_lib, torch.empty(3, 0), packed, C, 20, True)
    assert (C == 7).all()
    gemm(gemm_lib, torch.empty(3, 0), packed, C, 20, False, 4, 9)
    assert (C[:, 4:9] == 0).all() and (C[:, :4] == 7).all() and (C[:, 9:] == 7).all()
    W = small_ints(20, 5)
    gemm(gemm_lib, torch.empty(0, 5), pack(gemm_lib, W), torch.empty(0, 20), 20, False)
    C = torch.full((3, 20), 7.0)
    gemm(gemm_lib, small_ints(3, 5), pack(gemm_lib, W), C, 20, False, 6, 6)
    assert (C == 7).all()


def test_bad_arguments(gemm_lib):
    W = small_ints(20, 5)
    packed = pack(gemm_lib, W)
    with pytest.raises(RuntimeError, match="bad sizes"):
        gemm(gemm_lib, small_ints(3, 5), packed, torch.empty(3, 20), 20, False, 0, 21)
    with pytest.raises(RuntimeError, match="bad sizes"):
        gemm(gemm_lib, small_ints(3, 5), packed, torch.empty(3, 20), 20, False, 9, 8)


def test_force_portable_disables(lib):
    """bf16_gemm_force_portable(true) makes bf16_gemm_available() false and the gemm refuse;
    false restores what the CPU offers."""
    native = lib.fl_bf16_available()
    lib.fl_bf16_force_portable(1)
    try:
        assert lib.fl_bf16_available() == 0
        packed = torch.zeros(lib.fl_bf16_packed_size(4, 3), dtype=torch.int16)
        with pytest.raises(RuntimeError, match="lacks AVX512_BF16"):
            gemm(lib, torch.ones(2, 3), packed, torch.empty(2, 4), 4, False, 0, -1)
    finally:
        lib.fl_bf16_force_portable(0)
    assert lib.fl_bf16_available() == native

