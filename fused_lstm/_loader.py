"""Loads the compiled fused_lstm library, so that ``torch.ops.fused_lstm.*`` exist.

The library registers its ops when it is loaded (``TORCH_LIBRARY`` static initialisers), so it is
loaded with ``torch.ops.load_library``; it is also a Python extension module whose one function
(``forward``, csrc/python_entry.cpp) is FusedLSTM's plain call without ``torch.ops``' boxing,
imported from the same file afterwards (:func:`python_entry`). Two ways to get it:

* ``"aot"``: compiled ahead of time by setup.py when torch was importable while building
  (``pip install --no-build-isolation .``, ``python setup.py build_ext --inplace``), found next
  to this file as ``_C<python extension suffix>``. ``_build_info.py``, written by the same build,
  says which torch it was compiled against; a library compiled for another torch is refused
  with an ImportError that says how to rebuild, instead of an undefined-symbol crash (or worse,
  a silent ABI mismatch).
* ``"jit"``: no such library (plain ``pip install .`` builds without torch, in pip's isolated
  environment), or ``FUSED_LSTM_FORCE_JIT=1``: the shipped sources (``fused_lstm/_csrc`` when
  installed, ``csrc/`` in a source checkout) are compiled with
  ``torch.utils.cpp_extension.load`` on first import, against the running torch, and cached in
  a directory keyed by torch version, CUDA-ness, Python version and source location, so a torch
  upgrade never loads a stale library. The first import prints one line to stderr and takes
  up to a minute; later imports load the cached library.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import importlib.machinery
import importlib.util
import os
import contextlib
import re
import shutil
import sys
import threading
import warnings
from typing import Iterator, List, Optional

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_LOCK = threading.Lock()
_load_mode: Optional[str] = None
_library_path: Optional[str] = None
_python_entry = None
_sources_dir: Optional[str] = None

JIT_NAME = "fused_lstm_jit"
# The CUDA architectures compiled for when nothing says otherwise: by setup.py always, and by the
# JIT build when no GPU is visible (torch would otherwise pick the visible GPUs' own).
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"

REBUILD_HINT = (
    "Rebuild it for the torch you run: from the fused_lstm source directory, "
    "'pip install --no-build-isolation --no-deps --force-reinstall .' "
    "(for a checkout: 'python setup.py build_ext --inplace'); "
    "or set FUSED_LSTM_FORCE_JIT=1 to compile the shipped sources on import instead."
)


def load_library() -> str:
    """Loads the library once per process; returns how it was loaded: ``"aot"`` or ``"jit"``.

    Raises ImportError, with what to do, when no usable library can be loaded.
    """
    global _load_mode, _library_path
    with _LOCK:
        if _load_mode is not None:
            return _load_mode
        aot_path = None if _force_jit() else find_aot_library()
        if aot_path is not None:
            check_build_info(read_build_info(), aot_path)
            _warn_if_stale(aot_path)
            _load_so(aot_path)
            _library_path, _load_mode = aot_path, "aot"
            _import_python_entry("fused_lstm._C", aot_path)
        else:
            _library_path = _load_jit()
            _load_mode = "jit"
            _import_python_entry(JIT_NAME, _library_path)
        return _load_mode


def python_entry():
    """The loaded library as a Python module (its ``forward`` function), or None when it could
    not be imported as one (FusedLSTM then makes every call through ``torch.ops``)."""
    return _python_entry


def _import_python_entry(name: str, path: str) -> None:
    """Imports the already loaded library as the extension module ``name`` (its init function is
    ``PyInit_<last part of name>``, the name the build gave it)."""
    global _python_entry
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    try:
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    except ImportError as error:  # e.g. built without TORCH_EXTENSION_NAME: no module init
        warnings.warn(
            f"fused_lstm: {path} has no Python entry point ({error}); FusedLSTM calls the op "
            "through torch.ops instead (slower at small sizes).",
            stacklevel=3,
        )
        return
    _python_entry = module


def load_mode() -> Optional[str]:
    """``"aot"``, ``"jit"``, or None before :func:`load_library` ran."""
    return _load_mode


def library_path() -> Optional[str]:
    """The path of the loaded shared library, or None before :func:`load_library` ran."""
    return _library_path


def sources_dir() -> Optional[str]:
    """Where the JIT path found the C++ sources (None when the AOT library was loaded)."""
    return _sources_dir


def _force_jit() -> bool:
    return os.environ.get("FUSED_LSTM_FORCE_JIT", "0") not in ("", "0")


# --- ahead of time ---------------------------------------------------------------------------


def find_aot_library(package_dir: str = _PACKAGE_DIR) -> Optional[str]:
    """``_C`` with this Python's extension suffix, next to this file (installed or in place)."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(package_dir, "_C" + suffix)
        if os.path.isfile(path):
            return path
    return None


