#!/usr/bin/env bash
# The GPU check in ONE command of about 8 minutes on a GPU machine (an H100 or H200 with a CUDA
# build of torch, nvcc and compute-sanitizer; no network needed): build, the GPU tests,
# compute-sanitizer on our kernels, the CUDA benchmark. $OUT holds the results after EVERY step,
# so a run cut short still brings back what it did.
#
#   bash benchmarks/gpu_check.sh --commit SHA          # every step; pass the commit: the copied
#                                                      # tree may have no .git
#   bash benchmarks/gpu_check.sh --commit SHA --only tests_step sanitizer_memcheck_persistent
#                                                      # a follow-up: probes, install (skipped if
#                                                      # this machine has this commit) and those
#   bash benchmarks/gpu_check.sh --list                # the steps and their budgets
#   bash benchmarks/gpu_check.sh --dry-run             # stub commands, no GPU: the plumbing only
#
# Options: --total S (the whole budget; default the table's sum; a shorter follow-up call
# passes less), --reinstall. The script ends within the total plus a few seconds: give the
# command a limit of at least the total + 60 s.
# Environment: OUT (default ./gpu_check_out), PYTHON (default python3), GPU_CHECK_DRY_RUN=1
# (as --dry-run), GPU_CHECK_PYTEST_ARGS (more pytest arguments for the test steps, e.g.
# "-k gradcheck"), GPU_CHECK_SANITIZER_FILTER (default kns=fused_lstm, every kernel of ours,
# which all live in namespace fused_lstm::gpu; empty: every kernel, cuBLAS's and ATen's too).
#
# The steps, in the order they run, each time-boxed. A step's limit is what is left of the
# total once the budgets of the selected steps after it and FINISH_S are set aside: time a step
# leaves unused goes to the steps after it, and one that overruns is stopped at its limit, so
# every later step still gets its budget. The budgets add up to the total
# (tests/test_gpu_check.py checks it).
STEPS='
# step                          budget_s  what it produces
probes                                20  machine.json: GPU, driver, torch, nvcc, sanitizer, kernel
install                              120  logs/install.log: pip install --no-build-isolation, CUDA
tests_auto                            85  junit_tests_auto.xml: test_cuda.py, test_build.py, auto
sanitizer_memcheck_persistent         35  logs/<step>.log: memcheck, persistent path
sanitizer_racecheck_persistent        35  logs/<step>.log: racecheck (shared memory), persistent
sanitizer_synccheck_persistent        25  logs/<step>.log: synccheck (barriers), persistent path
sanitizer_memcheck_step               25  logs/<step>.log: memcheck, step path
tests_persistent                      40  junit_tests_persistent.xml: test_cuda.py forced persistent
tests_step                            40  junit_tests_step.xml: test_cuda.py forced onto step
bench                                 45  $OUT/bench/: compare.py --device cuda --quick
'
FINISH_S=10  # the last summary and archive
# The forced runs leave out the tests that set the path themselves (they repeat tests_auto).
FORCED_SELECT="not persistent and not explain_reports_the_cuda_path"
# $OUT (at most 8 files, 2 folders deep, 16 MiB each): gpu_check.tar.gz (every log, JUnit XML,
# machine.json, steps.tsv, results), results.json, summary.txt, bench/{results.json,results.md,
# speedup.png}; each written under a temporary name and renamed.
ARCHIVE_LIMIT_BYTES=${GPU_CHECK_ARCHIVE_LIMIT_BYTES:-$((15 * 1024 * 1024))}

set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
HERE=$ROOT/benchmarks/gpu_check
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/gpu_check_out}
DRY_RUN=${GPU_CHECK_DRY_RUN:-}
[[ $DRY_RUN == 0 ]] && DRY_RUN=
SANITIZER_FILTER=${GPU_CHECK_SANITIZER_FILTER-kns=fused_lstm}
STAMP=${GPU_CHECK_STATE_DIR:-/tmp}/gpu_check_installed_commit
export PYTHONUNBUFFERED=1

