"""The CUDA backend where no GPU is present (CI has none, and a CPU-only torch).

These checks keep csrc/cuda honest without a GPU:

* ``test_nvcc_compiles_cuda_source``: every ``csrc/cuda/*.cu`` compiles with nvcc (``-c``) for
  sm_80 and sm_90, with the flags torch.utils.cpp_extension and setup.py pass (torch's include
  directories, its nvcc flags, ``-std=c++20``, fused_lstm's own flags with
  ``-DFUSED_LSTM_WITH_CUDA=1``). A CPU torch wheel ships the c10/cuda headers but not the one
  that CMake generates for a CUDA build, ``c10/cuda/impl/cuda_cmake_macros.h`` (included by
  ``c10/cuda/CUDAMacros.h``); when torch lacks it, the test writes it into a temporary include
  directory with the contents a CUDA build generates. The kernels include no cuBLAS header
  (GEMMs go through ATen), so nothing else is needed. Skipped, with the reason, without nvcc.
* ``test_emulated_*``: the host code of ``lstm_cuda.cu`` (views of the reserve, the GEMM calls,
  per-step sizes and offsets, the packed and reverse-direction bookkeeping) and the per-element
  bodies of the step kernels (``lstm_step.cuh``) are compiled with the C++ compiler against the
  running torch, with each kernel launch replaced by a plain loop over the same element function
  and CUDA's device guard and stream stubbed out (tests/cuda_emulation/lstm_cuda_emulated.cpp,
  with the stand-in headers in tests/cuda_emulation/include). Built so, they are registered as
  the ops ``fused_lstm_emulated::lstm_forward`` / ``lstm_backward`` for CPU tensors and compared
  with the CPU kernels, reserve included. This checks the CUDA path's index arithmetic and semantics, not
  the GPU execution itself (tests/test_cuda.py does that where a GPU is present).
* ``test_emulated_persistent_*``: the same for the persistent kernels (csrc/cuda/
  lstm_persistent.*). Their per-block bodies (``lstm_persistent.cuh``) run on the CPU with the
  grid barrier as a loop boundary: every block of a step (forward), or of phase A, then every
  block of phase B (backward), blocks and threads in reverse order so that a block reading what
  another block writes in the same phase gives a wrong result; shared memory starts as NaN, so
  reading what was never staged does too. The dot products are split over the same lanes and
  summed in the same butterfly order as the warp shuffles. The emulated device has an H100's
  limits unless ``FUSED_LSTM_EMULATED_DEVICE`` says otherwise. Not checked: the barriers
  themselves, warp shuffles, memory ordering, occupancy and timing.
* ``test_path_rule_*``: the path rule (csrc/cuda/lstm_path_rule.h), which every build registers
  as ``fused_lstm::cuda_path_predict`` for fused_lstm.explain: known sizes give known decisions,
  many random ones consistent decisions; and explain's prediction is what the (emulated) CUDA op
  decides.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch

from fused_lstm import _loader, ops

from helpers import (
    GRID,
    GRID_IDS,
    PERSISTENT_GRID,
    PERSISTENT_GRID_IDS,
    ROOT,
    make_case,
    op_args,
    reserve_in_common_layout,
)

CSRC = ROOT / "csrc"
CUDA_DIR = CSRC / "cuda"
CU_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = ("80", "90")  # sm_80 (A100) and sm_90 (H100/H200), as setup.py's default arch list
NVCC_TIMEOUT_S = 900


def test_cuda_sources_exist():
    """The compile check below must not pass vacuously."""
    assert CU_SOURCES, f"no CUDA sources (*.cu) in {CUDA_DIR}"
    assert (CUDA_DIR / "lstm_cuda.cu").is_file()


# ---- nvcc -------------------------------------------------------------------------------------


def find_nvcc():
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(variable)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.isfile(default) else None


def nvcc_version(nvcc):
    """(major, minor, patch) from ``nvcc --version`` ("... release 13.0, V13.0.88")."""
    text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"V(\d+)\.(\d+)\.(\d+)", text)
    assert match, f"cannot read the version of {nvcc}:\n{text}"
    return tuple(int(g) for g in match.groups())


def torch_include_dirs():
    from torch.utils import cpp_extension

    return list(cpp_extension.include_paths())


def generated_cuda_headers(directory: pathlib.Path, version) -> list[str]:
    """Writes the CMake-generated CUDA headers that this torch lacks into ``directory``; returns
    their paths relative to it. Contents: what torch's CUDA build generates from
    c10/cuda/impl/cuda_cmake_macros.h.in (a shared-library build)."""
    major, minor, patch = version
    headers = {
        "c10/cuda/impl/cuda_cmake_macros.h": (
            "#pragma once\n\n"
            "// Automatically generated header file for the C10 CUDA library.  Do not\n"
            "// include this file directly.  Instead, include c10/cuda/CUDAMacros.h\n\n"
            "#define C10_CUDA_BUILD_SHARED_LIBS\n\n"
            f"#define TORCH_CUDA_VERSION_MAJOR {major}\n"
            f"#define TORCH_CUDA_VERSION_MINOR {minor}\n"
            f"#define TORCH_CUDA_VERSION_PATCH {patch}\n"
            "#define TORCH_CUDA_VERSION_BUILD 0\n"
        ),
    }
    written = []
    for relative, text in headers.items():
        if any(os.path.isfile(os.path.join(d, relative)) for d in torch_include_dirs()):
            continue  # a CUDA build of torch has its own
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(relative)
    return written


def nvcc_command(nvcc, source: pathlib.Path, obj: pathlib.Path, extra_include: pathlib.Path):
    from torch.utils import cpp_extension

    system_includes = torch_include_dirs() + [str(extra_include)]
    python_include = sysconfig.get_path("include")
    if python_include:
        system_includes.append(python_include)
    command = [nvcc, "-c", str(source), "-o", str(obj), f"-I{CSRC}"]
    for include in system_includes:
        command += ["-isystem", include]
    command += ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    command += list(cpp_extension.COMMON_NVCC_FLAGS)
    command += ["--compiler-options", "-fPIC"]
    command += _loader.compile_flags(with_cuda=True)["nvcc"]
    command += ["-std=c++20"]
    for arch in ARCHS:
        command += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    if os.environ.get("CC"):
        command += ["-ccbin", os.environ["CC"]]
    return command


@pytest.fixture(scope="module")
def nvcc_results(tmp_path_factory):
    """Compiles every .cu at once (in parallel, at most MAX_JOBS at a time: two files on two
    cores take about as long as the slowest one); returns {source name: (command,
    CompletedProcess or None on timeout)}."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA_HOME, PATH, /usr/local/cuda): CUDA sources not compiled")
    out = tmp_path_factory.mktemp("nvcc")
    include = out / "generated_include"
    include.mkdir()
    generated_cuda_headers(include, nvcc_version(nvcc))
    commands = {
        src.name: nvcc_command(nvcc, src, out / (src.stem + ".o"), include) for src in CU_SOURCES
    }

    def run(command):
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=NVCC_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None

    # MAX_JOBS (the build's knob for parallel compile jobs) caps the parallel nvcc runs too.
    jobs = int(os.environ.get("MAX_JOBS") or 0) or os.cpu_count() or 1
    workers = max(1, min(len(commands), jobs))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(run, cmd) for name, cmd in commands.items()}
        return {name: (commands[name], f.result()) for name, f in futures.items()}