def read_build_info(package_dir: str = _PACKAGE_DIR) -> Optional[dict]:
    """What setup.py recorded about the AOT build (``BUILD_INFO`` in ``_build_info.py``), or None.

    Read as a literal rather than imported: nothing cached (no stale .pyc) stands between the
    file and the check.
    """
    path = os.path.join(package_dir, "_build_info.py")
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
    except OSError:
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "BUILD_INFO" for t in node.targets
        ):
            return dict(ast.literal_eval(node.value))
    return None


def running_torch_info() -> dict:
    """The fields of the running torch that a compiled library must match."""
    return {
        "torch_version": torch.__version__,
        "torch_git_version": torch.version.git_version,
        "torch_cuda_version": torch.version.cuda,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    }


def check_build_info(info: Optional[dict], library: str = "the fused_lstm library") -> None:
    """Raises ImportError when ``info`` (a ``BUILD_INFO``) does not match the running torch.

    A library without a record (built by hand) is let through: there is nothing to check.
    """
    if not info:
        return
    running = running_torch_info()
    differences = [
        f"{key} {info.get(key)!r} (running: {value!r})"
        for key, value in running.items()
        if key in info and info[key] != value
    ]
    if differences:
        raise ImportError(
            f"fused_lstm: {library} was compiled for torch {info.get('torch_version')}, but torch "
            f"{torch.__version__} is running ({'; '.join(differences)}). Loading it would crash "
            f"with undefined symbols or misbehave. {REBUILD_HINT}"
        )


def _warn_if_stale(path: str) -> None:
    """An in-place build in a source checkout that is older than the checkout's sources."""
    checkout_sources = os.path.join(os.path.dirname(_PACKAGE_DIR), "csrc")
    if not os.path.isdir(checkout_sources):
        return
    sources = [
        p for p in glob.glob(os.path.join(checkout_sources, "**", "*"), recursive=True)
        if p.endswith((".h", ".cuh", ".cpp", ".cu"))
    ]
    if sources and max(os.path.getmtime(p) for p in sources) > os.path.getmtime(path):
        warnings.warn(
            f"fused_lstm: the in-place library {path} is older than the sources in "
            f"{checkout_sources}; rebuild it with 'python setup.py build_ext --inplace' (or "
            "delete it to compile on import)",
            stacklevel=3,
        )


def _load_so(path: str) -> None:
    try:
        torch.ops.load_library(path)
    except OSError as error:
        raise ImportError(
            f"fused_lstm: could not load the compiled library {path}: {error}. {REBUILD_HINT}"
        ) from error


# --- just in time ----------------------------------------------------------------------------


def find_sources(package_dir: str = _PACKAGE_DIR) -> Optional[str]:
    """The C++ sources: shipped in the package (``_csrc``), or ``../csrc`` in a source checkout."""
    for candidate in (
        os.path.join(package_dir, "_csrc"),
        os.path.join(os.path.dirname(package_dir), "csrc"),
    ):
        if os.path.isfile(os.path.join(candidate, "lstm.cpp")):
            return candidate
    return None


def _jit_sources(src: str, with_cuda: bool) -> list:
    sources = sorted(glob.glob(os.path.join(src, "*.cpp"))) + sorted(
        glob.glob(os.path.join(src, "cpu", "*.cpp"))
    )
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(src, "cuda", "*.cu")))
    return sources


def cuda_toolkit_problem(cuda_home: Optional[str]) -> Optional[str]:
    """Why ``cuda_home`` (torch's ``CUDA_HOME``) cannot compile the CUDA kernels, or None.

    torch takes ``CUDA_HOME`` from the environment, else from the ``nvcc`` on PATH (its parent
    directory's parent), else ``/usr/local/cuda``, and checks nothing: an ``nvcc`` that is a
    wrapper script outside the toolkit (``/usr/local/bin/nvcc``) gives ``/usr/local``, and the
    build then fails at the link (``cannot find -lcudart``). The toolkit's runtime header is
    what the compile and the link both need.
    """
    advice = "set CUDA_HOME to the CUDA toolkit's directory, e.g. /usr/local/cuda"
    if cuda_home is None:
        return f"nvcc and the CUDA toolkit ({advice})"
    header = os.path.join(cuda_home, "include", "cuda_runtime_api.h")
    if os.path.isfile(header):
        return None
    origin = ""
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        nvcc = shutil.which("nvcc")
        if nvcc is not None:
            origin = f"; torch took it from the nvcc on PATH, {nvcc}, which is not in a toolkit"
    return (f"a CUDA toolkit at CUDA_HOME={cuda_home} (it has no include/cuda_runtime_api.h"
            f"{origin}; {advice})")


