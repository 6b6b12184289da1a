"""The build and load layer: the library is loaded, registered, and matches the running torch."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_lstm.ops  # noqa: F401  (loads the library)
from fused_lstm import _loader

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_cpu_kernel(op):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_lstm::{op}", "CPU")


def test_library_is_loaded_once_and_registers_the_ops():
    mode = _loader.load_library()
    assert mode in ("aot", "jit")
    assert _loader.load_library() == mode == _loader.load_mode()
    assert os.path.isfile(_loader.library_path())
    # The same file is FusedLSTM's Python entry point (csrc/python_entry.cpp).
    assert callable(getattr(_loader.python_entry(), "forward", None))
    for op in ("lstm_forward", "lstm_backward"):
        assert hasattr(torch.ops.fused_lstm, op)
        assert _has_cpu_kernel(op), f"no CPU kernel registered for fused_lstm::{op}"


def test_aot_library_was_built_for_the_running_torch():
    if _loader.load_mode() != "aot":
        pytest.skip("the library was compiled on import (JIT), not ahead of time")
    info = _loader.read_build_info()
    assert info is not None, "an AOT library without fused_lstm/_build_info.py"
    assert info["torch_version"] == torch.__version__
    for key, value in _loader.running_torch_info().items():
        assert info[key] == value, key


@pytest.mark.skipif(
    os.environ.get("FUSED_LSTM_EXPECT_AOT") != "1",
    reason="set FUSED_LSTM_EXPECT_AOT=1 (as .ci/run does) after an ahead-of-time install",
)
def test_tests_run_against_the_installed_ahead_of_time_build():
    # Guards CI against testing the source tree (which would compile on import) instead of the
    # installed package, and against an install that silently skipped the AOT build.
    assert _loader.load_mode() == "aot"
    checkout_package = os.path.realpath(os.path.join(REPO_ROOT, "fused_lstm"))
    loaded_package = os.path.realpath(os.path.dirname(_loader.__file__))
    assert loaded_package != checkout_package, "the tests imported the source tree"
    assert os.path.dirname(os.path.realpath(_loader.library_path())) == loaded_package


@pytest.mark.parametrize(
    "field, fake",
    [
        ("torch_version", "1.0.0+fake"),
        ("torch_git_version", "0000000000000000000000000000000000000000"),
        ("torch_cuda_version", "99.9"),
        ("cxx11_abi", not torch._C._GLIBCXX_USE_CXX11_ABI),
    ],
)
def test_library_built_for_another_torch_is_refused_with_a_clear_import_error(field, fake):
    info = dict(_loader.running_torch_info(), **{field: fake})
    with pytest.raises(ImportError) as raised:
        _loader.check_build_info(info, "/somewhere/_C.so")
    message = str(raised.value)
    assert "/somewhere/_C.so" in message
    assert repr(fake) in message and torch.__version__ in message
    assert "pip install --no-build-isolation --no-deps --force-reinstall ." in message
    assert "FUSED_LSTM_FORCE_JIT=1" in message


def test_matching_or_missing_build_info_is_accepted():
    _loader.check_build_info(_loader.running_torch_info())
    _loader.check_build_info(None)


def test_load_library_checks_the_build_before_loading(monkeypatch):
    # The whole AOT path with a recorded torch other than the running one: ImportError, and the
    # library is never dlopen'ed.
    def must_not_load(path):
        raise AssertionError(f"loaded {path} although it was built for another torch")

    monkeypatch.delenv("FUSED_LSTM_FORCE_JIT", raising=False)
    monkeypatch.setattr(_loader, "_load_mode", None)
    monkeypatch.setattr(_loader, "find_aot_library", lambda: "/somewhere/_C.so")
    monkeypatch.setattr(
        _loader,
        "read_build_info",
        lambda: dict(_loader.running_torch_info(), torch_version="1.0.0+fake"),
    )
    monkeypatch.setattr(_loader, "_load_so", must_not_load)
    with pytest.raises(ImportError, match=r"compiled for torch 1\.0\.0\+fake"):
        _loader.load_library()


def test_a_library_that_cannot_be_loaded_gives_an_import_error(tmp_path):
    broken = tmp_path / "_C.so"
    broken.write_bytes(b"not a shared library")
    with pytest.raises(ImportError, match="could not load the compiled library") as raised:
        _loader._load_so(str(broken))
    assert str(broken) in str(raised.value)
    assert isinstance(raised.value.__cause__, OSError)


def test_jit_cache_is_keyed_by_torch_version_and_cuda_kernels(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    src = _loader.find_sources()
    here = _loader.jit_build_directory(src, with_cuda=False)
    assert here.startswith(str(tmp_path))
    assert torch.__version__ in here
    assert _loader.jit_build_directory(src, with_cuda=True) != here
    monkeypatch.setattr(torch, "__version__", "9.9.9+other")
    assert _loader.jit_build_directory(src, with_cuda=False) != here


def test_cuda_kernels_follow_the_torch_build_not_the_machine(monkeypatch):
    if torch.version.cuda is not None:
        pytest.skip("this torch was built with CUDA")
    monkeypatch.delenv("FUSED_LSTM_FORCE_CUDA", raising=False)
    assert not _loader.want_cuda_kernels(_loader.find_sources())
    monkeypatch.setenv("FUSED_LSTM_FORCE_CUDA", "1")
    with pytest.raises(ImportError, match="a torch built with CUDA"):
        _loader.want_cuda_kernels(_loader.find_sources())


def _cuda_torch(monkeypatch, cuda_home, gpus=0):
    """Makes the running (CPU) torch look like a CUDA build with ``CUDA_HOME=cuda_home`` and
    ``gpus`` visible GPUs, for the build decisions."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None if cuda_home is None else str(cuda_home))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.delenv("FUSED_LSTM_FORCE_CUDA", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)