@pytest.mark.parametrize("source", [p.name for p in CU_SOURCES])
def test_nvcc_compiles_cuda_source(nvcc_results, source):
    command, result = nvcc_results[source]
    shown = " ".join(command)
    assert result is not None, f"nvcc ran past {NVCC_TIMEOUT_S} s:\n{shown}"
    assert result.returncode == 0, (
        f"nvcc failed on csrc/cuda/{source} (exit {result.returncode}):\n{shown}\n\n"
        f"{result.stdout}\n{result.stderr}"
    )
    assert os.path.getsize(command[command.index("-o") + 1]) > 0


def test_generated_header_is_only_what_torch_lacks(tmp_path):
    """The compile check supplies the generated macros header only where torch has none."""
    written = generated_cuda_headers(tmp_path, (13, 0, 0))
    has_own = any(
        os.path.isfile(os.path.join(d, "c10/cuda/impl/cuda_cmake_macros.h"))
        for d in torch_include_dirs()
    )
    assert written == ([] if has_own else ["c10/cuda/impl/cuda_cmake_macros.h"])
    for relative in written:
        assert "#define C10_CUDA_BUILD_SHARED_LIBS" in (tmp_path / relative).read_text()


# ---- the CUDA host code, emulated on the CPU ----------------------------------------------

# The emulation's translation unit and its stand-ins for the CUDA headers (tests/cuda_emulation/:
# lstm_cuda_emulated.cpp says how it is put together).
EMULATION_DIR = pathlib.Path(__file__).resolve().parent / "cuda_emulation"
EMULATION_SOURCE = EMULATION_DIR / "lstm_cuda_emulated.cpp"
EMULATION_FAKE_INCLUDE = EMULATION_DIR / "include"
# Written by emulated_ops into the build directory, included first by EMULATION_SOURCE.
EMULATION_PRELUDE = "emulation_system_includes.h"


