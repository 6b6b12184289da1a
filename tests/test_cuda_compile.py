"""The CUDA backend where no GPU is present (CI has none, and a CPU-only torch).

Two checks keep csrc/cuda honest without a GPU:

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
  and CUDA's device guard and stream stubbed out. Built so, they are registered as the ops
  ``fused_lstm_emulated::lstm_forward`` / ``lstm_backward`` for CPU tensors and compared with the
  CPU kernels, reserve included. This checks the CUDA path's index arithmetic and semantics, not
  the GPU execution itself (tests/test_cuda.py does that where a GPU is present).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import pathlib
import re
import shutil
import subprocess
import sysconfig
import textwrap

import pytest
import torch

from fused_lstm import _loader
from test_ops import make_case

ROOT = pathlib.Path(__file__).resolve().parents[1]
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
    """Compiles every .cu at once (in parallel: two files on two cores take about as long as
    the slowest one); returns {source name: (command, CompletedProcess or None on timeout)}."""
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

    workers = max(1, min(len(commands), os.cpu_count() or 1))
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

# Stand-ins for the CUDA runtime and c10's CUDA guard and stream: the host code only names them.
FAKE_HEADERS = {
    "cuda_runtime_api.h": """
        #pragma once
        typedef struct CUstream_st* cudaStream_t;
    """,
    "c10/cuda/CUDAGuard.h": """
        #pragma once
        #include <c10/core/Device.h>
        namespace c10::cuda {
        struct CUDAGuard {
          explicit CUDAGuard(c10::Device) {}
        };
        }  // namespace c10::cuda
    """,
    "c10/cuda/CUDAStream.h": """
        #pragma once
        #include <cuda_runtime_api.h>
        #include <c10/core/Device.h>
        namespace c10::cuda {
        struct CUDAStream {
          operator cudaStream_t() const { return nullptr; }
        };
        inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
        }  // namespace c10::cuda
    """,
}

# Each kernel launch becomes a loop over the kernel's own per-element function.
EMULATED_KERNELS = """
namespace fused_lstm::gpu {
template <typename T>
void lstm_forward_step(int64_t batch, int64_t hidden, T* gates, T* c_state, T* cells, T* h_out,
                       int64_t ld_h_out, T* h_state, cudaStream_t) {
  for (int64_t idx = 0; idx < batch * hidden; ++idx)
    forward_step_element<T>(idx, hidden, gates, c_state, cells, h_out, ld_h_out, h_state);
}
template <typename T>
void lstm_backward_step(const BackwardStep<T>& step, cudaStream_t) {
  for (int64_t idx = 0; idx < step.batch * step.hidden; ++idx) backward_step_element<T>(step, idx);
}
template void lstm_forward_step<float>(int64_t, int64_t, float*, float*, float*, float*, int64_t,
                                       float*, cudaStream_t);
template void lstm_forward_step<double>(int64_t, int64_t, double*, double*, double*, double*,
                                        int64_t, double*, cudaStream_t);
template void lstm_backward_step<float>(const BackwardStep<float>&, cudaStream_t);
template void lstm_backward_step<double>(const BackwardStep<double>&, cudaStream_t);
}  // namespace fused_lstm::gpu
"""

# The project files the harness includes, relative to csrc/.
EMULATED_SOURCES = ("lstm.cpp", "cuda/lstm_cuda.cu", "cuda/lstm_step.cuh")


def system_includes_of(files):
    """Every <...> include reached from ``files`` through the project's own "..." includes."""
    seen, found, todo = set(), [], [CSRC / f for f in files]
    while todo:
        path = todo.pop().resolve()
        if path in seen:
            continue
        seen.add(path)
        for kind, name in re.findall(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', path.read_text(), re.M):
            if kind == "<":
                if name not in found:
                    found.append(name)
            else:
                todo.append(path.parent / name)
    return found


def emulation_source():
    # Every system header is included first, while `fused_lstm` and `CUDA` are still plain
    # words; then the project's sources with the namespace renamed (so the ops are
    # fused_lstm_emulated::*, beside the real ones) and the CUDA dispatch key replaced by CPU.
    lines = [f"#include <{name}>" for name in system_includes_of(EMULATED_SOURCES)]
    lines += ["#define fused_lstm fused_lstm_emulated", "#define CUDA CPU"]
    lines += [f'#include "{name}"' for name in EMULATED_SOURCES]
    return "\n".join(lines) + "\n" + EMULATED_KERNELS


@pytest.fixture(scope="module")
def emulated_ops(tmp_path_factory):
    from torch.utils import cpp_extension

    build = tmp_path_factory.mktemp("cuda_emulation")
    fake = build / "fake_include"
    for relative, text in FAKE_HEADERS.items():
        path = fake / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    source = build / "lstm_cuda_emulated.cpp"
    source.write_text(emulation_source())
    # The cases are tiny: one thread each, so that a busy machine's oversubscribed OpenMP pool
    # cannot stretch milliseconds into seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cpp_extension.load(
        name="fused_lstm_cuda_emulated",
        sources=[str(source)],
        extra_cflags=["-O1"],
        extra_include_paths=[str(fake), str(CSRC)],
        build_directory=str(build),
        with_cuda=False,
        is_python_module=False,
        verbose=False,
    )
    yield torch.ops.fused_lstm_emulated
    torch.set_num_threads(threads)


def _args(a):
    return (a["input"], a["batch_sizes"], a["hx"], a["cx"], a["weights"], a["dropout_mask"],
            a["num_layers"], a["bidirectional"], a["has_biases"], a["proj_size"])


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

GRID = list(itertools.product([1, 2, 3], [True, False], [False, True], [0, 2], [False, True]))
GRID_IDS = [f"L{l}-{'bias' if b else 'nobias'}-{'bi' if d else 'uni'}-proj{p}-"
            f"{'packed' if k else 'padded'}" for l, b, d, p, k in GRID]


def _assert_same(got, expected, dtype, what):
    assert len(got) == len(expected), what
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == e.dtype and g.shape == e.shape, (what, i, g.dtype, e.dtype, g.shape, e.shape)
        torch.testing.assert_close(g, e, **TOLERANCE[dtype], msg=lambda m: f"{what}[{i}]: {m}")


def _check_against_cpu(emulated_ops, a, dtype):
    """Forward (output, h_n, c_n and the whole reserve) and backward (every gradient, for
    each subset of upstream gradients) of the emulated CUDA path equal the CPU kernels'."""
    a = _cast(a, dtype)
    cpu = torch.ops.fused_lstm
    expected = cpu.lstm_forward(*_args(a))
    got = emulated_ops.lstm_forward(*_args(a))
    _assert_same(got, expected, dtype, "forward")
    upstream = [torch.randn_like(t) for t in expected[:3]]
    for keep in [(True, True, True), (True, False, False), (False, True, False),
                 (False, False, True)]:
        grads = [g if k else None for g, k in zip(upstream, keep)]
        b = _args(a)
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
    output, hy, cy, reserve = emulated_ops.lstm_forward(*_args(a))
    d = 2 if bidirectional else 1
    out = proj_size or 4
    assert output.shape == (4, 0, d * out) and hy.shape == (2 * d, 0, out)
    assert cy.shape == (2 * d, 0, 4) and reserve.numel() == 0
    b = _args(a)
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