def test_cuda_home_must_be_a_toolkit_not_a_wrapper_location(monkeypatch, tmp_path):
    # A wrapper nvcc on PATH (/usr/local/bin/nvcc) makes torch infer CUDA_HOME=/usr/local: the
    # build would fail at the link. Without the toolkit's runtime header: the CPU kernels only,
    # saying why; with FUSED_LSTM_FORCE_CUDA=1 an error saying the same.
    src = _loader.find_sources()
    _cuda_torch(monkeypatch, tmp_path)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    assert not _loader.want_cuda_kernels(src)
    note = _loader.cpu_only_note(src)
    assert note is not None and f"CUDA_HOME={tmp_path}" in note
    assert "include/cuda_runtime_api.h" in note and "set CUDA_HOME" in note
    monkeypatch.setenv("FUSED_LSTM_FORCE_CUDA", "1")
    with pytest.raises(ImportError, match="cuda_runtime_api.h"):
        _loader.want_cuda_kernels(src)
    monkeypatch.setenv("FUSED_LSTM_FORCE_CUDA", "0")
    assert _loader.cpu_only_note(src) is None  # asked for: no news

    monkeypatch.delenv("FUSED_LSTM_FORCE_CUDA")
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime_api.h").write_text("")
    assert _loader.want_cuda_kernels(src)
    assert _loader.cpu_only_note(src) is None

    _cuda_torch(monkeypatch, None)  # no nvcc at all
    assert "set CUDA_HOME" in _loader.cpu_only_note(src)


def test_jit_cuda_architectures_default_to_the_ahead_of_time_list_without_a_gpu(monkeypatch):
    _cuda_torch(monkeypatch, "/usr/local/cuda", gpus=0)
    assert _loader.jit_cuda_arch_list(with_cuda=True) == _loader.DEFAULT_CUDA_ARCH_LIST
    assert _loader.jit_cuda_arch_list(with_cuda=False) is None
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "native")  # detection again: no GPU to detect
    assert _loader.jit_cuda_arch_list(with_cuda=True) == _loader.DEFAULT_CUDA_ARCH_LIST
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5")  # the user's choice stands
    assert _loader.jit_cuda_arch_list(with_cuda=True) is None
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # torch compiles for the GPU
    assert _loader.jit_cuda_arch_list(with_cuda=True) is None


def test_the_default_list_gets_past_torchs_architecture_detection(monkeypatch):
    # With no GPU visible and no TORCH_CUDA_ARCH_LIST, torch's detection fails (torch 2.11 to
    # 2.15: IndexError at arch_list[-1] += '+PTX'); with the default list it gives the flags.
    from torch.utils import cpp_extension

    arch_flags = getattr(cpp_extension, "_get_cuda_arch_flags", None)
    if arch_flags is None:
        pytest.skip("this torch has no cpp_extension._get_cuda_arch_flags")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", _loader.DEFAULT_CUDA_ARCH_LIST)
    flags = " ".join(arch_flags())
    assert "code=sm_80" in flags and "code=sm_90" in flags and "code=compute_90" in flags


def _jit_load_with(monkeypatch, tmp_path, fake_load, gpus=0):
    """_loader._load_jit with torch's cpp_extension.load replaced by ``fake_load``, for a torch
    that looks like a CUDA build with a toolkit and ``gpus`` GPUs; returns (result, stderr)."""
    from torch.utils import cpp_extension

    home = tmp_path / "cuda"
    (home / "include").mkdir(parents=True, exist_ok=True)
    (home / "include" / "cuda_runtime_api.h").write_text("")
    _cuda_torch(monkeypatch, home, gpus)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.setattr(_loader, "_sources_dir", _loader.sources_dir())
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    return _loader._load_jit()