def system_includes_of(source: pathlib.Path):
    """Every <...> include reached from ``source`` through "..." includes (found beside the file
    that includes them, else in csrc/), in order of first appearance; the prelude excepted."""
    seen, found, todo = set(), [], [source]
    while todo:
        path = todo.pop().resolve()
        if path in seen:
            continue
        seen.add(path)
        for kind, name in re.findall(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', path.read_text(), re.M):
            if kind == "<":
                if name not in found:
                    found.append(name)
            elif name != EMULATION_PRELUDE:
                local = path.parent / name
                todo.append(local if local.is_file() else CSRC / name)
    return found


def emulation_prelude():
    """The text of EMULATION_PRELUDE: every system header the emulation reaches, so that all are
    included while `fused_lstm` and `CUDA` are still plain words (before EMULATION_SOURCE's
    #defines)."""
    return "".join(f"#include <{name}>\n" for name in system_includes_of(EMULATION_SOURCE))


@pytest.fixture(scope="module")
def emulated_ops(tmp_path_factory):
    from torch.utils import cpp_extension

    build = tmp_path_factory.mktemp("cuda_emulation")
    (build / EMULATION_PRELUDE).write_text(emulation_prelude())
    # The cases are tiny: one thread each, so that a busy machine's oversubscribed OpenMP pool
    # cannot stretch milliseconds into seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cpp_extension.load(
        name="fused_lstm_cuda_emulated",
        sources=[str(EMULATION_SOURCE)],
        extra_cflags=["-O1"],
        extra_include_paths=[str(build), str(EMULATION_FAKE_INCLUDE), str(CSRC)],
        build_directory=str(build),
        with_cuda=False,
        is_python_module=False,
        verbose=False,
    )
    yield torch.ops.fused_lstm_emulated
    torch.set_num_threads(threads)


def _cast(a, dtype):
    b = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
         for k, v in a.items()}
    b["weights"] = [w.to(dtype) for w in a["weights"]]
    return b


TOLERANCE = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),  # one bfloat16 rounding apart at most
    torch.float16: dict(rtol=2e-3, atol=1e-5),
}

def _assert_same(got, expected, dtype, what):
    assert len(got) == len(expected), what
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == e.dtype and g.shape == e.shape, (what, i, g.dtype, e.dtype, g.shape, e.shape)
        torch.testing.assert_close(g, e, **TOLERANCE[dtype], msg=lambda m: f"{what}[{i}]: {m}")


def _without_gates(reserve, a):
    """The reserve (csrc/lstm.h's layout) less its gates: what a CPU reserve of a packed
    bfloat16 call or a float16 one keeps (gates_in_reserve), the CUDA path's keeping them."""
    x, H = a["input"], a["weights"][0].shape[0] // 4
    rows = x.shape[0] if a["batch_sizes"] is not None else x.shape[0] * x.shape[1]
    D = 2 if a["bidirectional"] else 1
    out = a["proj_size"] or H
    per_direction = H * (2 if a["proj_size"] else 1)  # cells [, pre_proj]
    parts, offset = [], 0
    for _ in range(a["num_layers"]):
        parts.append(reserve[offset:offset + rows * D * out])
        offset += rows * D * out
        for _ in range(D):
            offset += rows * 4 * H
            parts.append(reserve[offset:offset + rows * per_direction])
            offset += rows * per_direction
    assert offset == reserve.numel()
    return torch.cat(parts)


