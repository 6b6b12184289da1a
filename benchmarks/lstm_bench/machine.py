"""The machine the numbers depend on (CPU model and ISA, GPU, BLAS, versions, commit, date), the
results folder named after it, a test run's counts, and the fused_lstm to measure."""

from __future__ import annotations

import ctypes
import datetime
import importlib
import importlib.util
import os
import pathlib
import platform
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from typing import Optional

import torch

from .ort import onnxruntime_version


REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = REPO_ROOT / "benchmarks" / "results"

# The ISA features the CPU kernels (fused_lstm's, oneDNN's, MKL's) choose by: the name shown,
# the /proc/cpuinfo flag.
ISA_FLAGS = (("AVX2", "avx2"), ("AVX-512F", "avx512f"), ("AVX512_BF16", "avx512_bf16"),
             ("AVX512_FP16", "avx512_fp16"), ("AMX-BF16", "amx_bf16"), ("AMX-FP16", "amx_fp16"))
DTYPE_SUFFIX = {"bfloat16": "bf16", "float16": "fp16"}


def read_cpuinfo(text: Optional[str] = None) -> dict:
    """The first processor's model name, vendor, family, model, stepping and ISA features (of
    ISA_FLAGS) from /proc/cpuinfo (or ``text``); the model name falls back to
    ``platform.processor()`` and the numbers to None where the file says nothing."""
    if text is None:
        try:
            text = pathlib.Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
    fields = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())

    def number(key):
        value = fields.get(key, "")
        return int(value, 0) if value.isdigit() or value.startswith("0x") else None

    flags = set(fields.get("flags", fields.get("Features", "")).split())
    return {
        "cpu": fields.get("model name") or platform.processor() or platform.machine(),
        "cpu_vendor": fields.get("vendor_id"),
        "cpu_family": number("cpu family"),
        "cpu_model": number("model"),
        "cpu_stepping": number("stepping"),
        "isa": [name for name, flag in ISA_FLAGS if flag in flags],
    }


def blas_info() -> str:
    """The BLAS, LAPACK, MKL and oneDNN torch was built with, and the CPU capability ATen's
    kernels dispatch to, as torch reports them."""
    config = torch.__config__.show()
    parts = [f"{key}={value}" for key, value in re.findall(r"\b(BLAS_INFO|LAPACK_INFO)=([^,\s]+)",
                                                            config)]
    for line in config.splitlines():
        line = line.strip().lstrip("- ")
        if "Math Kernel Library" in line:
            parts.append(line.split("-Product")[0].replace("Intel(R) oneAPI ", ""))
        elif "MKL-DNN" in line or "oneDNN" in line:
            parts.append("oneDNN " + line.split(" v", 1)[-1].split(" (")[0]
                         if " v" in line else line)
    parts.append("mkldnn enabled" if torch.backends.mkldnn.is_available()
                 else "mkldnn not available")
    parts.append(f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}")
    return ", ".join(parts)


# glibc's M_TRIM_THRESHOLD and M_MMAP_THRESHOLD (mallopt), and what --malloc-keep sets both to.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_KEEP_BYTES = 1 << 30


def keep_malloc_memory() -> Optional[str]:
    """Sets glibc's mmap and trim thresholds to MALLOC_KEEP_BYTES (mallopt): blocks up to 1 GB
    come from the heap and freed memory stays in it, so a call that allocates what the previous
    one freed reuses its pages instead of faulting fresh ones in, as a caching allocator
    (jemalloc, tcmalloc) would. Under glibc's defaults nn.LSTM's large training buffers are fresh
    mmap'd pages on every call (benchmarks/notes/measurement.md, "The baseline's page faults").
    Returns None where set, else why not."""
    if platform.libc_ver()[0] != "glibc":
        return "the C library is not glibc"
    libc = ctypes.CDLL(None)
    if (libc.mallopt(M_MMAP_THRESHOLD, MALLOC_KEEP_BYTES) != 1
            or libc.mallopt(M_TRIM_THRESHOLD, MALLOC_KEEP_BYTES) != 1):
        return "mallopt refused the thresholds"
    return None