def test_jit_build_without_a_gpu_names_the_architectures(monkeypatch, tmp_path, capfd):
    seen = {}

    def fake_load(**kwargs):
        seen["arch"] = os.environ.get("TORCH_CUDA_ARCH_LIST")
        seen["with_cuda"] = kwargs["with_cuda"]
        return "/built/fused_lstm_jit.so"

    assert _jit_load_with(monkeypatch, tmp_path, fake_load) == "/built/fused_lstm_jit.so"
    assert seen == {"arch": _loader.DEFAULT_CUDA_ARCH_LIST, "with_cuda": True}
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ  # set for the build only
    assert f"no GPU visible: for the CUDA architectures {_loader.DEFAULT_CUDA_ARCH_LIST}" in (
        capfd.readouterr().err)
    _jit_load_with(monkeypatch, tmp_path, fake_load, gpus=1)
    assert seen["arch"] is None  # torch compiles for the visible GPU


@pytest.mark.parametrize("raised, ninja, says", [
    (IndexError("list index out of range"), True, "failed outside the compiler"),
    (RuntimeError("Error building extension 'fused_lstm_jit'"), True, "compiler reported errors"),
    (RuntimeError("Ninja is required to load C++ extensions"), False, "'ninja' build tool"),
], ids=["torch-internal", "compile-error", "no-ninja"])
def test_jit_failure_says_what_failed(monkeypatch, tmp_path, raised, ninja, says):
    from torch.utils import cpp_extension

    def fake_load(**kwargs):
        raise raised

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: ninja)
    with pytest.raises(ImportError) as caught:
        _jit_load_with(monkeypatch, tmp_path, fake_load, gpus=1)
    message = str(caught.value)
    assert says in message
    assert f"{type(raised).__name__}: {raised}" in message
    assert "FUSED_LSTM_FORCE_CUDA=0" in message  # the CUDA kernels were part of it
    assert caught.value.__cause__ is raised


def test_the_cxx_sources_are_shipped():
    src = _loader.find_sources()
    assert src is not None
    assert os.path.isfile(os.path.join(src, "lstm.cpp"))
    assert os.path.isfile(os.path.join(src, "lstm_cell.h"))
    assert any(name.endswith(".cpp") for name in os.listdir(os.path.join(src, "cpu")))
    package_dir = os.path.dirname(os.path.abspath(_loader.__file__))
    if os.path.dirname(package_dir) != REPO_ROOT:  # an installed package ships its own copy
        assert src == os.path.join(package_dir, "_csrc")


_JIT_SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    import fused_lstm.ops
    from fused_lstm import _loader

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(4, 5)
    x = torch.randn(3, 2, 4)
    weights = [w.detach() for w in lstm._flat_weights]  # w_ih [20,4], w_hh [20,5], b_ih, b_hh
    output, hy, cy, reserve = torch.ops.fused_lstm.lstm_forward(
        x, None, None, None, weights, None, 1, False, True, 0)
    with torch.no_grad():
        expected, (expected_h, expected_c) = lstm(x)
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(hy, expected_h)
    torch.testing.assert_close(cy, expected_c)
    print(json.dumps({"mode": _loader.load_mode(), "library": _loader.library_path(),
                      "sources": _loader.sources_dir(),
                      "entry": callable(getattr(_loader.python_entry(), "forward", None))}))
    """
)


@pytest.mark.slow
def test_jit_compiles_the_shipped_sources_once_and_caches_them(tmp_path):
    if not _has_cpu_kernel("lstm_forward"):
        pytest.skip("no CPU kernel yet")
    package_dir = os.path.dirname(os.path.abspath(_loader.__file__))
    env = dict(
        os.environ,
        FUSED_LSTM_FORCE_JIT="1",
        TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"),
        PYTHONPATH=os.path.dirname(package_dir),  # the same fused_lstm this process imported
    )

    def run():
        done = subprocess.run(
            [sys.executable, "-c", _JIT_SCRIPT], cwd=tmp_path, env=env, capture_output=True,
            text=True, timeout=900,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr

    first, stderr = run()
    assert first["mode"] == "jit" and first["entry"]
    assert first["library"].startswith(str(tmp_path / "extensions"))
    assert os.path.realpath(first["sources"]) == os.path.realpath(_loader.find_sources())
    compiling = [line for line in stderr.splitlines() if "fused_lstm: compiling" in line]
    assert len(compiling) == 1, stderr

    second, stderr = run()  # from the cache: no compile, same library
    assert second["library"] == first["library"]
    assert "fused_lstm: compiling" not in stderr
