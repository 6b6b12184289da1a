"""The Python half of benchmarks/gpu_check.sh: the machine's probes, the results, dry-run stubs.

    python check.py probe WORK          # WORK/machine.json and WORK/machine.env (for the shell)
    python check.py summarize WORK OUT  # OUT/results.json and OUT/summary.txt, from WORK
    python check.py stub STEP WORK      # GPU_CHECK_DRY_RUN: what STEP would leave in WORK

gpu_check.sh runs ``summarize`` after every step, so ``OUT`` always describes the steps done so
far. The files it reads in WORK (the shell writes them, and ``stub`` imitates them):

* ``steps.tsv``: one line per step run: name, status, exit code, seconds, limit, note;
* ``machine.json``: what ``probe`` found;
* ``logs/<step>.log``: each step's output;
* ``junit_<step>.xml`` and ``pytest_<step>.json`` (pytest_deadline.py's state) for test steps;
* ``bench/``: compare.py's files.

Nothing here imports torch except ``probe``: ``summarize`` must take well under a second.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree

def write_atomically(path: str, text: str) -> None:
    """Writes ``text`` to a temporary name beside ``path``, then renames it: a kill leaves the
    old file or the new one, never a truncated one."""
    partial = path + ".partial"
    with open(partial, "w") as f:
        f.write(text)
    os.replace(partial, path)


def read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def run(command: list[str], timeout: float = 15) -> str:
    """A probe command's output (stdout and stderr), or what went wrong."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"({error})"
    return (done.stdout + done.stderr).strip()


# --- probe -----------------------------------------------------------------------------------


def find_cuda_home() -> str | None:
    """A directory with the CUDA toolkit's headers: CUDA_HOME or CUDA_PATH if they hold them,
    else /usr/local/cuda, else where nvcc says it lives (``nvcc -dryrun`` prints its real
    folder, also through a wrapper script), else the folder above the resolved nvcc."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        dryrun = run([nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull])
        here = re.search(r"^#\$ _HERE_=(.+)$", dryrun, re.MULTILINE)
        if here:
            candidates.append(os.path.dirname(here.group(1).strip()))
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    return None


def find_sanitizer(cuda_home: str | None) -> str | None:
    found = shutil.which("compute-sanitizer")
    if found is None and cuda_home is not None:
        candidate = os.path.join(cuda_home, "bin", "compute-sanitizer")
        found = candidate if os.access(candidate, os.X_OK) else None
    return found


def module_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def torch_facts() -> dict:
    try:
        import torch
    except Exception as error:  # noqa: BLE001 -- recorded, the other probes still run
        return {"error": repr(error)}
    facts = {"version": torch.__version__, "cuda": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version(), "gpu_available": torch.cuda.is_available(),
             "device_count": torch.cuda.device_count()}
    if facts["gpu_available"]:
        props = torch.cuda.get_device_properties(0)
        facts.update(device=props.name, capability="%d.%d" % (props.major, props.minor),
                     multiprocessors=props.multi_processor_count,
                     memory_gib=round(props.total_memory / 2**30, 1))
    return facts


def gpu_model(name: str | None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100', for the results folder's name."""
    match = re.search(r"\b([A-Z]+\d+[A-Za-z]*)\b", name or "")
    return match.group(1).lower() if match else "unknown"


def probe(work: str) -> int:
    """Written twice: without torch's facts first (importing torch and starting CUDA is the
    slow part), so that a probe cut short still leaves the rest."""
    cuda_home = find_cuda_home()
    sanitizer = find_sanitizer(cuda_home)
    nvcc = shutil.which("nvcc") or (cuda_home and os.path.join(cuda_home, "bin", "nvcc"))
    facts = {
        "gpus": run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                     "--format=csv,noheader"]).splitlines(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "torch": {"error": "not probed (the probe was cut short?)"},
        "nvcc": (re.findall(r"release [\d.]+, V[\d.]+", run([nvcc, "--version"])) or [None])[0]
        if nvcc else None,
        "cuda_home": cuda_home,
        "compute_sanitizer": sanitizer,
        "compute_sanitizer_version": run([sanitizer, "--version"]).splitlines()[-1:]
        if sanitizer else None,
        "build_tools": {name: module_version(name)
                        for name in ("setuptools", "wheel", "ninja", "pytest", "numpy")},
        "ninja_binary": shutil.which("ninja"),
        "cpus": os.cpu_count(),
        "disk_free_gib": round(shutil.disk_usage(work).free / 2**30, 1),
        "date": datetime.date.today().isoformat(),
    }
    write_machine(work, facts)
    facts["torch"] = torch_facts()
    print(json.dumps(facts, indent=2))
    return write_machine(work, facts)