def cuda_kernels_missing(src: str) -> List[str]:
    """What the CUDA kernels in ``src`` need and is missing here (empty: they can be compiled).

    Decided by the torch build (``torch.version.cuda``) and the CUDA toolkit (``CUDA_HOME``,
    :func:`cuda_toolkit_problem`), never by whether a GPU is present: a build box often has none.
    """
    from torch.utils import cpp_extension

    missing = []
    if torch.version.cuda is None:
        missing.append(f"a torch built with CUDA (this is {torch.__version__})")
    else:  # (torch looks for nvcc only when it was built with CUDA)
        problem = cuda_toolkit_problem(cpp_extension.CUDA_HOME)
        if problem is not None:
            missing.append(problem)
    if not glob.glob(os.path.join(src, "cuda", "*.cu")):
        missing.append(f"CUDA sources in {os.path.join(src, 'cuda')}")
    return missing


def want_cuda_kernels(src: str, error: type = ImportError) -> bool:
    """Whether to compile the CUDA sources in ``src``; setup.py asks the same question.

    Yes when nothing is missing (:func:`cuda_kernels_missing`). ``FUSED_LSTM_FORCE_CUDA=1``
    makes a missing piece an ``error``, ``=0`` never compiles them.
    """
    force = os.environ.get("FUSED_LSTM_FORCE_CUDA")
    if force == "0":
        return False
    missing = cuda_kernels_missing(src)
    if force == "1" and missing:
        raise error(
            "fused_lstm: FUSED_LSTM_FORCE_CUDA=1 but the CUDA kernels cannot be compiled; "
            "missing: " + "; ".join(missing)
        )
    return not missing


def cpu_only_note(src: str) -> Optional[str]:
    """Why a torch built with CUDA gets the CPU kernels only, or None where that is no news (a
    CPU torch, or ``FUSED_LSTM_FORCE_CUDA=0``)."""
    if torch.version.cuda is None or os.environ.get("FUSED_LSTM_FORCE_CUDA") == "0":
        return None
    missing = cuda_kernels_missing(src)
    return "the CUDA kernels need " + "; ".join(missing) if missing else None


def jit_cuda_arch_list(with_cuda: bool) -> Optional[str]:
    """The CUDA architectures the JIT build must name itself, or None to leave them to torch.

    Unless ``TORCH_CUDA_ARCH_LIST`` names them, torch compiles for the visible GPUs; with none
    visible (a build box with nvcc and no GPU) its detection fails (an ``IndexError`` in
    ``torch.utils.cpp_extension``, torch 2.11 to 2.15). Then the ahead-of-time build's list,
    :data:`DEFAULT_CUDA_ARCH_LIST`.
    """
    if not with_cuda:
        return None
    named = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if named and named != "native":
        return None
    if torch.cuda.device_count() > 0:
        return None
    return DEFAULT_CUDA_ARCH_LIST


