"""benchmarks/gpu_check.sh, the GPU check, where no GPU is: its budgets, and its plumbing.

A GPU machine is lent rarely and for minutes, and the check must use that time and bring its
results back even when cut short. Here: the step table's budgets add up within one device call;
the script is valid bash; ``--dry-run`` runs every step's plumbing (time limits, the records,
$OUT after every step) around stub commands, also killed mid-way; the pytest plugin that ends a
test step cleanly at its deadline; and the sanitizer case's calls on the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap

import pytest

from helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
HELPERS = ROOT / "benchmarks" / "gpu_check"
# One device call: at most 10 minutes a command, and a 15-minute session that also starts the
# machine (1-2 minutes) and wants time for a second, shorter call.
ONE_CALL_S = 8 * 60
# What comes back from $OUT: at most 8 files, 2 folders down, 16 MiB each, plain names.
OUT_FILES, OUT_DEPTH, OUT_FILE_BYTES = 8, 2, 16 * 2**20
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def step_table():
    """(name, budget) of every step in the script's table, in order, and FINISH_S."""
    text = SCRIPT.read_text()
    table = text.split("STEPS='", 1)[1].split("'", 1)[0]
    steps = []
    for line in table.splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            steps.append((fields[0], int(fields[1])))
    finish = int(re.search(r"^FINISH_S=(\d+)", text, re.MULTILINE).group(1))
    return steps, finish