def write_machine(work: str, facts: dict) -> int:
    """machine.json, and machine.env with what the shell needs from it."""
    torch_info = facts["torch"]
    missing_tools = [name for name in ("setuptools", "wheel", "ninja")
                     if not facts["build_tools"].get(name)]
    shell = {
        "PROBED_CUDA_HOME": facts["cuda_home"] or "",
        "PROBED_SANITIZER": facts["compute_sanitizer"] or "",
        # unknown where torch was not probed: only a "no" skips the steps that need a GPU
        "PROBED_HAS_GPU": {True: "1", False: "0"}.get(torch_info.get("gpu_available"),
                                                     "unknown"),
        "PROBED_CAPABILITY": torch_info.get("capability", ""),
        "PROBED_MISSING_BUILD_TOOLS": " ".join(missing_tools),
    }
    write_atomically(os.path.join(work, "machine.json"), json.dumps(facts, indent=2) + "\n")
    write_atomically(os.path.join(work, "machine.env"),
                     "".join(f"{k}={shlex.quote(v)}\n" for k, v in shell.items()))
    return 0


# --- summarize -------------------------------------------------------------------------------


NOT_RUN = "not run"


def read_steps(work: str) -> dict:
    steps = {}
    for line in read(os.path.join(work, "steps.tsv")).splitlines():
        name, status, code, seconds, limit, note = (line.split("\t") + [""] * 6)[:6]
        steps[name] = {"status": status, "exit": int(code) if code.lstrip("-").isdigit() else None,
                       "seconds": int(seconds or 0), "limit": int(limit or 0), "note": note}
    return steps


def test_counts(work: str, name: str) -> dict | None:
    """Counts of a test step's JUnit XML and pytest_deadline.py's state, or None (no such)."""
    junit = os.path.join(work, f"junit_{name}.xml")
    state_text = read(os.path.join(work, f"pytest_{name}.json"))
    if not os.path.exists(junit) and not state_text:
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [],
              "skip_reasons": {}}
    try:
        for case in ElementTree.parse(junit).iter("testcase"):
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed", "error": "errors",
                               "skipped": "skipped"}[child.tag]
                    if child.tag == "skipped":
                        reason = (child.get("message") or "")[:120]
                        counts["skip_reasons"][reason] = counts["skip_reasons"].get(reason, 0) + 1
            counts[outcome] += 1
            if outcome in ("failed", "errors"):
                counts["failures"].append(f"{case.get('classname')}::{case.get('name')}")
    except (OSError, ElementTree.ParseError) as error:
        counts["junit_error"] = repr(error)
    if state_text:
        try:
            counts.update(json.loads(state_text))
        except ValueError as error:
            counts["state_error"] = repr(error)
    return counts