def malloc_info(kept: bool) -> str:
    """The C allocator the run's CPU memory came from, and its settings that change how often
    freed memory is faulted in again: glibc's thresholds, MALLOC_* and GLIBC_TUNABLES variables,
    a preloaded allocator."""
    libc, version = platform.libc_ver()
    parts = [f"{libc or 'unknown libc'} {version}".strip()]
    parts.append("mmap and trim thresholds 1 GB (--malloc-keep: freed memory reused without "
                 "page faults)" if kept else "default thresholds (large blocks freed back to "
                 "the OS: fresh pages, page faults, on the next call)")
    settings = sorted(f"{k}={v}" for k, v in os.environ.items()
                      if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES")
    if settings:
        parts.append("environment " + " ".join(settings))
    if os.environ.get("LD_PRELOAD"):
        parts.append(f"LD_PRELOAD={os.environ['LD_PRELOAD']}")
    return "; ".join(parts)


def machine_info(devices: set[str], fused_lstm, malloc_kept: bool = False) -> dict:
    """What the numbers depend on: hardware (CPU model and ISA), threads, BLAS, the C
    allocator's settings, versions, commit, date."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "device": gpu if "cuda" in devices else "cpu",
        **read_cpuinfo(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "blas": blas_info(),
        "malloc": malloc_info(malloc_kept),
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "onnxruntime": onnxruntime_version(),
        "fused_lstm": f"{fused_lstm.__version__} ({fused_lstm._loader.load_library()}: "
                      f"{fused_lstm._loader.library_path()})",
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def slug(text: str) -> str:
    """``text`` lower-cased, trademarks and non-alphanumerics dropped, words joined by ``-``."""
    text = re.sub(r"\((r|tm|c)\)", " ", text.lower())
    return "-".join(re.findall(r"[a-z0-9]+", text))


def zen_generation(family: Optional[int], model: Optional[int]) -> Optional[str]:
    """AMD's core generation from the CPUID family and model: ``zen``, ``zen2``, ``zen3``,
    ``zen4``, ``zen5``; None for other families."""
    if family == 0x17:
        return "zen2" if model is not None and model >= 0x30 else "zen"
    if family == 0x19:
        zen4 = model is not None and (0x10 <= model <= 0x1F or 0x60 <= model <= 0xAF)
        return "zen4" if zen4 else "zen3"
    if family == 0x1A:
        return "zen5"
    return None


def cpu_slug(machine: dict) -> str:
    """The CPU in a folder name: its product line and what tells it apart, e.g. ``xeon-amx``
    (Intel: AMX-FP16, AMX-BF16, AVX-512 or AVX2, the most recent it has) or ``epyc-zen4``
    (AMD: the Zen generation of the family and model numbers, else the ISA)."""
    name, vendor, isa = machine["cpu"].lower(), machine.get("cpu_vendor") or "", machine["isa"]
    isa_tag = ("amx-fp16" if "AMX-FP16" in isa else "amx" if "AMX-BF16" in isa
               else "avx512" if "AVX-512F" in isa else "avx2" if "AVX2" in isa else None)
    if vendor == "GenuineIntel" or "intel" in name:
        line = next((w for w in ("xeon", "core", "atom") if w in name), "intel")
        tag = isa_tag
    elif vendor == "AuthenticAMD" or "amd" in name:
        line = next((w for w in ("epyc", "threadripper", "ryzen") if w in name), "amd")
        tag = zen_generation(machine.get("cpu_family"), machine.get("cpu_model")) or isa_tag
    else:
        line, tag = slug(machine["cpu"]) or "unknown", None
    return line if tag is None else f"{line}-{tag}"


def results_folder_name(machine: dict, dtype: Optional[str], date: str) -> str:
    """``<device>-<cpu or gpu model>-<date>[-<dtype>]``: ``cpu-xeon-amx-2026-12-05``,
    ``cpu-epyc-zen4-2026-11-22-bf16``, ``gpu-h100-2026-12-06``. ``machine`` as
    machine_info gives it (a run with a GPU is named after the GPU), ``dtype`` the run's
    (None or float32: no suffix), ``date`` ``YYYY-MM-DD``."""
    if machine["device"] == "cpu":
        head = f"cpu-{cpu_slug(machine)}"
    else:  # the GPU's model number, as benchmarks/gpu_check/check.py names its folder
        match = re.search(r"\b([A-Z]+\d+[A-Za-z]*)\b", machine["device"])
        head = "gpu-" + (match.group(1).lower() if match else slug(machine["device"]))
    suffix = DTYPE_SUFFIX.get(dtype or "float32", "" if dtype == "float32" else dtype)
    return f"{head}-{date}" + (f"-{suffix}" if suffix else "")


def git_commit() -> str:
    """This checkout's commit, ``+modified`` when tracked files differ from it; ``unknown``
    outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True,
                              text=True, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        return commit + ("+modified" if git("status", "--porcelain", "--untracked-files=no")
                         else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def read_junit(path: str) -> dict[str, int]:
    """Test counts from a JUnit XML file (``pytest --junitxml=FILE``)."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.iter("testsuite")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    failed = counts["failures"] + counts["errors"]
    return {"passed": counts["tests"] - failed - counts["skipped"], "failed": failed,
            "skipped": counts["skipped"]}


def import_fused_lstm():
    """The installed fused_lstm, or else this checkout's (compiled on first import)."""
    if importlib.util.find_spec("fused_lstm") is None:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module("fused_lstm")