def _check_against_cpu(emulated_ops, a, dtype):
    """Forward (output, h_n, c_n and the whole reserve: less the gates where the CPU kernels
    keep none) and backward (every gradient, for each subset of upstream gradients) of the
    emulated CUDA path equal the CPU kernels'."""
    a = _cast(a, dtype)
    cpu = torch.ops.fused_lstm
    expected = cpu.lstm_forward(*op_args(a))
    got = emulated_ops.lstm_forward(*op_args(a))
    common = [*expected[:3], reserve_in_common_layout(expected[3], a)]
    x, bs = a["input"], a["batch_sizes"]
    rows = x.shape[0] if bs is not None else x.shape[0] * x.shape[1]
    H = a["weights"][0].shape[0] // 4
    if not ops.gates_in_reserve(x, bs, rows, H, a["proj_size"] or H,
                                2 if a["bidirectional"] else 1, a["num_layers"]):
        _assert_same([*got[:3], _without_gates(got[3], a)], common, dtype, "forward")
    else:
        _assert_same(got, common, dtype, "forward")
    upstream = [torch.randn_like(t) for t in expected[:3]]
    for keep in [(True, True, True), (True, False, False), (False, True, False),
                 (False, False, True)]:
        grads = [g if k else None for g, k in zip(upstream, keep)]
        b = op_args(a)
        e = cpu.lstm_backward(*b[:6], expected[3], *grads, *b[6:])
        g = emulated_ops.lstm_backward(*b[:6], got[3], *grads, *b[6:])
        _assert_same(list(g[:3]) + list(g[3]), list(e[:3]) + list(e[3]), dtype, f"backward {keep}")


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "nostate"])
@pytest.mark.parametrize("num_layers,bias,bidirectional,proj_size,packed", GRID, ids=GRID_IDS)
def test_emulated_cuda_path_matches_cpu_kernels(emulated_ops, num_layers, bias, bidirectional,
                                                proj_size, packed, with_state):
    """Every option combination, float64: the CUDA host code computes what the CPU kernels do."""
    dropout = 0.5 if with_state else 0.0  # with and without a mask, between layers
    _, a = make_case(num_layers, bias, bidirectional, proj_size, packed, with_state,
                     input_size=3, hidden_size=5, seq_len=5, batch=4, dropout=dropout,
                     requires_grad=False)
    _check_against_cpu(emulated_ops, a, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("bidirectional,proj_size,packed,with_state",
                         [(False, 0, False, True), (True, 2, True, False), (True, 0, True, True),
                          (False, 2, False, False)])
def test_emulated_cuda_path_matches_cpu_kernels_low_precision(
        emulated_ops, bidirectional, proj_size, packed, with_state, dtype):
    """float32 math for float32/bfloat16/float16 tensors: the dtype conversions at the op's
    boundary, as the CPU kernels do them."""
    _, a = make_case(2, True, bidirectional, proj_size, packed, with_state, input_size=3,
                     hidden_size=5, seq_len=5, batch=4, dropout=0.5, requires_grad=False)
    _check_against_cpu(emulated_ops, a, dtype)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("proj_size", [0, 2])
def test_emulated_cuda_path_zero_batch(emulated_ops, bidirectional, proj_size):
    """Zero batch: empty outputs, and every weight gradient is exactly zero (none left
    uninitialised)."""
    _, a = make_case(2, True, bidirectional, proj_size, False, with_state=True, batch=0,
                     requires_grad=False)
    output, hy, cy, reserve = emulated_ops.lstm_forward(*op_args(a))
    d = 2 if bidirectional else 1
    out = proj_size or 4
    assert output.shape == (4, 0, d * out) and hy.shape == (2 * d, 0, out)
    assert cy.shape == (2 * d, 0, 4) and reserve.numel() == 0
    b = op_args(a)
    grads = emulated_ops.lstm_backward(*b[:6], reserve, torch.randn_like(output),
                                       torch.randn_like(hy), torch.randn_like(cy), *b[6:])
    assert grads[0].shape == a["input"].shape
    for g, w in zip(grads[3], a["weights"]):
        assert g.shape == w.shape
        assert torch.equal(g, torch.zeros_like(w))


def test_emulated_cuda_path_long_packed_sequence(emulated_ops):
    """Many steps, ragged lengths, both directions, projection, dropout: the per-step offsets."""
    _, a = make_case(2, True, True, 3, True, with_state=True, input_size=7, hidden_size=8,
                     seq_len=23, batch=9, dropout=0.3, requires_grad=False)
    _check_against_cpu(emulated_ops, a, torch.float64)


# ---- the persistent kernels, emulated on the CPU ----------------------------------------------

@pytest.fixture(autouse=True)
def _step_path_unless_told(cuda_path):
    """The tests above check the step path, as before the persistent kernels existed; the
    persistent tests below choose their path (and plan) themselves."""
    cuda_path("step")


def _check_persistent(emulated_ops, a, dtype, launches_per_call):
    """_check_against_cpu, and the persistent kernels ran: one launch per layer per call."""
    before = emulated_ops.persistent_launches()
    _check_against_cpu(emulated_ops, a, dtype)
    calls = 5  # one forward, four backwards
    assert emulated_ops.persistent_launches() - before == launches_per_call * calls


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "nostate"])
@pytest.mark.parametrize("num_layers,bias,bidirectional,packed", PERSISTENT_GRID,
                         ids=PERSISTENT_GRID_IDS)
def test_emulated_persistent_matches_cpu_kernels(emulated_ops, cuda_path, num_layers, bias,
                                                 bidirectional, packed, with_state):
    """Every option the persistent kernels take, float64, on a multi-block plan (2 units per
    block: 3 blocks per direction, the last one ragged): forward, reserve and every gradient
    equal the CPU kernels'."""
    cuda_path("persistent", units=2)
    dropout = 0.5 if with_state else 0.0
    _, a = make_case(num_layers, bias, bidirectional, 0, packed, with_state, input_size=3,
                     hidden_size=5, seq_len=5, batch=4, dropout=dropout, requires_grad=False)
    _check_persistent(emulated_ops, a, torch.float64, num_layers)