def sanitizer_result(work: str, name: str, step: dict) -> dict:
    log = read(os.path.join(work, "logs", f"{name}.log"))
    # memcheck and synccheck end with "ERROR SUMMARY: N errors"; racecheck with "RACECHECK
    # SUMMARY: N hazards displayed (E errors, W warnings)" and maybe an ERROR SUMMARY too.
    summary = (re.search(r"ERROR SUMMARY: (\d+) error", log)
               or re.search(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error", log))
    hazards = re.search(r"RACECHECK SUMMARY: (\d+) hazard", log)
    case_ran = "sanitize_case: ok" in log
    return {"errors": int(summary.group(1)) if summary else None,
            "hazards": int(hazards.group(1)) if hazards else None, "case_ran": case_ran,
            "status": step["status"]}


def summarize(work: str, out: str) -> int:
    steps = read_steps(work)
    try:
        machine = json.loads(read(os.path.join(work, "machine.json")) or "{}")
    except ValueError:
        machine = {}
    torch_info = machine.get("torch", {})
    tests = {n: c for n in steps if n.startswith("tests_") and (c := test_counts(work, n))}
    sanitizers = {n: sanitizer_result(work, n, s) for n, s in steps.items()
                  if n.startswith("sanitizer_") and s["status"] not in ("skipped", "unavailable")}
    bench_files = sorted(os.listdir(os.path.join(work, "bench"))) \
        if os.path.isdir(os.path.join(work, "bench")) else []
    commit = os.environ.get("GPU_CHECK_COMMIT", "unknown")
    date = machine.get("date") or datetime.date.today().isoformat()
    # The steps chosen but not (yet) run: a run cut short says what it never reached.
    for name in os.environ.get("GPU_CHECK_SELECTED", "").split():
        steps.setdefault(name, {"status": NOT_RUN, "exit": None, "seconds": 0, "limit": 0,
                                "note": ""})
    failed = [n for n, s in steps.items() if s["status"] in ("failed", "timeout", "killed")]
    not_run = [n for n, s in steps.items() if s["status"] == NOT_RUN]
    incomplete = [n for n, s in steps.items()
                  if s["status"] != "passed" and n not in failed + not_run]
    result = {
        "commit": commit,
        "dry_run": os.environ.get("GPU_CHECK_DRY_RUN", "") not in ("", "0"),
        "written_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "elapsed_seconds": int(os.environ.get("GPU_CHECK_ELAPSED", "0")),
        "machine": machine,
        "steps": steps,
        "tests": tests,
        "sanitizers": sanitizers,
        "bench_files": bench_files,
        "failed_steps": failed,
        "not_run_steps": not_run,
        "incomplete_steps": incomplete,  # skipped, unavailable, or tests stopped at the deadline
        "ok": bool(steps) and not failed and not not_run,
        "results_folder": f"benchmarks/results/gpu-{gpu_model(torch_info.get('device'))}-{date}",
    }
    write_atomically(os.path.join(out, "results.json"), json.dumps(result, indent=2) + "\n")
    lines = [
        "gpu_check: " + ("no step failed" if result["ok"] else "NOT OK: " + ", ".join(
            f"{n} {steps[n]['status']}" for n in failed + not_run))
        + (" (DRY RUN: stub commands)" if result["dry_run"] else ""),
        f"commit {commit}; {torch_info.get('device')} (capability "
        f"{torch_info.get('capability')}); torch {torch_info.get('version')} CUDA "
        f"{torch_info.get('cuda')}; nvcc {machine.get('nvcc')}; kernel {machine.get('kernel')}",
        *(["not run to the end: " + ", ".join(f"{n} {steps[n]['status']}" for n in incomplete)]
          if incomplete else []),
        f"results folder to commit: {result['results_folder']}",
        "steps:",
        *[f"  {n:32} {s['status']:11} exit {'-' if s['exit'] is None else s['exit']:>3}  "
          f"{s['seconds']:4} s of {s['limit']:4} s"
          + (f"  ({s['note']})" if s["note"] else "") for n, s in steps.items()],
    ]
    for name, c in tests.items():
        lines.append(f"{name}: {c['passed']} passed, {c['failed']} failed, {c['errors']} errors,"
                     f" {c['skipped']} skipped; collected {c.get('collected', '?')}"
                     + (", STOPPED AT THE DEADLINE" if c.get("stopped_at_deadline") else ""))
        if steps[name]["status"] in ("timeout", "killed") and c.get("last_started"):
            lines.append(f"  killed while running {c['last_started']}")
        lines += [f"  FAILED {f}" for f in c["failures"][:20]]
        lines += [f"  skipped {n}: {r}" for r, n in list(c["skip_reasons"].items())[:5]]
    for name, s in sanitizers.items():
        lines.append(f"{name}: {s['status']}, errors {s['errors']}, hazards {s['hazards']}, "
                     f"case ran {s['case_ran']}")
    if bench_files:
        lines.append("bench: " + ", ".join(bench_files))
    write_atomically(os.path.join(out, "summary.txt"), "\n".join(lines) + "\n")
    return 0


# --- dry run ---------------------------------------------------------------------------------


def stub(step: str, work: str) -> int:
    """What ``step`` leaves in ``work``, without a GPU, for GPU_CHECK_DRY_RUN: the plumbing of
    gpu_check.sh (time limits, the results, $OUT after every step) runs for real around it.

    ``GPU_CHECK_DRY_RUN_SLEEP``: seconds each stub takes (default 0.2);
    ``GPU_CHECK_DRY_RUN_FAIL``: names of steps whose stub fails (a test step with one failed
    test); ``GPU_CHECK_DRY_RUN_NO_SANITIZER=1``: compute-sanitizer refuses the device;
    ``GPU_CHECK_DRY_RUN_LOG_BYTES``: that many bytes of output (random: they do not compress).
    """
    failing = step in os.environ.get("GPU_CHECK_DRY_RUN_FAIL", "").split()
    print(f"[dry run] {step}: stub command")
    if step == "probes" and failing:  # as if cut short before it wrote anything
        return 1
    if step == "probes":
        write_machine(work, {
            "gpus": ["DRY-RUN GPU, 0 MiB, 0.0"], "kernel": platform.release(),
            "python": sys.version.split()[0],
            "torch": {"version": "dry-run", "cuda": "13.0", "gpu_available": True,
                      "device": "NVIDIA H100 80GB HBM3", "capability": "9.0"},
            "nvcc": None, "cuda_home": "/dry-run/cuda", "compute_sanitizer": "/dry-run/sanitizer",
            "build_tools": {"setuptools": "dry-run", "wheel": "dry-run", "ninja": "dry-run"},
            "date": datetime.date.today().isoformat()})
    elif step.startswith("tests_"):
        cases = "".join(f'<testcase classname="tests.test_cuda" name="test_stub_{i}" time="0.1"/>'
                        for i in range(3))
        if failing:
            cases += ('<testcase classname="tests.test_cuda" name="test_stub_fails">'
                      '<failure message="dry run">dry run</failure></testcase>')
        write_atomically(os.path.join(work, f"junit_{step}.xml"),
                         f'<testsuites><testsuite name="pytest">{cases}'
                         "</testsuite></testsuites>\n")
        write_atomically(os.path.join(work, f"pytest_{step}.json"), json.dumps(
            {"collected": 3 + failing, "started": 3 + failing, "stopped_at_deadline": False}))
    elif step.startswith("sanitizer_"):
        if os.environ.get("GPU_CHECK_DRY_RUN_NO_SANITIZER", "") not in ("", "0"):
            print("========= Error: Device not supported\n"
                  "RuntimeError: CUDA error: unknown error (error 999)")
            return 1
        print("sanitize_case: ok (dry run)\n"
              f"========= ERROR SUMMARY: {int(failing)} error{'' if failing else 's'}")
        failing = failing and 99
    elif step == "bench":
        bench = os.path.join(work, "bench")
        os.makedirs(bench, exist_ok=True)
        write_atomically(os.path.join(bench, "results.json"), "{}\n")
        write_atomically(os.path.join(bench, "results.md"), "| dry run |\n")
    print(os.urandom(int(os.environ.get("GPU_CHECK_DRY_RUN_LOG_BYTES", "0")) // 2).hex())
    sys.stdout.flush()
    time.sleep(float(os.environ.get("GPU_CHECK_DRY_RUN_SLEEP", "0.2")))
    return int(failing)


def main(argv: list[str]) -> int:
    commands = {"probe": (probe, 1), "summarize": (summarize, 2), "stub": (stub, 2)}
    if not argv or argv[0] not in commands or len(argv) != commands[argv[0]][1] + 1:
        sys.exit(__doc__.split("\n\n")[1])
    function, _ = commands[argv[0]]
    return function(*argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