# ---- the table and the command line -----------------------------------------------------------
ORDER=()
declare -A BUDGET
while read -r name budget _; do
    [[ -z $name || $name == \#* ]] && continue
    ORDER+=("$name")
    BUDGET[$name]=$budget
done <<<"$STEPS"
TABLE_TOTAL=$FINISH_S
for name in "${ORDER[@]}"; do TABLE_TOTAL=$((TABLE_TOTAL + BUDGET[$name])); done

usage() { sed -n '2,/^# The steps/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
COMMIT=${GPU_CHECK_COMMIT:-${FUSED_LSTM_GIT_COMMIT:-}}
TOTAL=$TABLE_TOTAL
REINSTALL=
ONLY=()
while (($#)); do
    case $1 in
        --commit) COMMIT=${2:?--commit needs a value}; shift 2 ;;
        --total) TOTAL=${2:?--total needs seconds}; shift 2 ;;
        --reinstall) REINSTALL=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --list) printf '%s\n' "$STEPS" | sed '/^$/d'; echo "finish $FINISH_S; total $TABLE_TOTAL s"
                exit 0 ;;
        --only) shift
                while (($#)) && [[ $1 != --* ]]; do ONLY+=("$1"); shift; done ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
for name in "${ONLY[@]}"; do
    if [[ -z ${BUDGET[$name]:-} ]]; then
        echo "gpu_check.sh: no step $name; the steps: ${ORDER[*]}" >&2
        exit 2
    fi
done
SELECTED=()
for name in "${ORDER[@]}"; do
    if ((${#ONLY[@]} == 0)) || [[ $name == probes || $name == install ]] \
            || [[ " ${ONLY[*]} " == *" $name "* ]]; then
        SELECTED+=("$name")
    fi
done
if [[ -z $COMMIT ]]; then
    COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
fi
export GPU_CHECK_COMMIT=$COMMIT GPU_CHECK_DRY_RUN=${DRY_RUN:-0} GPU_CHECK_SELECTED="${SELECTED[*]}"

# ---- bookkeeping: steps.tsv, and $OUT after every step ----------------------------------------
START=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
mkdir -p "$WORK/logs" "$OUT" || exit 1
: >"$WORK/steps.tsv"
elapsed() { echo $(($(date +%s) - START)); }

# record NAME STATUS EXIT SECONDS LIMIT NOTE
record() {
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$WORK/steps.tsv"
    echo "[gpu_check] $1: $2 (exit $3, $4 s of $5 s)${6:+: $6}"
}

# put FILE DEST: DEST replaced whole, never half-written.
put() { cp "$1" "$2.partial" && mv -f "$2.partial" "$2"; }

# Logs over 2 MiB keep their first 512 KiB and last 1.5 MiB, so that the archive fits $OUT.
shrink_logs() {
    local log
    for log in "$WORK"/logs/*.log; do
        if (($(stat -c %s "$log") > 2 * 1024 * 1024)); then
            { head -c 524288 "$log"; printf '\n[... cut by gpu_check.sh ...]\n'
              tail -c 1572864 "$log"; } >"$log.cut" && mv -f "$log.cut" "$log"
        fi
    done
}

publish() {
    GPU_CHECK_ELAPSED=$(elapsed) "$PY" "$HERE/check.py" summarize "$WORK" "$WORK" \
        2>>"$WORK/logs/publish.log"
    local archive=$OUT/gpu_check.tar.gz
    if tar -czf "$archive.partial" -C "$WORK" . 2>>"$WORK/logs/publish.log"; then
        if (($(stat -c %s "$archive.partial") > ARCHIVE_LIMIT_BYTES)); then
            shrink_logs
            tar -czf "$archive.partial" -C "$WORK" . 2>>"$WORK/logs/publish.log"
        fi && mv -f "$archive.partial" "$archive"
    fi
    local file
    for file in results.json summary.txt; do
        [[ -f $WORK/$file ]] && put "$WORK/$file" "$OUT/$file"
    done
    for file in results.json results.md speedup.png; do
        [[ -f $WORK/bench/$file ]] || continue
        mkdir -p "$OUT/bench" && put "$WORK/bench/$file" "$OUT/bench/$file"
    done
}

# ---- running a step ---------------------------------------------------------------------------
STEP_PID=
CURRENT=
STEP_T0=0
LIMIT=0

later_budget() {  # the budgets of the selected steps after $1
    local name sum=0 after=
    for name in "${SELECTED[@]}"; do
        [[ -n $after ]] && sum=$((sum + BUDGET[$name]))
        [[ $name == "$1" ]] && after=1
    done
    echo "$sum"
}

# The outcome of a finished step from its exit code and files: passed, failed, timeout,
# stopped (a test step that reached its deadline with no test failed) or unavailable.
classify() {
    local name=$1 code=$2 log=$WORK/logs/$1.log
    case $name in
        tests_*)
            if ((code == 0)); then echo passed
            elif grep -q '"stopped_at_deadline": true' "$WORK/pytest_$name.json" 2>/dev/null \
                    && ! grep -qE '<(failure|error)[ >]' "$WORK/junit_$name.xml" 2>/dev/null; then
                echo stopped
            elif ((code == 124 || code == 137)); then echo timeout
            else echo failed; fi ;;
        sanitizer_*)
            if grep -q 'sanitize_case: ok' "$log" && ((code == 0)); then echo passed
            elif grep -qE 'Device not supported|error 999|CUDA_ERROR_UNKNOWN' "$log" \
                    && ! grep -q 'sanitize_case: ok' "$log"; then echo unavailable
            elif ((code == 124 || code == 137)); then echo timeout
            else echo failed; fi ;;
        *)
            if ((code == 0)); then echo passed
            elif ((code == 124 || code == 137)); then echo timeout
            else echo failed; fi ;;
    esac
}

# run_step NAME COMMAND...: COMMAND (a stub under --dry-run) under `timeout`, its output in
# logs/NAME.log; then the record and $OUT brought up to date. Returns 0 when it passed.
run_step() {
    local name=$1
    shift
    LIMIT=$((TOTAL - FINISH_S - $(elapsed) - $(later_budget "$name")))
    if ((LIMIT < 5)); then
        record "$name" skipped - 0 "$LIMIT" "out of time"
        publish
        return 1
    fi
    [[ -n $DRY_RUN ]] && set -- "$PY" "$HERE/check.py" stub "$name" "$WORK"
    # pytest_deadline.py stops a test session this long before the hard limit.
    local margin=$((LIMIT / 6 < 3 ? 3 : (LIMIT / 6 > 20 ? 20 : LIMIT / 6)))
    export GPU_CHECK_DEADLINE=$(($(date +%s) + LIMIT - margin))
    echo "[gpu_check] $name: at most $LIMIT s ($(elapsed) s so far): $*"
    CURRENT=$name
    STEP_T0=$(date +%s)
    timeout --kill-after=5 "$LIMIT" "$@" </dev/null >"$WORK/logs/$name.log" 2>&1 &
    STEP_PID=$!
    wait "$STEP_PID"
    local code=$?
    STEP_PID=
    CURRENT=
    local status
    status=$(classify "$name" "$code")
    record "$name" "$status" "$code" $(($(date +%s) - STEP_T0)) "$LIMIT" ""
    [[ $status != passed ]] && tail -n 8 "$WORK/logs/$name.log" | sed 's/^/    /'
    publish
    [[ $status == passed ]]
}

on_signal() {
    trap '' TERM INT HUP
    if [[ -n $STEP_PID ]]; then
        kill -TERM "$STEP_PID" 2>/dev/null
        wait "$STEP_PID" 2>/dev/null
        record "$CURRENT" killed - $(($(date +%s) - STEP_T0)) "$LIMIT" "gpu_check.sh was stopped"
    fi
    publish
    echo "[gpu_check] stopped by a signal after $(elapsed) s; $OUT holds the steps done"
    exit 143
}
trap on_signal TERM INT HUP

# skip NAME REASON: recorded without running (the budget goes to the steps after it).
skip() { record "$1" "${3:-skipped}" - 0 0 "$2"; publish; }

# ---- the steps ---------------------------------------------------------------------------------
# (until the probes say otherwise: a probe cut short must not skip the steps that need a GPU)
PROBED_CUDA_HOME= PROBED_SANITIZER=unprobed PROBED_HAS_GPU=unknown PROBED_CAPABILITY=
PROBED_MISSING_BUILD_TOOLS=
INSTALLED=
SANITIZER_UNAVAILABLE=

step_probes() {
    run_step probes "$PY" "$HERE/check.py" probe "$WORK"
    # shellcheck source=/dev/null
    [[ -f $WORK/machine.env ]] && source "$WORK/machine.env"
}

installed_here() {  # this commit installed by an earlier call on this machine
    [[ -z $DRY_RUN && -z $REINSTALL && $COMMIT != unknown && -f $STAMP ]] \
        && [[ $(cat "$STAMP") == "$COMMIT" ]] \
        && (cd / && "$PY" -P -c "import fused_lstm" >/dev/null 2>&1)
}

step_install() {
    if installed_here; then
        skip install "commit $COMMIT was installed by an earlier call"
        INSTALLED=1
        return
    fi
    if [[ -n $PROBED_MISSING_BUILD_TOOLS ]]; then
        skip install "missing Python packages: $PROBED_MISSING_BUILD_TOOLS" failed
        return
    fi
    # torch infers CUDA_HOME from the nvcc on PATH, which may be a wrapper outside the toolkit.
    [[ -n $PROBED_CUDA_HOME && -z $DRY_RUN ]] && export CUDA_HOME=$PROBED_CUDA_HOME
    # The installed build must be the one tested: from / so that no checkout shadows it.
    # shellcheck disable=SC2016
    if run_step install env MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST="${PROBED_CAPABILITY:-9.0}" \
            FUSED_LSTM_FORCE_CUDA=1 bash -c '
                set -ex
                "$0" -m pip install --no-build-isolation --no-deps --no-index -v "$1"
                cd /
                "$0" -P -c "import torch, fused_lstm
assert torch._C._dispatch_has_kernel_for_dispatch_key(\"fused_lstm::lstm_forward\", \"CUDA\")
print(\"installed:\", fused_lstm.__file__)"' "$PY" "$ROOT"; then
        INSTALLED=1
        [[ -z $DRY_RUN && $COMMIT != unknown ]] && echo "$COMMIT" >"$STAMP"
    fi
}

# pytest_step NAME PATH SELECTION FILES...: the tests under FUSED_LSTM_CUDA_PATH=PATH, against
# the installed build; pytest_deadline.py ends the session before the limit (its JUnit XML is
# then written) and runs the tests round robin over the test functions, so that a run cut
# short has tried every function.
pytest_step() {
    local name=$1 path=$2 selection=$3
    shift 3
    local select=()
    [[ -n $selection ]] && select=(-k "$selection")
    # shellcheck disable=SC2086
    run_step "$name" env FUSED_LSTM_EXPECT_AOT=1 FUSED_LSTM_CUDA_PATH="$path" \
        PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" GPU_CHECK_ROUND_ROBIN=1 \
        GPU_CHECK_PYTEST_STATE="$WORK/pytest_$name.json" \
        "$PY" -P -m pytest "$@" -m "not slow" "${select[@]}" -v -rfEs --maxfail 25 \
        -p pytest_deadline -p no:cacheprovider --durations 10 \
        --junitxml="$WORK/junit_$name.xml" -o junit_family=xunit2 ${GPU_CHECK_PYTEST_ARGS:-}
}

# sanitizer_step NAME: NAME is sanitizer_<tool>_<path>; the small case of sanitize_case.py.
sanitizer_step() {
    local name=$1 tool path
    IFS=_ read -r _ tool path <<<"$name"
    [[ $PROBED_SANITIZER == unprobed ]] && PROBED_SANITIZER=$(command -v compute-sanitizer)
    if [[ -z $PROBED_SANITIZER ]]; then
        skip "$name" "compute-sanitizer not found" unavailable
        return
    fi
    if [[ -n $SANITIZER_UNAVAILABLE ]]; then
        skip "$name" "$SANITIZER_UNAVAILABLE" unavailable
        return
    fi
    local filter=()
    [[ -n $SANITIZER_FILTER ]] && filter=(--kernel-name "$SANITIZER_FILTER")
    # No caching allocator: every tensor its own allocation, so an access past one is caught.
    run_step "$name" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 FUSED_LSTM_CUDA_PATH="$path" \
        "$PROBED_SANITIZER" --tool "$tool" --error-exitcode 99 --print-limit 50 "${filter[@]}" \
        "$PY" -P "$HERE/sanitize_case.py"
    if [[ $(tail -n 1 "$WORK/steps.tsv" | cut -f2) == unavailable ]]; then
        SANITIZER_UNAVAILABLE="compute-sanitizer refused the device in $name (kernel $(uname -r))"
    fi
}

step_bench() {
    local args=(--device cuda --quick --min-run-time 0.3 --out "$WORK/bench")
    [[ -f $WORK/junit_tests_auto.xml ]] && args+=(--tests-junit "$WORK/junit_tests_auto.xml")
    run_step bench "$PY" -P "$ROOT/benchmarks/compare.py" "${args[@]}"
}

echo "[gpu_check] commit $COMMIT; steps: ${SELECTED[*]}; total $TOTAL s${DRY_RUN:+ (dry run)}"
for name in "${SELECTED[@]}"; do
    if [[ $name != probes && $name != install && -z $INSTALLED ]]; then
        skip "$name" "nothing installed"
        continue
    fi
    if [[ $name != probes && $name != install && $PROBED_HAS_GPU == 0 ]]; then
        skip "$name" "torch sees no GPU"
        continue
    fi
    case $name in
        probes) step_probes ;;
        install) step_install ;;
        tests_auto) pytest_step tests_auto auto "" tests/test_cuda.py tests/test_build.py ;;
        tests_persistent)
            pytest_step tests_persistent persistent "$FORCED_SELECT" tests/test_cuda.py ;;
        tests_step) pytest_step tests_step step "$FORCED_SELECT" tests/test_cuda.py ;;
        sanitizer_*) sanitizer_step "$name" ;;
        bench) step_bench ;;
    esac
done

publish
cat "$WORK/summary.txt"
echo "[gpu_check] done in $(elapsed) s; $OUT: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
grep -q '"ok": true' "$WORK/results.json"