@pytest.mark.parametrize("units,tile,k_split", [
    (None, None, None),  # the rule's own plan
    (1, None, None), (1, 4, 1), (2, 4, 2), (3, 8, 32), (4, 4, 8), (5, 4, 16), (7, None, 4),
    (9, 8, None),  # more units than H: one block
])
@pytest.mark.parametrize("mode", ["persistent", "auto"])
def test_emulated_persistent_plans(emulated_ops, cuda_path, units, tile, k_split, mode):
    """Plans: units per block (blocks per direction 7, 4, 3, 2, 2, 1), batch tiles (9 rows in
    tiles of 4 or 8: a partial last tile), lanes per dot product (1 to 32): packed,
    bidirectional, with state, float64."""
    cuda_path(mode, units=units, tile=tile, k_split=k_split)
    _, a = make_case(2, True, True, 0, True, True, input_size=3, hidden_size=7, seq_len=6,
                     batch=9, dropout=0.5, requires_grad=False)
    _check_persistent(emulated_ops, a, torch.float64, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("bidirectional,packed,with_state",
                         [(False, False, True), (True, True, True), (True, False, False)])
def test_emulated_persistent_low_precision(emulated_ops, cuda_path, bidirectional, packed,
                                           with_state, dtype):
    cuda_path("persistent", units=2, k_split=4)
    _, a = make_case(2, True, bidirectional, 0, packed, with_state, input_size=3, hidden_size=5,
                     seq_len=5, batch=4, dropout=0.5, requires_grad=False)
    _check_persistent(emulated_ops, a, dtype, 2)


def test_emulated_persistent_long_packed_sequence(emulated_ops, cuda_path):
    """Many steps, ragged lengths (many batch-size runs), both directions, dropout."""
    cuda_path("persistent", units=3, tile=4)
    _, a = make_case(2, True, True, 0, True, with_state=True, input_size=7, hidden_size=8,
                     seq_len=23, batch=9, dropout=0.3, requires_grad=False)
    _check_persistent(emulated_ops, a, torch.float64, 2)


def test_emulated_persistent_auto_at_a_realistic_size(emulated_ops, cuda_path):
    """The rule's own choice (auto, emulated H100) at hidden 64, batch 16: persistent, several
    blocks per direction; float32."""
    cuda_path("auto")
    _, a = make_case(1, True, True, 0, False, with_state=True, input_size=8, hidden_size=64,
                     seq_len=4, batch=16, requires_grad=False)
    text = emulated_ops.cuda_path_choice(a["input"].float(), None, 64, True, 0)
    assert text.startswith("forward: path=persistent reason=auto"), text
    _check_persistent(emulated_ops, a, torch.float32, 1)


@pytest.mark.parametrize("case", ["projection", "too_many_batch_size_runs",
                                  "no_cooperative_launch", "does_not_fit", "occupancy_refused",
                                  "forced_step"])
def test_emulated_persistent_falls_back_to_the_step_path(emulated_ops, cuda_path, case):
    """What the persistent kernels cannot do runs the step path (no persistent launch), with
    the reason that explain() shows, and the same results."""
    proj, batch, seq_len = 0, 4, 5
    cuda_path("persistent")
    if case == "projection":
        proj = 2
    elif case == "too_many_batch_size_runs":
        batch, seq_len = 130, 130  # lengths 130, 129, ..., 1: 130 distinct batch sizes
    elif case == "no_cooperative_launch":
        cuda_path("persistent", device="0,132,233472,232448,1024,2")
    elif case == "does_not_fit":
        cuda_path("persistent", device="1,1,4096,2048,1024,2")  # 2 KB of shared memory
    elif case == "occupancy_refused":
        cuda_path("persistent", coresident=1)
    else:
        cuda_path("step")
    _, a = make_case(2, True, True, proj, True, True, input_size=2, hidden_size=5,
                     seq_len=seq_len, batch=batch, requires_grad=False)
    if case == "too_many_batch_size_runs":
        lengths = torch.arange(seq_len, 0, -1)
        x = torch.randn(seq_len, batch, 2, dtype=torch.float64)
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths)
        a["input"], a["batch_sizes"] = packed.data, packed.batch_sizes
    text = emulated_ops.cuda_path_choice(a["input"], a["batch_sizes"], 5, True, proj)
    for line in text.splitlines():
        assert f"path=step reason={case}" in line, text
    before = emulated_ops.persistent_launches()
    if case == "too_many_batch_size_runs":  # long: the forward only
        expected = torch.ops.fused_lstm.lstm_forward(*op_args(a))
        expected = [*expected[:3], reserve_in_common_layout(expected[3], a)]
        _assert_same(emulated_ops.lstm_forward(*op_args(a)), expected, torch.float64, "forward")
    else:
        _check_against_cpu(emulated_ops, a, torch.float64)
    assert emulated_ops.persistent_launches() == before