@contextlib.contextmanager
def _environment_variable(name: str, value: Optional[str]) -> Iterator[None]:
    """``name=value`` in the environment for the block (nothing changed when value is None)."""
    if value is None:
        yield
        return
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def jit_failure_message(error: BaseException, src: str, build_directory: str,
                        with_cuda: bool) -> str:
    """What to tell the user when ``torch.utils.cpp_extension.load`` raised ``error``: which
    piece failed, as far as can be told, and the error itself."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if not cpp_extension.is_ninja_available():
        cause = "the 'ninja' build tool is missing ('pip install ninja')"
    elif shutil.which(compiler) is None:
        cause = f"no C++ compiler: '{compiler}' is not on PATH (set CXX to one)"
    elif "Error building extension" in str(error):
        cause = (f"the compiler reported errors (its output is above; the build files are in "
                 f"{build_directory})")
    else:
        cause = "torch.utils.cpp_extension.load failed outside the compiler"
    if with_cuda:
        cause += (". The CUDA kernels were being compiled too: FUSED_LSTM_FORCE_CUDA=0 compiles "
                  "the C++ kernels only, and TORCH_CUDA_ARCH_LIST (e.g. '9.0') names the GPU "
                  "architectures")
    return (f"fused_lstm: compiling the C++ sources in {src} failed: {cause}. "
            f"{type(error).__name__}: {error}")


def compile_flags(with_cuda: bool) -> dict:
    """Compiler and linker flags, the same for the AOT build (setup.py) and the JIT one.

    ``-DNDEBUG`` because the JIT build gets none from Python's sysconfig (debug-only asserts
    would otherwise run there). ``-fopenmp`` because at::parallel_for's ``#pragma omp
    parallel`` is a header template compiled into THIS library: without it, it runs on one
    thread. The linked libgomp.so.1 resolves to the copy torch has already loaded.
    ``-fno-trapping-math -fno-math-errno``, as torch itself is compiled: they change no computed
    value (NaN and inf behave as before) but let GCC vectorise the CPU cell loops, whose
    clamps it otherwise keeps as branches (csrc/cpu/fast_math.h).
    """
    openmp = (
        ["-fopenmp"]
        if sys.platform.startswith("linux") and torch.backends.openmp.is_available()
        else []
    )
    defines = ["-DFUSED_LSTM_WITH_CUDA=1"] if with_cuda else []
    return {
        "cxx": ["-O3", "-DNDEBUG", "-fno-trapping-math", "-fno-math-errno"] + openmp + defines,
        "nvcc": ["-O3", "-DNDEBUG", "-lineinfo"] + defines,
        "ld": openmp,
    }


def jit_build_directory(src: str, with_cuda: bool) -> str:
    """The JIT cache directory for these sources and this torch.

    Under ``TORCH_EXTENSIONS_DIR`` if set, else torch's default extensions root; keyed by the
    torch version (which includes its CUDA/CPU tag), the torch git version, whether CUDA kernels
    are compiled, the Python version and the source directory, so a different torch, or another
    install of fused_lstm, never picks up a library built for something else.
    """
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    accelerator = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    identity = "\n".join(
        [os.path.realpath(src), str(torch.version.git_version), str(with_cuda)]
    ).encode()
    key = "torch{}-{}-{}-py{}{}-{}".format(
        torch.__version__,
        accelerator,
        "cudakernels" if with_cuda else "cpukernels",
        sys.version_info[0],
        sys.version_info[1],
        hashlib.sha256(identity).hexdigest()[:10],
    )
    key = re.sub(r"[^A-Za-z0-9._+-]", "_", key)
    return os.path.join(root, "fused_lstm", key)


def _needs_compile(library: str, sources: list, src: str) -> bool:
    if not os.path.isfile(library):
        return True
    headers = glob.glob(os.path.join(src, "**", "*.h"), recursive=True) + glob.glob(
        os.path.join(src, "**", "*.cuh"), recursive=True
    )
    newest = max(os.path.getmtime(p) for p in sources + headers)
    return newest > os.path.getmtime(library)


def _load_jit() -> str:
    global _sources_dir
    src = find_sources()
    if src is None:
        raise ImportError(
            "fused_lstm: no compiled library and no C++ sources to compile: the package is "
            f"incomplete ({_PACKAGE_DIR}). Reinstall it: 'pip install --no-build-isolation "
            "--no-deps --force-reinstall .' from the fused_lstm source directory."
        )
    from torch.utils import cpp_extension

    with_cuda = want_cuda_kernels(src)
    sources = _jit_sources(src, with_cuda)
    build_directory = jit_build_directory(src, with_cuda)
    os.makedirs(build_directory, exist_ok=True)
    library = os.path.join(build_directory, JIT_NAME + ".so")
    arch_list = jit_cuda_arch_list(with_cuda)
    if _needs_compile(library, sources, src):
        if with_cuda:
            kernels = "C++ and CUDA kernels"
            if arch_list is not None:
                kernels += (f" (no GPU visible: for the CUDA architectures {arch_list}; set "
                            "TORCH_CUDA_ARCH_LIST to choose)")
        else:
            note = cpu_only_note(src)
            kernels = f"C++ kernels only ({note})" if note else "C++ kernels"
        print(
            f"fused_lstm: compiling the {kernels} for torch {torch.__version__} (first import "
            f"only, up to a minute) into {build_directory}",
            file=sys.stderr,
            flush=True,
        )
    flags = compile_flags(with_cuda)
    try:
        with _environment_variable("TORCH_CUDA_ARCH_LIST", arch_list):
            path = cpp_extension.load(
                name=JIT_NAME,
                sources=sources,
                extra_cflags=flags["cxx"],
                extra_cuda_cflags=flags["nvcc"],
                extra_ldflags=flags["ld"],
                extra_include_paths=[src],
                build_directory=build_directory,
                with_cuda=with_cuda,
                is_python_module=False,
                verbose=False,
            )
    except OSError as error:  # the dlopen in torch.ops.load_library
        raise ImportError(
            f"fused_lstm: could not load the library compiled in {build_directory}: {error}. "
            f"Delete that directory to recompile."
        ) from error
    except Exception as error:  # compiler or ninja missing, compile error, torch's own checks
        raise ImportError(jit_failure_message(error, src, build_directory, with_cuda)) from error
    _sources_dir = src
    return path
