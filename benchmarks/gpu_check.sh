#!/usr/bin/env bash
# The whole GPU check in ONE command on a GPU machine (H100/H200 with a CUDA build of torch and
# nvcc; no network needed): build, test suite, compute-sanitizer, benchmark, in about 6 minutes.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root; results in $OUT
#   FUSED_LSTM_GIT_COMMIT=<sha> bash benchmarks/gpu_check.sh   # when the copy has no .git
#
# Steps, each time-boxed (`timeout`) inside a total budget (GPU_CHECK_BUDGET_S, default 540 s,
# under the device machine's 10 minutes per command) so that the results are always written:
#   1. install: pip install --no-build-isolation . (MAX_JOBS=16, TORCH_CUDA_ARCH_LIST=9.0,
#      FUSED_LSTM_FORCE_CUDA=1 so a build that drops the CUDA kernels fails here, and
#      --no-deps --no-index: everything needed is installed already and there is no network);
#   2. the whole test suite against the installed build (FUSED_LSTM_EXPECT_AOT=1, as CI),
#      CUDA tests included, with JUnit XML (pytest-xdist when present); the CUDA path is the
#      automatic choice (persistent kernels where they fit, csrc/cuda/lstm_persistent.h).
#      Then tests/test_cuda.py again with FUSED_LSTM_CUDA_PATH=persistent (the persistent
#      kernels wherever they can run) and with FUSED_LSTM_CUDA_PATH=step (the step path
#      everywhere);
#   3. compute-sanitizer memcheck and racecheck over a small forward and backward (padded and
#      packed, bidirectional, projection, dropout mask, float32 and bfloat16; PyTorch's caching
#      allocator off so that every tensor is its own allocation and out-of-bounds accesses
#      are caught at the tensor's edge); then memcheck, racecheck and synccheck with
#      FUSED_LSTM_CUDA_PATH=persistent (the same case, plus multi-block, multi-tile plans and
#      float64);
#   4. the CUDA benchmark: python benchmarks/compare.py --device cuda --out $OUT/bench
#      (--quick when little time is left).
# $OUT receives: results.json (device, torch, commit, per-step status, test counts, sanitizer
# errors), summary.txt, junit.xml, logs.tar.gz (every log) and bench/ (compare.py's files).
# Exit status: 0 when every step passed.
set -uo pipefail

START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-540}
OUT=${OUT:-$PWD/gpu_check_out}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1

remaining() { echo $((BUDGET - (SECONDS - START))); }

# run_step NAME CAP_SECONDS RESERVE_SECONDS COMMAND...: runs COMMAND with a timeout of
# min(CAP, remaining budget - RESERVE), its output in $WORK/NAME.log; records rc and duration.
declare -A RC DURATION
run_step() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    local limit
    limit=$(( $(remaining) - reserve ))
    (( limit > cap )) && limit=$cap
    if (( limit < 10 )); then
        echo "[gpu_check] $name: skipped, out of time" | tee "$WORK/$name.log"
        RC[$name]=skipped
        DURATION[$name]=0
        return
    fi
    echo "[gpu_check] $name (at most ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    RC[$name]=$?
    DURATION[$name]=$((SECONDS - t0))
    echo "[gpu_check] $name: exit ${RC[$name]} after ${DURATION[$name]}s"
    tail -n 15 "$WORK/$name.log"
}