@pytest.mark.parametrize("bidirectional", [False, True])
def test_emulated_persistent_zero_batch(emulated_ops, cuda_path, bidirectional):
    cuda_path("persistent")
    _, a = make_case(2, True, bidirectional, 0, False, with_state=True, batch=0,
                     requires_grad=False)
    output, hy, cy, reserve = emulated_ops.lstm_forward(*op_args(a))
    assert output.shape == (4, 0, (2 if bidirectional else 1) * 4) and reserve.numel() == 0
    text = emulated_ops.cuda_path_choice(a["input"], None, 4, bidirectional, 0)
    assert "reason=empty_batch" in text


def test_emulated_path_settings_are_checked(emulated_ops, cuda_path):
    """Bad CUDA path settings are refused when set (fused_lstm.backends.cuda); what reaches the
    C++ settings without Python's checks is refused there (its range) or by the call (k_split
    must be a power of two)."""
    _, a = make_case(1, True, False, 0, False, True, requires_grad=False)
    for bad in (dict(mode="fastest"), dict(mode="persistent", units=0),
                dict(mode="persistent", k_split=3), dict(mode="auto", tile=65)):
        with pytest.raises(ValueError, match="fused_lstm.backends.cuda"):
            cuda_path(**bad)
    with pytest.raises(ValueError, match="takes a value in"):
        emulated_ops._set_setting("cuda.persistent_tile", 65)
    emulated_ops._set_setting("cuda.persistent_k_split", 3)
    try:
        with pytest.raises(RuntimeError, match="power of two"):
            emulated_ops.lstm_forward(*op_args(a))
    finally:
        emulated_ops._set_setting("cuda.persistent_k_split", 0)


# ---- the path rule (csrc/cuda/lstm_path_rule.h), as every build registers it ------------------
# fused_lstm::cuda_path_predict runs the one rule the CUDA build decides with; explain's
# decide_cuda_path / predict_cuda_path call it. Known sizes give known decisions (every outcome,
# the plan and the cost model's numbers), and many random sizes give consistent ones.

A100_LIKE = (True, 108, 167936, 166912, 1024, 2)
TINY_DEVICE = (True, 1, 16384, 8192, 0, 1)
NO_COOPERATIVE = (False, 132, 233472, 232448, 1024, 2)

DEVICES = {
    "A100_LIKE": A100_LIKE, "TINY_DEVICE": TINY_DEVICE, "NO_COOPERATIVE": NO_COOPERATIVE,
}
KNOWN_DECISIONS_FILE = pathlib.Path(__file__).resolve().parent / "cuda_path_rule_decisions.txt"


def known_decisions():
    """{name: (decide_cuda_path's arguments, the describe() line)} from KNOWN_DECISIONS_FILE."""
    from fused_lstm.explain import H100_SXM, DeviceLimits

    lines = [line.strip() for line in KNOWN_DECISIONS_FILE.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(lines) % 2 == 0, f"{KNOWN_DECISIONS_FILE}: a case is two lines"
    cases = {}
    for header, expected in zip(lines[::2], lines[1::2]):
        name, _, fields = header.partition(": ")
        *sizes, backward, device, mode, units, batch_tile, k_split = fields.split()
        limits = H100_SXM if device == "H100_SXM" else DeviceLimits(*DEVICES[device])
        args = (*map(int, sizes), backward == "1", limits, mode, int(units), int(batch_tile),
                int(k_split))
        assert name not in cases, f"{KNOWN_DECISIONS_FILE}: {name} twice"
        cases[name] = (args, expected)
    return cases


KNOWN_DECISIONS = known_decisions()


@pytest.mark.parametrize("name", list(KNOWN_DECISIONS))
def test_path_rule_known_decisions(name):
    """Known sizes, devices and overrides give known decisions, word for word
    (tests/cuda_path_rule_decisions.txt): every outcome the rule can give without a GPU, the
    plan and the cost model's numbers."""
    from fused_lstm.explain import decide_cuda_path

    args, expected = KNOWN_DECISIONS[name]
    assert len(args) == 13 and expected.startswith("path="), name
    assert decide_cuda_path(*args) == expected


def _rule_cases():
    from fused_lstm.explain import H100_SXM, DeviceLimits

    devices = [
        H100_SXM,
        DeviceLimits(*A100_LIKE),
        DeviceLimits(True, 4, 65536, 49152, 1024, 8),      # small
        DeviceLimits(*TINY_DEVICE),
        DeviceLimits(*NO_COOPERATIVE),
    ]
    gen = torch.Generator().manual_seed(8)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=gen))]  # noqa: E731
    cases = []
    for _ in range(1500):
        cases.append(dict(
            hidden_size=pick([1, 2, 3, 5, 10, 31, 64, 100, 256, 384, 512, 768, 1024, 1500, 2048,
                              4096]),
            proj_size=pick([0, 0, 0, 0, 2]),
            batch=pick([0, 1, 3, 4, 10, 16, 32, 64, 92, 100, 256]),
            seq_len=pick([1, 4, 100, 1024]),
            num_directions=pick([1, 2]),
            num_runs=pick([1, 1, 7, 128, 129]),
            elem_size=pick([4, 8]),
            backward=pick([False, True]),
            limits=pick(devices),
            mode=pick(["auto", "auto", "persistent", "step"]),
            units=pick([0, 0, 0, 1, 3, 16]),
            batch_tile=pick([0, 0, 0, 4, 10, 64]),
            k_split=pick([0, 0, 0, 1, 8, 32]),
        ))
    return cases