def load_check():
    spec = importlib.util.spec_from_file_location("gpu_check_check", HELPERS / "check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dry_run(tmp_path, *args, env=None, kill=None, sleep="0"):
    """Runs the script with --dry-run; ``kill`` = (signal, seconds) stops it that long after
    its start. Returns (completed process, $OUT)."""
    out = tmp_path / "out"
    environment = dict(os.environ, OUT=str(out), TMPDIR=str(tmp_path), PYTHON=sys.executable,
                       GPU_CHECK_DRY_RUN_SLEEP=sleep, GPU_CHECK_STATE_DIR=str(tmp_path),
                       **(env or {}))
    command = ["bash", str(SCRIPT), "--dry-run", "--commit", "0123abc", *args]
    if kill is not None:
        command = ["timeout", "-s", kill[0], str(kill[1]), *command]
    done = subprocess.run(command, env=environment, capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    return done, out


def read_out(out):
    """$OUT as the device tool brings it back: checks its limits; returns results.json, the
    archive's members (each read whole: a truncated archive fails here) and the steps."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= OUT_FILES, files
    for path in files:
        relative = path.relative_to(out)
        assert len(relative.parts) - 1 <= OUT_DEPTH, relative
        assert all(OUT_NAME.match(part) for part in relative.parts), relative
        assert path.stat().st_size <= OUT_FILE_BYTES, relative
    members = {}
    with tarfile.open(out / "gpu_check.tar.gz") as archive:
        for member in archive.getmembers():
            if member.isfile():
                members[member.name.removeprefix("./")] = archive.extractfile(member).read()
    results = json.loads((out / "results.json").read_text())
    steps = [line.split("\t") for line in members["steps.tsv"].decode().splitlines()]
    return results, members, steps


def test_script_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_budgets_add_up_within_one_device_call():
    steps, finish = step_table()
    names = [name for name, _ in steps]
    assert names[:3] == ["probes", "install", "tests_auto"]
    assert names[-1] == "bench"
    assert len(set(names)) == len(names)
    for tool in ("memcheck", "racecheck", "synccheck"):
        assert f"sanitizer_{tool}_persistent" in names
    assert "sanitizer_memcheck_step" in names
    assert all(budget > 0 for _, budget in steps)
    total = sum(budget for _, budget in steps) + finish
    assert total <= ONE_CALL_S
    listed = subprocess.run(["bash", str(SCRIPT), "--list"], capture_output=True, text=True)
    assert listed.returncode == 0 and f"total {total} s" in listed.stdout


def test_dry_run_fills_out_after_every_step(tmp_path):
    done, out = dry_run(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    results, members, steps = read_out(out)
    names = [name for name, _ in step_table()[0]]
    assert [s[0] for s in steps] == names
    assert all(s[1] == "passed" for s in steps), steps
    assert results["ok"] and results["dry_run"] and results["commit"] == "0123abc"
    assert results["results_folder"].startswith("benchmarks/results/gpu-h100-")
    for name in names:
        assert f"logs/{name}.log" in members
    for name in ("tests_auto", "tests_persistent", "tests_step"):
        assert f"junit_{name}.xml" in members and results["tests"][name]["passed"] == 3
    assert (out / "bench" / "results.md").is_file()
    assert "no step failed" in (out / "summary.txt").read_text()
    # each step published its results: one "publish" per step, each after the step's record
    assert done.stdout.count("[gpu_check]") >= 2 * len(names)


@pytest.mark.parametrize("signal", ["TERM", "KILL"])
def test_a_run_cut_short_brings_back_a_complete_archive(tmp_path, signal):
    # Each stub takes 1 s: killed after 6 s, some steps are done and one is running. TERM is
    # trapped (the running step is stopped and recorded as killed, then $OUT is written);
    # KILL is not: $OUT holds what the last finished step published, every file whole.
    done, out = dry_run(tmp_path, kill=(signal, 6), sleep="1")
    # (timeout's KILL reaches its own process group, timeout too: -9)
    assert done.returncode in ((124,) if signal == "TERM" else (137, -9)), done.stdout
    results, members, steps = read_out(out)
    finished = [s for s in steps if s[1] == "passed"]
    assert len(finished) >= 2 and steps[0][0] == "probes"
    for name, *_ in finished:
        assert f"logs/{name}.log" in members
    assert not results["ok"] and results["not_run_steps"][-1] == "bench"
    assert len(steps) + len(results["not_run_steps"]) == len(step_table()[0])
    if signal == "TERM" and len(steps) > len(finished):  # (else stopped between two steps)
        assert steps[-1][1] == "killed" and results["failed_steps"] == [steps[-1][0]]
    assert not list(out.rglob("*.partial")) or signal == "KILL"


def test_failures_and_an_unusable_sanitizer_are_told_apart(tmp_path):
    # compute-sanitizer refusing the device (gVisor: "Device not supported", error 999) makes
    # the sanitizer steps unavailable, not failed, and the later ones are not tried; a failed
    # test fails the check.
    done, out = dry_run(tmp_path, env={"GPU_CHECK_DRY_RUN_NO_SANITIZER": "1",
                                       "GPU_CHECK_DRY_RUN_FAIL": "tests_step"})
    assert done.returncode == 1
    results, _, steps = read_out(out)
    status = {s[0]: s[1] for s in steps}
    sanitizers = [name for name in status if name.startswith("sanitizer_")]
    assert all(status[name] == "unavailable" for name in sanitizers)
    assert sum("refused the device" in s[5] for s in steps) == len(sanitizers) - 1
    assert status["tests_step"] == "failed" and results["failed_steps"] == ["tests_step"]
    assert results["tests"]["tests_step"]["failures"] == ["tests.test_cuda::test_stub_fails"]


def test_probes_cut_short_skip_nothing(tmp_path):
    # Only a probe that answers "no GPU" skips the GPU steps; one that said nothing does not.
    done, out = dry_run(tmp_path, "--only", "tests_step", env={"GPU_CHECK_DRY_RUN_FAIL": "probes"})
    _, _, steps = read_out(out)
    assert [(s[0], s[1]) for s in steps] == [("probes", "failed"), ("install", "passed"),
                                             ("tests_step", "passed")], done.stdout


def test_long_logs_are_cut_to_fit_out(tmp_path):
    # 3 MiB of incompressible output per step against a 4 MiB limit on the archive: each log is
    # cut to its first 512 KiB and last 1.5 MiB, and the archive still comes back.
    done, out = dry_run(tmp_path, "--only", "tests_step",
                        env={"GPU_CHECK_DRY_RUN_LOG_BYTES": str(3 * 2**20),
                             "GPU_CHECK_ARCHIVE_LIMIT_BYTES": str(4 * 2**20)})
    assert done.returncode == 0, done.stdout + done.stderr
    _, members, _ = read_out(out)
    for name in ("probes", "install", "tests_step"):
        log = members[f"logs/{name}.log"]
        assert 2 * 2**20 < len(log) < 2 * 2**20 + 100 and b"[... cut by gpu_check.sh ...]" in log


def test_only_reruns_the_named_steps(tmp_path):
    done, out = dry_run(tmp_path, "--only", "tests_step", "sanitizer_memcheck_persistent")
    assert done.returncode == 0, done.stdout + done.stderr
    _, _, steps = read_out(out)
    assert [s[0] for s in steps] == ["probes", "install", "sanitizer_memcheck_persistent",
                                     "tests_step"]
    wrong, _ = dry_run(tmp_path, "--only", "tests_everything")
    assert wrong.returncode == 2 and "no step tests_everything" in wrong.stderr


def test_summary_reads_the_sanitizers_reports(tmp_path):
    check = load_check()
    (tmp_path / "logs").mkdir()
    (tmp_path / "steps.tsv").write_text(
        "sanitizer_racecheck_persistent\tfailed\t99\t20\t35\t\n"
        "sanitizer_memcheck_step\tpassed\t0\t20\t25\t\n")
    (tmp_path / "logs" / "sanitizer_racecheck_persistent.log").write_text(
        "sanitize_case: ok\n========= RACECHECK SUMMARY: 3 hazards displayed (2 errors, "
        "1 warning)\n")
    (tmp_path / "logs" / "sanitizer_memcheck_step.log").write_text(
        "sanitize_case: ok\n========= ERROR SUMMARY: 0 errors\n")
    check.summarize(str(tmp_path), str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["sanitizers"]["sanitizer_racecheck_persistent"]["errors"] == 2
    assert results["sanitizers"]["sanitizer_racecheck_persistent"]["hazards"] == 3
    assert results["sanitizers"]["sanitizer_memcheck_step"]["errors"] == 0
    assert not results["ok"]
    assert check.gpu_model("NVIDIA H200") == "h200"
    assert check.gpu_model("NVIDIA H100 80GB HBM3") == "h100"


_DEADLINE_TESTS = textwrap.dedent(
    """
    import time
    import pytest

    @pytest.mark.parametrize("i", range(6))
    def test_slow(i):
        time.sleep(0.3)

    @pytest.mark.parametrize("i", range(2))
    def test_other(i):
        pass
    """
)


def test_a_test_step_ends_cleanly_at_its_deadline(tmp_path):
    # Round robin: test_other runs before the deadline even though it comes last in the file;
    # the session stops at the deadline and still writes its JUnit XML and its state.
    (tmp_path / "test_deadline_case.py").write_text(_DEADLINE_TESTS)
    # the deadline 1 s after the session starts, however long the start took
    (tmp_path / "conftest.py").write_text(
        "import os, time\n"
        "def pytest_sessionstart(session):\n"
        "    os.environ['GPU_CHECK_DEADLINE'] = str(time.time() + 1.0)\n")
    env = dict(os.environ, PYTHONPATH=str(HELPERS), GPU_CHECK_ROUND_ROBIN="1",
               GPU_CHECK_PYTEST_STATE=str(tmp_path / "state.json"))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "pytest_deadline", "-p", "no:cacheprovider",
         "-q", f"--junitxml={tmp_path / 'junit.xml'}", "test_deadline_case.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["collected"] == 8 and state["stopped_at_deadline"], done.stdout
    assert 2 <= state["started"] < 8
    junit = (tmp_path / "junit.xml").read_text()
    assert junit.count("<testcase") == state["started"]
    ran = re.findall(r'name="(test_\w+\[\d\])"', junit)
    assert ran[:3] == ["test_slow[0]", "test_other[0]", "test_slow[1]"]


@pytest.mark.slow
def test_sanitizer_case_runs_on_the_cpu(tmp_path):
    """The case compute-sanitizer runs, with the same calls on the CPU: its op signatures and
    settings are this build's (on a GPU it first runs under the sanitizer)."""
    import fused_lstm

    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(fused_lstm.__file__)))
    done = subprocess.run([sys.executable, str(HELPERS / "sanitize_case.py"), "--device", "cpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sanitize_case: ok (device cpu" in done.stdout