# ---- 0. the machine ----------------------------------------------------------------------------
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    nvcc --version 2>&1 | tail -n 2
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} >"$WORK/machine.log" 2>&1
cat "$WORK/machine.log"
GIT_COMMIT=${FUSED_LSTM_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
GIT_DIRTY=$( (git status --porcelain 2>/dev/null || true) | wc -l)

# ---- 1. install ----------------------------------------------------------------------------------
run_step install 240 300 env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 FUSED_LSTM_FORCE_CUDA=1 \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -v .

# ---- 2. the test suite ----------------------------------------------------------------------------
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then
    XDIST=(-n 8 --dist load)
fi
# -P: the checkout's fused_lstm/ must not shadow the installed package (CI runs `pytest tests`).
run_step tests 300 150 env FUSED_LSTM_EXPECT_AOT=1 "$PY" -P -m pytest tests -q -rfEs \
    "${XDIST[@]}" --junitxml="$WORK/junit.xml" -o junit_family=xunit2 --durations=15
# The CUDA tests on each path alone (the tests that pick a path themselves still do).
for path in persistent step; do
    run_step "tests_$path" 120 150 env FUSED_LSTM_EXPECT_AOT=1 FUSED_LSTM_CUDA_PATH=$path \
        "$PY" -P -m pytest tests/test_cuda.py -q -rfEs "${XDIST[@]}" \
        --junitxml="$WORK/junit_$path.xml" -o junit_family=xunit2
done

# ---- 3. compute-sanitizer -----------------------------------------------------------------------
cat >"$WORK/sanitize_case.py" <<'EOF'
"""A small forward and backward of every CUDA code path, for compute-sanitizer."""
import os

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fused_lstm

torch.manual_seed(0)
ops = torch.ops.fused_lstm
assert torch._C._dispatch_has_kernel_for_dispatch_key("fused_lstm::lstm_forward", "CUDA")
PERSISTENT = os.environ.get("FUSED_LSTM_CUDA_PATH") == "persistent"
L, D, I, H, P, T, B = 2, 2, 5, 8, 3, 6, 4
for dtype in (torch.float32, torch.bfloat16):
    for packed in (False, True):
        lstm = torch.nn.LSTM(I, H, L, bidirectional=True, proj_size=P).to("cuda", dtype)
        weights = [w.detach() for w in lstm._flat_weights]
        x = torch.randn(T, B, I, device="cuda", dtype=dtype)
        batch_sizes = None
        if packed:
            seq = pack_padded_sequence(x, torch.tensor([6, 5, 3, 1]))
            x, batch_sizes = seq.data, seq.batch_sizes
        hx = torch.randn(L * D, B, P, device="cuda", dtype=dtype)
        cx = torch.randn(L * D, B, H, device="cuda", dtype=dtype)
        mask = (torch.rand(L - 1, *x.shape[:-1], D * P, device="cuda") > 0.5).to(dtype) * 2
        out, hy, cy, reserve = ops.lstm_forward(x, batch_sizes, hx, cx, weights, mask, L, True,
                                                True, P)
        grads = ops.lstm_backward(x, batch_sizes, hx, cx, weights, mask, reserve,
                                  torch.randn_like(out), torch.randn_like(hy),
                                  torch.randn_like(cy), L, True, True, P)
        # no initial state, no upstream h_n/c_n gradients, no projection
        lstm2 = torch.nn.LSTM(I, H, L, bidirectional=True).to("cuda", dtype)
        w2 = [w.detach() for w in lstm2._flat_weights]
        out2, hy2, cy2, reserve2 = ops.lstm_forward(x, batch_sizes, None, None, w2, None, L,
                                                    True, True, 0)
        ops.lstm_backward(x, batch_sizes, None, None, w2, None, reserve2, torch.randn_like(out2),
                          None, None, L, True, True, 0)
if PERSISTENT:
    # The persistent kernels on several plans: blocks per direction (units 3 of hidden 8: 3
    # blocks, the last one ragged), batch tiles (9 rows in tiles of 4), lanes per dot product;
    # packed and padded, float32 and float64.
    B9 = 9
    plans = [{}, {"FUSED_LSTM_CUDA_PERSISTENT_UNITS": "3", "FUSED_LSTM_CUDA_PERSISTENT_TILE": "4",
                  "FUSED_LSTM_CUDA_PERSISTENT_KSPLIT": "2"},
             {"FUSED_LSTM_CUDA_PERSISTENT_UNITS": "1", "FUSED_LSTM_CUDA_PERSISTENT_KSPLIT": "32"}]
    for plan in plans:
        os.environ.update(plan)
        for dtype in (torch.float32, torch.float64):
            for packed in (False, True):
                lstm3 = torch.nn.LSTM(I, H, L, bidirectional=True).to("cuda", dtype)
                w3 = [w.detach() for w in lstm3._flat_weights]
                x = torch.randn(T, B9, I, device="cuda", dtype=dtype)
                batch_sizes = None
                if packed:
                    seq = pack_padded_sequence(x, torch.tensor([6, 6, 5, 5, 4, 3, 3, 2, 1]))
                    x, batch_sizes = seq.data, seq.batch_sizes
                shown = PackedSequence(x, batch_sizes) if packed else x
                choice = fused_lstm.explain(dict(hidden_size=H, bidirectional=True), shown)
                assert choice["path"] == "persistent", choice["summary"]
                assert choice["backward"]["path"] == "persistent", choice["summary"]
                hx = torch.randn(L * D, B9, H, device="cuda", dtype=dtype)
                cx = torch.randn(L * D, B9, H, device="cuda", dtype=dtype)
                out3, hy3, cy3, reserve3 = ops.lstm_forward(x, batch_sizes, hx, cx, w3, None, L,
                                                            True, True, 0)
                ops.lstm_backward(x, batch_sizes, hx, cx, w3, None, reserve3,
                                  torch.randn_like(out3), torch.randn_like(hy3),
                                  torch.randn_like(cy3), L, True, True, 0)
        for name in plan:
            del os.environ[name]
# through the module and autograd, training mode with dropout
model = fused_lstm.FusedLSTM(I, H, L, dropout=0.5).cuda().train()
y, (h, c) = model(torch.randn(T, B, I, device="cuda", requires_grad=True))
(y.sum() + h.sum() + c.sum()).backward()
torch.cuda.synchronize()
print("sanitize_case: ok")
EOF
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
# name:tool:FUSED_LSTM_CUDA_PATH
SANITIZER_RUNS=(memcheck:memcheck:auto racecheck:racecheck:auto
                memcheck_persistent:memcheck:persistent racecheck_persistent:racecheck:persistent
                synccheck_persistent:synccheck:persistent)
for run in "${SANITIZER_RUNS[@]}"; do
    IFS=: read -r name tool path <<<"$run"
    if [[ -n "$SANITIZER" ]]; then
        run_step "sanitizer_$name" 120 200 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
            FUSED_LSTM_CUDA_PATH="$path" \
            "$SANITIZER" --tool "$tool" --error-exitcode 99 --print-limit 50 \
            "$PY" -P "$WORK/sanitize_case.py"
    else
        echo "compute-sanitizer not found" >"$WORK/sanitizer_$name.log"
        RC[sanitizer_$name]=missing
        DURATION[sanitizer_$name]=0
    fi
done

# ---- 4. the benchmark ------------------------------------------------------------------------------
BENCH_ARGS=(--device cuda --out "$OUT/bench")
[[ -f "$WORK/junit.xml" ]] && BENCH_ARGS+=(--tests-junit "$WORK/junit.xml")
if (( $(remaining) < 240 )); then
    BENCH_ARGS+=(--quick)
fi
run_step bench 400 15 "$PY" -P benchmarks/compare.py "${BENCH_ARGS[@]}"

# ---- results -------------------------------------------------------------------------------------
for name in install tests tests_persistent tests_step sanitizer_memcheck sanitizer_racecheck \
        sanitizer_memcheck_persistent sanitizer_racecheck_persistent \
        sanitizer_synccheck_persistent bench; do
    echo "$name ${RC[$name]:-notrun} ${DURATION[$name]:-0}"
done >"$WORK/steps.txt"
GIT_COMMIT=$GIT_COMMIT GIT_DIRTY=$GIT_DIRTY WORK=$WORK OUT=$OUT TOTAL=$((SECONDS - START)) \
    "$PY" - <<'EOF' >"$WORK/results.log" 2>&1
import json, os, re, subprocess, sys
import xml.etree.ElementTree as ET

work, out = os.environ["WORK"], os.environ["OUT"]
steps = {}
for line in open(os.path.join(work, "steps.txt")):
    name, rc, seconds = line.split()
    steps[name] = {"exit": int(rc) if rc.lstrip("-").isdigit() else rc, "seconds": int(seconds)}

def read(name):
    try:
        return open(os.path.join(work, name), errors="replace").read()
    except OSError:
        return ""

result = {"git_commit": os.environ["GIT_COMMIT"],
          "uncommitted_files": int(os.environ["GIT_DIRTY"] or 0),
          "total_seconds": int(os.environ["TOTAL"]), "steps": steps}
try:
    import torch
    result["torch"] = torch.__version__
    result["torch_cuda"] = torch.version.cuda
    result["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
except Exception as error:  # noqa: BLE001 -- the report must be written anyway
    result["torch_error"] = repr(error)
nvcc = re.search(r"release [\d.]+, V[\d.]+", read("machine.log"))
result["nvcc"] = nvcc.group(0) if nvcc else None

tests = {"total": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [],
         "per_file": {}}
try:
    for case in ET.parse(os.path.join(work, "junit.xml")).iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}[child.tag]
        tests["total"] += 1
        tests[outcome] += 1
        module = case.get("classname", "").split(".")[-1] or "?"
        per = tests["per_file"].setdefault(module, {"passed": 0, "failed": 0, "errors": 0,
                                                   "skipped": 0})
        per[outcome] += 1
        if outcome in ("failed", "errors"):
            tests["failures"].append(f"{case.get('classname')}::{case.get('name')}")
except (OSError, ET.ParseError) as error:
    tests["junit_error"] = repr(error)
result["tests"] = tests

sanitizer = {}
for tool in ("memcheck", "racecheck", "memcheck_persistent", "racecheck_persistent",
             "synccheck_persistent"):
    log = read(f"sanitizer_{tool}.log")
    # memcheck ends with "ERROR SUMMARY: N errors"; racecheck with "RACECHECK SUMMARY: N hazards
    # displayed (E errors, W warnings)" (and maybe an ERROR SUMMARY too).
    summary = (re.search(r"ERROR SUMMARY: (\d+) error", log)
               or re.search(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error", log))
    hazards = re.search(r"RACECHECK SUMMARY: (\d+) hazard", log)
    exit_status = steps.get(f"sanitizer_{tool}", {}).get("exit")
    case_ran = "sanitize_case: ok" in log
    errors = int(summary.group(1)) if summary else (0 if exit_status == 0 and case_ran else None)
    sanitizer[tool] = {"exit": exit_status, "errors": errors,
                       "hazards": int(hazards.group(1)) if hazards else None, "case_ran": case_ran}
result["sanitizer"] = sanitizer
result["ok"] = (
    all(s.get("exit") == 0 for s in steps.values())
    and tests["total"] > 0 and tests["failed"] == 0 and tests["errors"] == 0
    # on a GPU machine the CUDA tests must have run, not been skipped
    and tests["per_file"].get("test_cuda", {}).get("passed", 0) > 0
    and all(s["errors"] == 0 and s["case_ran"] for s in sanitizer.values())
)
json.dump(result, open(os.path.join(out, "results.json"), "w"), indent=2)
lines = [f"ok: {result['ok']}",
         f"device: {result.get('device')}  torch {result.get('torch')}  nvcc {result['nvcc']}",
         f"commit: {result['git_commit']} ({result['uncommitted_files']} uncommitted files)",
         "steps: " + ", ".join(f"{k} exit {v['exit']} in {v['seconds']}s" for k, v in steps.items()),
         "tests: " + ", ".join(f"{k} {tests[k]}" for k in ("total", "passed", "failed", "errors",
                                                          "skipped")),
         *[f"  {name}: {counts}" for name, counts in sorted(tests["per_file"].items())],
         *[f"  FAILED {name}" for name in tests["failures"][:40]],
         "sanitizer: " + ", ".join(f"{k} errors {v['errors']} (exit {v['exit']})"
                                  for k, v in sanitizer.items())]
open(os.path.join(out, "summary.txt"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(0 if result["ok"] else 1)
EOF
FINAL=$?
cat "$WORK/results.log"
[[ -f "$WORK/junit.xml" ]] && cp "$WORK/junit.xml" "$OUT/junit.xml"
tar -czf "$OUT/logs.tar.gz" -C "$WORK" . 2>/dev/null
echo "[gpu_check] done in $((SECONDS - START))s; results in $OUT"
exit $FINAL