def _check_decision(case, choice):
    """What holds for every answer of the rule, whatever its constants."""
    from fused_lstm.explain import REASONS

    c, lim = case, case["limits"]
    path, reason = choice["path"], choice["reason"]
    assert reason in REASONS and reason != "occupancy_refused"  # the occupancy API's, on a GPU
    assert (path == "persistent") == (reason in ("auto", "forced_persistent"))
    assert (reason == "forced_step") == (c["mode"] == "step")
    assert reason not in ("auto", "step_path_predicted_faster") or c["mode"] == "auto"
    assert reason != "forced_persistent" or c["mode"] == "persistent"
    early = ("forced_step", "no_cooperative_launch", "empty_batch", "projection",
             "too_many_batch_size_runs")
    if reason in early:
        assert "units" not in choice
        return
    # Past the hard limits: a cooperative device, rows to compute, no projection.
    assert lim.cooperative_launch and c["proj_size"] == 0
    assert min(c["batch"], c["seq_len"], c["hidden_size"]) > 0
    if "units" not in choice:  # no tile fits in one block's shared memory
        assert reason == "does_not_fit"
        return
    H, units = c["hidden_size"], choice["units"]
    assert 1 <= units <= H and choice["blocks"] == -(-H // units)
    if c["units"]:
        assert units == min(c["units"], H)
    if c["k_split"]:
        assert choice["k_split"] == c["k_split"]
    assert choice["k_split"] in (1, 2, 4, 8, 16, 32)
    assert 0 < choice["batch_tile"] and 0 < choice["smem_bytes"] <= lim.smem_per_block_optin
    if c["batch_tile"]:
        assert choice["batch_tile"] < c["batch_tile"] + 4  # rounded up to whole register tiles
    fits = choice["blocks"] * c["num_directions"] <= choice["coresident_blocks"]
    assert fits == (reason != "does_not_fit")
    if reason == "auto":
        assert choice["persistent_ns"] < choice["step_path_ns"]
    if reason == "step_path_predicted_faster":
        assert choice["persistent_ns"] >= choice["step_path_ns"]


def test_path_rule_on_many_sizes():
    """The rule on 1500 random sizes, devices and overrides: every answer is consistent (with
    the hard limits, the overrides, the device's shared memory and co-residency, the cost
    model's verdict), and every outcome is reached."""
    from fused_lstm.explain import decide_cuda_path, parse_choice

    seen = set()
    for case in _rule_cases():
        text = decide_cuda_path(**case)
        _check_decision(case, parse_choice(text))
        seen.add(" ".join(text.split()[:2]))
    # Every outcome was exercised.
    for outcome in ("path=persistent reason=auto", "path=persistent reason=forced_persistent",
                    "path=step reason=forced_step", "path=step reason=projection",
                    "path=step reason=does_not_fit", "path=step reason=step_path_predicted_faster",
                    "path=step reason=too_many_batch_size_runs",
                    "path=step reason=no_cooperative_launch", "path=step reason=empty_batch"):
        assert outcome in seen, outcome


def test_path_rule_arguments_are_checked():
    from fused_lstm.explain import H100_SXM, decide_cuda_path

    sizes = (64, 0, 16, 4, 2, 1, 4, False, H100_SXM)
    for bad in (dict(mode="fastest"), dict(units=-1), dict(batch_tile=65), dict(k_split=3),
                dict(k_split=64)):
        with pytest.raises(RuntimeError, match="cuda_path_predict"):
            decide_cuda_path(*sizes, **bad)
    with pytest.raises(RuntimeError, match="device_limits"):
        torch.ops.fused_lstm.cuda_path_predict(*sizes[:8], [1, 132, 233472])
    with pytest.raises(RuntimeError, match="elem_size"):
        decide_cuda_path(64, 0, 16, 4, 2, 1, 2, False, H100_SXM)


@pytest.mark.parametrize("packed,dtype,proj_size", [
    (False, torch.float32, 0), (True, torch.float64, 0), (True, torch.float32, 0),
    (False, torch.float64, 2)])
def test_explain_predicts_what_the_cuda_op_decides(emulated_ops, cuda_path, packed, dtype,
                                                   proj_size):
    """predict_cuda_path (explain's reading of a call's sizes, then the rule) says what
    fused_lstm::cuda_path_choice (the CUDA op's own reading, the rule, the occupancy check)
    decides on the emulated H100, word for word."""
    from fused_lstm.explain import H100_SXM, predict_cuda_path

    cuda_path("auto")
    hidden, bidirectional = 24, True
    if packed:
        lengths = [9, 9, 7, 4, 4, 1]
        x = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(9, 6, 5, dtype=dtype), lengths)
        data, batch_sizes = x.data, x.batch_sizes
    else:
        x = data = torch.randn(9, 6, 5, dtype=dtype)
        batch_sizes = None
    text = emulated_ops.cuda_path_choice(data, batch_sizes, hidden, bidirectional, proj_size)
    lines = dict(line.split(": ", 1) for line in text.splitlines())
    sizes = dict(hidden_size=hidden, bidirectional=bidirectional, proj_size=proj_size)
    result = predict_cuda_path(sizes, x, H100_SXM)
    for direction in ("forward", "backward"):
        words = dict(w.partition("=")[::2] for w in lines[direction].split())
        predicted = {k: str(v) for k, v in result[direction].items() if k != "why"}
        assert predicted == words, (direction, lines[direction])


@pytest.mark.parametrize("name,sizes,forward,backward", [
    # the issue's workloads: (input, hidden, layers, seq, batch), dtype
    ("seed-tiny", (1, 3, 2, 4, 92, torch.float32), "persistent", "persistent"),
    ("small", (5, 10, 2, 3, 10, torch.float32), "persistent", "persistent"),
    ("stream-step", (64, 256, 2, 1, 1, torch.float32), "persistent", "persistent"),
    ("medium", (128, 256, 2, 100, 32, torch.float32), "persistent", "persistent"),
    ("fastrnns", (512, 512, 1, 100, 64, torch.float32), "persistent", "step"),
    ("flashrnn", (768, 768, 1, 1024, 16, torch.bfloat16), "persistent", "persistent"),
    ("large", (1024, 1024, 1, 100, 64, torch.float32), "step", "step"),
])
def test_predicted_paths_of_the_issue_workloads(name, sizes, forward, backward):
    """What the rule picks on an H100 for benchmarks/compare.py's workloads
    (benchmarks/notes/cuda.md, "The plan and the cost model (what `explain` will say on an H100,
    predicted)", quotes these plans and the cost model's numbers)."""
    from fused_lstm.explain import predict_cuda_path

    input_size, hidden, layers, seq_len, batch, dtype = sizes
    x = torch.empty(seq_len, batch, input_size, dtype=dtype)
    result = predict_cuda_path(dict(hidden_size=hidden, num_layers=layers), x)
    assert result["forward"]["path"] == forward, result["summary"]
    assert result["backward"]["path"] == backward, result["summary"]


def test_explain_on_cpu_says_the_cpu_kernels():
    import fused_lstm

    lstm = fused_lstm.FusedLSTM(3, 5, 2, batch_first=True, bidirectional=True)
    result = fused_lstm.explain(lstm, torch.randn(4, 6, 3))
    assert result["path"] == "small_hidden" and result["device"] == "cpu"
    assert result["forward"]["path"] == result["backward"]["path"] == "small_hidden"
    assert result["summary"].startswith("cpu: forward small_hidden")
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(6, 4, 3), [6, 5, 2, 1])
    assert fused_lstm.explain(dict(hidden_size=5), packed)["path"] == "small_hidden"
    assert fused_lstm.explain(dict(hidden_size=40), packed)["path"] == "row_wise"
    with pytest.raises(TypeError):
        fused_lstm.explain(object(), torch.randn(4, 6, 3))


def test_explain_parses_the_cpp_answer(emulated_ops, cuda_path):
    """explain()'s reading of fused_lstm::cuda_path_choice, on the emulated op's text."""
    from fused_lstm.explain import parse_choice

    cuda_path("auto")
    x = torch.randn(5, 4, 3)
    lines = dict(line.split(": ", 1)
                 for line in emulated_ops.cuda_path_choice(x, None, 8, True, 0).splitlines())
    assert set(lines) == {"forward", "backward"}
    forward = parse_choice(lines["forward"])
    assert forward["path"] == "persistent" and forward["reason"] == "auto"
    assert forward["units"] == 8 and forward["blocks"] == 1 and forward["smem_bytes"] > 0
    assert forward["why"].startswith("W_hh fits on chip")
    step = parse_choice(emulated_ops.cuda_path_choice(x, None, 8, True, 2).splitlines()[0]
                        .split(": ", 1)[1])
    assert step == {"path": "step", "reason": "projection",
                    "why": "proj_size > 0: the persistent kernels do not handle the projection"}
