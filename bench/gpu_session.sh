#!/usr/bin/env bash
# bench/gpu_session.sh: the runbook for a short GPU session (one H100 or H200, no network, at most 10 minutes per
# command, about 30 device-minutes in all). Every step the CUDA side needs, in the order to run them, each
# bounded in time, each leaving its logs and results under "$OUT" (default ./gpu_out) as it goes, so that a
# command stopped at its limit still brings back what was finished.
#
#   bash bench/gpu_session.sh [--dry-run] STAGE [STAGE ...]      (bash bench/gpu_session.sh --help)
#
# Stages (`all` runs them in this order):
#   build            preflight (versions, GPU, nvcc, ninja, modules); `pip install --no-index --no-build-isolation
#                    --no-deps -e .` with FORCE_CUDA=1, MAX_JOBS=16 and TORCH_CUDA_ARCH_LIST set to this GPU's
#                    arch only ("9.0a" on H100/H200: half the nvcc time of setup.py's "8.0+PTX;9.0a"); the
#                    linkage test; `sparsekit info`; a stripped copy of the built sparsekit/_C*.so as
#                    $OUT/prebuilt.tgz
#   test             pytest -m cuda, one pytest per file (a CUDA error that poisons the context stays in its
#                    file), --maxfail instead of -x (one run shows more than the first failure), the self-check
#                    files first (with CUDA_LAUNCH_BLOCKING=1): they say whether the never-validated tensor-core
#                    paths work on this GPU; a path that faults: rerun its test under `compute-sanitizer`
#   bench-targets-1  large M: (a) BSR fp16 square 4096 blocks 16-128, (e) CSR fp16 90% square 4096 vs cuSPARSE,
#                    (b) BSR fp16 32/64 on the BERT / LLaMA MLP shapes
#   bench-targets-2  (c) decode M=16 BSR32, (d) 2:4 at large M vs torch's semi-structured, (f) skinny CSR 80%
#                    at M=16 (LLaMA-7B, OPT-30B) with the skinny path on and off in the same run, (d2) 2:4 at M=16
#   bench-targets    bench-targets-1 then bench-targets-2
#   tune             optional: bench/tune_triton.py times the candidate launch configs of every Triton table row
#                    (fp16; bsr_mm 32/64 first) within TUNE_BUDGET_S (default 360 s, less if the session budget
#                    leaves less) and writes results/tuned_sm<major>0.json; then tests/test_triton_gpu_configs.py
#                    runs the measured configs against the reference. Copy the file to kernels/ and commit it
#   bench-models     fp16 whole models: sk.sparsify of the BERT-base encoder and ViT-B/16 (90% 32x32 blocks) and ResNet-50
#                    (compact 50% + 80% blocks), eager and compiled, then `sparsekit bench model` on the
#                    BERT-base-width encoder, then greedy decoding of a TinyLlama-shaped model (bench_decode.py),
#                    then kernel time against call and host time per call (bench_launch_overhead.py)
#   all              every stage in order (tune after bench-targets), with no overall time budget (a machine with
#                    no per-call limit)
#
# Time: all the stages named in one invocation share SESSION_BUDGET_S seconds (default 570, to fit a 600 s
# call; 0 = no budget, the default for `all`). A step that would not fit in what is left is skipped and listed
# in summary.md with the command that runs it next; each step also has its own cap, and is sent SIGINT at it
# (pytest then writes its junit file; `sparsekit bench` saves the configurations it finished) and SIGKILL 20 s
# later.
#
# What persists on the GPU machine: only while it stays warm (30 s after a call returns). The editable install,
# the built sparsekit/_C*.so and build/ are then still there and a stage starts at once; on a fresh machine every
# stage first makes the extension ready again: from PREBUILT (default build/gpu_prebuilt.tgz, i.e. the
# prebuilt.tgz a build stage returned, copied there on this side and named in the call's `carry`) when it was
# built from the same sources, else by running the build stage (minutes).
#
# $OUT: the device tool brings back at most 8 files (16 MiB each), so everything is packed: session.log (the
# whole output), summary.md (per step: status, time, test counts, speedup tables), one <stage>.tgz per stage
# (logs, junit XML, sparsekit info, benchmark results with plots), prebuilt.tgz (from a build). Results go to
# bench/results/ from the tgz: `tar xzf <stage>.tgz && cp -r <stage>/results/* bench/results/`.
#
# Environment: OUT, PYTHON (default python3), SESSION_BUDGET_S, DRY_RUN=1 (= --dry-run), ONLY=a,e,... (bench
# steps to run, by label; default all), TEST_FILES="tests/x.py ..." (test files instead of the default list),
# PYTEST_MAXFAIL (10), PYTEST_TIMEOUT (150 s per test, if pytest-timeout is installed), PREBUILT,
# PREBUILT_FORCE=1 (use PREBUILT even if built from other sources), MAX_JOBS (16), TORCH_CUDA_ARCH_LIST (the
# GPU's), GPU_SESSION_WORK (scratch directory, default ${TMPDIR:-/tmp}/sparsekit-gpu-session), TUNE_BUDGET_S (360),
# TUNE_MAX_CANDIDATES (12: the table's config and its nearest neighbours per row; 0 = all).
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

# ------------------------------------------------------------------------------------------------ arguments
DRY_RUN=${DRY_RUN:-0}
STAGES=()
for arg in "$@"; do
    case $arg in
        -n | --dry-run) DRY_RUN=1 ;;
        -h | --help) usage; exit 0 ;;
        build | test | bench-targets-1 | bench-targets-2 | tune | bench-models) STAGES+=("$arg") ;;
        bench-targets) STAGES+=(bench-targets-1 bench-targets-2) ;;
        all) STAGES+=(build test bench-targets-1 bench-targets-2 tune bench-models) ;;
        *) echo "gpu_session.sh: unknown argument '$arg'" >&2; usage >&2; exit 2 ;;
    esac
done
if [[ ${#STAGES[@]} -eq 0 ]]; then
    echo "gpu_session.sh: name at least one stage" >&2
    usage >&2
    exit 2
fi
ALL_REQUESTED=0
for arg in "$@"; do [[ $arg == all ]] && ALL_REQUESTED=1; done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/gpu_out}
PY=${PYTHON:-python3}
SK=("$PY" -m sparsekit.cli)                       # the console script may not be on PATH; this always works
HELP=("$PY" bench/gpu_session_helpers.py)
WORK=${GPU_SESSION_WORK:-${TMPDIR:-/tmp}/sparsekit-gpu-session}
PREBUILT=${PREBUILT:-build/gpu_prebuilt.tgz}
if [[ $ALL_REQUESTED == 1 ]]; then BUDGET_S=${SESSION_BUDGET_S:-0}; else BUDGET_S=${SESSION_BUDGET_S:-570}; fi
START=$(date +%s)
DEADLINE=0
[[ $BUDGET_S -gt 0 ]] && DEADLINE=$((START + BUDGET_S))
PYTEST_MAXFAIL=${PYTEST_MAXFAIL:-10}
PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-150}
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1        # logs in order; a segfault prints the Python stack
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 # pip must never try the network
export TQDM_MININTERVAL=5                             # fewer progress updates in the logs

# Per-step caps in seconds (first-run H100 guesses, generous: the budget, not these, normally decides).
CAP_BUILD=540
CAP_TEST_FILE=300
CAP_BENCH=330
CAP_MODELS=420
CAP_TUNE=480
CAP_TUNE_CHECK=240

# The self-check files first (they tell whether the unvalidated tensor-core paths work), then the core kernels,
# then the rest; any other test file with a cuda marker is appended.
SELFCHECK_FILES=(tests/test_cuda_selfcheck.py tests/test_cuda_nm_sp.py tests/test_cuda_csr_skinny.py
                 tests/test_cuda_channel_conv.py)
OTHER_FILES=(tests/test_cuda_ops.py tests/test_cusparselt_backend.py tests/test_triton_bsr.py
             tests/test_triton_ops.py tests/test_dispatch_measure.py)

# Common `sparsekit bench` arguments: fp16, CUDA-event timing (the default timer on cuda: L2 flushed before
# every call, candidates round-robin), up to 100 reps per configuration within 1 s. No torch.compile baseline
# for single linears (on CUDA it is the same cuBLAS call as eager, and compiling costs ~10 s per shape).
KCOMMON=(--device cuda --ops linear --dtype float16 --no-compile --warmup 3 --min-reps 10 --max-reps 100
         --budget 1)
MCOMMON=(--device cuda --dtype float16 --warmup 3 --min-reps 10 --max-reps 50 --budget 2)

# ------------------------------------------------------------------------------------------------ helpers
SKIPPED=()        # "label|stage" of the steps skipped or stopped for lack of time
STAGE=""          # the stage running now
W=""              # its scratch directory: $WORK/$STAGE
SUMMARY=""        # $WORK/summary.md, copied to $OUT after every step

say() { echo "[gpu_session $(date -u +%H:%M:%S)] $*"; }
note() { [[ $DRY_RUN == 1 ]] || echo "$*" >>"$SUMMARY"; }
left_s() { if [[ $DEADLINE -gt 0 ]]; then echo $((DEADLINE - $(date +%s))); else echo 999999; fi; }
# " arg arg ...", each quoted only where the shell needs it (as Python's shlex.quote does)
quoted() {
    local a
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf ' %s' "$a"; else printf " '%s'" "${a//\'/\'\\\'\'}"; fi
    done
}

# ONLY=a,f runs just those bench steps (labels as in summary.md); unset runs all.
selected() { [[ -z ${ONLY:-} ]] || [[ ",$ONLY," == *",$1,"* ]]; }

# Pack the current stage's scratch directory into $OUT/<stage>.tgz (< 16 MiB: plots dropped if needed) and copy
# the summary: called after every step, so a command killed at its limit still returns what was done.
pack() {
    [[ $DRY_RUN == 1 || -z $STAGE ]] && return 0
    tar czf "$OUT/$STAGE.tgz" -C "$WORK" "$STAGE" 2>/dev/null || true
    if [[ -f $OUT/$STAGE.tgz && $(stat -c %s "$OUT/$STAGE.tgz") -gt $((15 * 1024 * 1024)) ]]; then
        tar czf "$OUT/$STAGE.tgz" --exclude='*.png' -C "$WORK" "$STAGE" 2>/dev/null || true
        say "$STAGE.tgz was over 15 MiB: packed without the PNG plots"
    fi
    cp "$SUMMARY" "$OUT/summary.md" 2>/dev/null || true
}

# step LABEL "DESCRIPTION" CAP_S MIN_S CMD...: run CMD (output to the session log and $W/LABEL.log) within
# min(CAP_S, what the budget leaves); skip it when less than MIN_S is left. Never aborts the script.
step() {
    local label=$1 desc=$2 cap=$3 min=$4
    shift 4
    if [[ $DRY_RUN == 1 ]]; then
        echo "[dry-run] $label:$(quoted "$@")"
        return 0
    fi
    local limit=$cap left
    left=$(( $(left_s) - 15 ))
    [[ $left -lt $limit ]] && limit=$left
    if [[ $limit -lt $min ]]; then
        say "SKIP $label ($desc): ${left}s of the budget left, needs >= ${min}s"
        note "- **$label** SKIPPED (out of budget): $desc"
        SKIPPED+=("$label|$STAGE")
        return 0
    fi
    say "=== $label: $desc (limit ${limit}s)"
    echo "+$(quoted "$@")"
    local t0 rc
    t0=$(date +%s)
    set +e
    # --foreground: the SIGINT goes to the command once (without it, timeout signals the command and then its
    # process group, and a second KeyboardInterrupt can hit pytest's junit writing or the sweep's saving)
    timeout --foreground --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee "$W/$label.log"
    rc=${PIPESTATUS[0]}
    set -e
    local dt=$(( $(date +%s) - t0 )) status="ok"
    if [[ $rc -eq 124 || $rc -eq 137 || $rc -eq 130 ]]; then
        status="STOPPED at its ${limit}s limit (rc $rc)"
        SKIPPED+=("$label|$STAGE")
    elif [[ $rc -ne 0 ]]; then
        status="FAILED (rc $rc)"
    fi
    say "=== $label: $status in ${dt}s"
    note "- **$label** $status in ${dt}s: $desc"
    note "  \`$(quoted "$@" | cut -c2-)\`"
    pack
    return 0
}

stage_begin() {
    STAGE=$1
    echo
    echo "== stage $STAGE =="
    [[ $DRY_RUN == 1 ]] && return 0
    W="$WORK/$STAGE"
    rm -rf "$W"
    mkdir -p "$W"
    note ""
    note "## $STAGE (started $(date -u +%H:%M:%S) UTC, $(left_s)s of the budget left)"
    note ""
}

stage_end() {
    [[ $DRY_RUN == 1 ]] && return 0
    # a path whose first-use self-check failed is switched off with this warning (csrc/cuda/selfcheck.cuh)
    local bad
    bad=$(grep -ho "the CUDA path [A-Z_]* disagreed with the generic kernel[^;]*" "$W"/*.log 2>/dev/null \
          | sort -u || true)
    if [[ -n $bad ]]; then
        note ""
        note "**Self-check failures (those paths were switched off, generic kernels used):**"
        while IFS= read -r line; do note "- $line"; done <<<"$bad"
    fi
    pack
    STAGE=""
}

# Append the summary table a `sparsekit bench` step printed (from its "N rows" line on) to summary.md.
note_bench_table() {
    [[ $DRY_RUN == 1 ]] && return 0
    local log="$W/$1.log"
    [[ -f $log ]] || return 0
    note ""
    note '```'
    sed -n '/^sparsekit bench [a-z]*: [0-9]* rows (/,$p' "$log" | tr -d '\r' | head -80 >>"$SUMMARY" || true
    note '```'
    note ""
}

# ------------------------------------------------------------------------------------------------ extension
EXT_SUFFIX=""
SRC_HASH=""
ARCHS=""

ext_facts() {   # the .so name for this Python, the arch list for this GPU, the hash of the sources
    EXT_SUFFIX=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
    ARCHS=${TORCH_CUDA_ARCH_LIST:-$("${HELP[@]}" arch)}
    SRC_HASH=$("${HELP[@]}" sources-hash "$ARCHS")
}

ext_ready() { "${HELP[@]}" ext-ok; }

# A ready extension (warm machine), else the carried PREBUILT, else the build stage.
ensure_ext() {
    if [[ $DRY_RUN == 1 ]]; then
        echo "[dry-run] ensure-ext: ${HELP[*]} ext-ok || (unpack $PREBUILT if built from these sources;" \
             "SPARSEKIT_BUILD_EXT=0 pip install -e .) || run the build stage"
        return 0
    fi
    if ext_ready; then note "- extension: ready (installed and built on this machine before)"; return 0; fi
    ext_facts
    if [[ -f $PREBUILT ]]; then
        local d want
        d=$(mktemp -d)
        if tar xzf "$PREBUILT" -C "$d" && want=$(cat "$d/SOURCES.sha256" 2>/dev/null); then
            if [[ $want == "$SRC_HASH" || ${PREBUILT_FORCE:-0} == 1 ]]; then
                say "using the prebuilt extension from $PREBUILT (sources $want)"
                cp "$d"/_C*.so sparsekit/
                SPARSEKIT_BUILD_EXT=0 "$PY" -m pip install --no-index --no-build-isolation --no-deps -q -e . \
                    || say "pip install (no extension build) failed"
                if ext_ready; then note "- extension: from $PREBUILT (sources $want)"; return 0; fi
                say "the prebuilt extension did not work here; building"
            else
                say "$PREBUILT was built from other sources ($want, here $SRC_HASH); building (PREBUILT_FORCE=1" \
                    "uses it anyway)"
            fi
        fi
    fi
    local current=$STAGE
    stage_end_quiet
    stage_build
    if [[ -n $current ]]; then
        resume_stage "$current"
        note ""
        note "## $current (continued after the build)"
        note ""
    fi
    ext_ready
}

stage_end_quiet() { [[ -n $STAGE ]] && pack; STAGE=""; }
resume_stage() { STAGE=$1; W="$WORK/$STAGE"; }

# ------------------------------------------------------------------------------------------------ stages
stage_build() {
    stage_begin build
    step preflight "versions, GPU, nvcc, ninja, Python modules (exit 1 = the CUDA build cannot work here)" 120 5 \
        "${HELP[@]}" preflight --json "${W:-.}/preflight.json"
    if [[ $DRY_RUN == 1 ]]; then
        ARCHS=${TORCH_CUDA_ARCH_LIST:-9.0a}
    else
        ext_facts
        # torch's BuildExtension wants `ninja` on PATH for parallel builds; the pip package ships one
        if ! command -v ninja >/dev/null; then
            local nb
            nb=$("$PY" -c 'import ninja, os; print(ninja.BIN_DIR)' 2>/dev/null || true)
            [[ -n $nb && -x $nb/ninja ]] && export PATH="$nb:$PATH" && say "ninja from the ninja package: $nb"
        fi
        note "- TORCH_CUDA_ARCH_LIST=$ARCHS, sources $SRC_HASH, MAX_JOBS=${MAX_JOBS:-16}"
    fi
    # --no-index --no-deps --no-build-isolation: nothing is fetched (there is no network); the build uses the
    # torch, setuptools and ninja already installed. FORCE_CUDA=1: fail loudly rather than build CPU-only
    # when nvcc is not found. -v: the compiler lines and warnings go to the log.
    step pip-install "build the extension (CPU + CUDA for $ARCHS) and install sparsekit editable" "$CAP_BUILD" 60 \
        env FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="$ARCHS" \
        "$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e .
    # a toolchain that links libstdc++ statically made every numeric C++ error message segfault (the first session)
    step linkage "the built _C uses the shared libstdc++ torch loads (tests/test_build_linkage.py)" 120 10 \
        "$PY" -m pytest tests/test_build_linkage.py -q -rfE -p no:cacheprovider
    step info "sparsekit info (which backends are usable and why not)" 120 5 "${SK[@]}" info
    [[ $DRY_RUN == 1 || ! -f $W/info.log ]] || { note '```'; cat "$W/info.log" >>"$SUMMARY"; note '```'; }
    step info-json "sparsekit info --json" 60 5 sh -c "$(quoted "${SK[@]}" info --json) > $(printf %q "${W:-.}")/info.json"
    if [[ $DRY_RUN == 1 ]]; then
        echo "[dry-run] prebuilt: strip --strip-unneeded sparsekit/_C<EXT_SUFFIX> -> \$OUT/prebuilt.tgz (+ SOURCES.sha256)"
    elif ext_ready; then
        make_prebuilt
    else
        note "- **the extension is not usable after the build**: see pip-install.log / info.log"
    fi
    stage_end
}

# $OUT/prebuilt.tgz: sparsekit/_C<suffix>.so stripped of its symbol tables (the CPU-only one shrinks from 19 MB to
# 1.4 MB; the CUDA fatbins stay) and the hash of the sources it was built from. Copy it to build/gpu_prebuilt.tgz
# on the calling side and name that path in the next call's `carry`: a fresh machine then skips the build.
make_prebuilt() {
    local so="sparsekit/_C$EXT_SUFFIX" d="$W/prebuilt"
    [[ -f $so ]] || { note "- no $so to pack as prebuilt.tgz"; return 0; }
    mkdir -p "$d"
    if ! { command -v strip >/dev/null && strip --strip-unneeded -o "$d/_C$EXT_SUFFIX" "$so" \
           && "${HELP[@]}" so-loads "$d/_C$EXT_SUFFIX"; }; then
        cp "$so" "$d/_C$EXT_SUFFIX"
    fi
    echo "$SRC_HASH" >"$d/SOURCES.sha256"
    tar czf "$OUT/prebuilt.tgz" -C "$d" .
    rm -rf "$d"
    local size
    size=$(stat -c %s "$OUT/prebuilt.tgz")
    if [[ $size -gt $((16 * 1024 * 1024)) ]]; then
        rm -f "$OUT/prebuilt.tgz"
        note "- prebuilt.tgz was $((size / 1024 / 1024)) MiB (> 16 MiB, would not come back): dropped"
    else
        note "- prebuilt.tgz: $((size / 1024)) KiB, sources $SRC_HASH (copy to $PREBUILT and carry it)"
    fi
}

stage_test() {
    stage_begin test
    ensure_ext || note "- the extension is not ready: the CUDA tests will fail or skip"
    local files=() f
    if [[ -n ${TEST_FILES:-} ]]; then
        read -r -a files <<<"$TEST_FILES"
    else
        files=("${SELFCHECK_FILES[@]}" "${OTHER_FILES[@]}")
        for f in $(grep -l 'pytest.mark.cuda' tests/test_*.py | sort); do
            [[ " ${files[*]} " == *" $f "* ]] || files+=("$f")
        done
    fi
    local extra=()
    if [[ $DRY_RUN == 1 ]] || "${HELP[@]}" has-module pytest_timeout; then
        extra=(--timeout="$PYTEST_TIMEOUT" --timeout-method=thread)   # thread: also ends a hang inside CUDA
    fi
    [[ $DRY_RUN == 1 ]] || mkdir -p "$W/junit"
    local xmls=() name
    for f in "${files[@]}"; do
        name=$(basename "$f" .py)
        # the self-check files run the never-validated tensor-core paths: synchronous launches make a fault
        # name the launch that made it (not a later one), at no cost that matters to a correctness test
        local sync=()
        [[ " ${SELFCHECK_FILES[*]} " == *" $f "* ]] && sync=(env CUDA_LAUNCH_BLOCKING=1)
        step "$name" "pytest -m cuda $f" "$CAP_TEST_FILE" 30 \
            ${sync[@]+"${sync[@]}"} "$PY" -m pytest "$f" -m cuda -q -rfE -p no:cacheprovider --maxfail="$PYTEST_MAXFAIL" \
            --junitxml="${W:-.}/junit/$name.xml" ${extra[@]+"${extra[@]}"}
        xmls+=("${W:-.}/junit/$name.xml")
    done
    if [[ $DRY_RUN == 1 ]]; then
        echo "[dry-run] junit-summary:$(quoted "${HELP[@]}" junit-summary "${xmls[@]}")"
    else
        local have=() x
        for x in "${xmls[@]}"; do [[ -f $x ]] && have+=("$x"); done
        note ""
        "${HELP[@]}" junit-summary ${have[@]+"${have[@]}"} >>"$SUMMARY" || true
        note ""
    fi
    stage_end
}

# bench_kernels LABEL "DESCRIPTION" ARGS...: one `sparsekit bench kernels` run into $W/results.
bench_kernels() {
    local label=$1 desc=$2
    shift 2
    selected "$label" || return 0
    step "$label" "$desc" "$CAP_BENCH" 60 "${SK[@]}" bench kernels "${KCOMMON[@]}" "$@" --out "${W:-.}/results"
    note_bench_table "$label"
}

stage_bench_targets_1() {
    stage_begin bench-targets-1
    ensure_ext || note "- the extension is not ready: sparsekit_cuda rows will be missing"
    bench_kernels a "(a) BSR fp16, square M=N=K=4096, blocks 16/32/64/128 at 50/90%, vs cuBLAS and torch.sparse BSR" \
        --shapes square.4096 --formats bsr --block 16,32,64,128 --sparsity 0.5,0.9
    bench_kernels e "(e) CSR fp16 90%, 4096x4096 weight, M=4096, vs cuBLAS and cuSPARSE (torch_csr)" \
        --shapes square.4096 --formats csr --sparsity 0.9
    bench_kernels b "(b) BSR fp16 32/64 at 50/90% on the BERT-base/large and LLaMA-7B/Llama-3-8B MLPs (M 4096/2048)" \
        --shapes 'bert-base.mlp*,bert-large.mlp*,llama-7b.mlp*,llama3-8b.mlp*' --formats bsr --block 32,64 \
        --sparsity 0.5,0.9
    stage_end
}

stage_bench_targets_2() {
    stage_begin bench-targets-2
    ensure_ext || note "- the extension is not ready: sparsekit_cuda rows will be missing"
    bench_kernels c "(c) decode M=16: BSR32 fp16 90% on the LLaMA-7B linears (4096x4096 and the MLP)" \
        --shapes 'llama-7b.*' --m 16 --formats bsr --block 32 --sparsity 0.9
    bench_kernels d "(d) 2:4 fp16 at large M (square 4096, LLaMA-7B, Llama-3-8B MLP): sparsekit cuda/triton/cusparselt vs torch to_sparse_semi_structured" \
        --shapes 'square.4096,llama-7b.*,llama3-8b.mlp*' --formats nm --sparsity 0.5
    bench_kernels f "(f) CSR fp16 80% at M=16 (LLaMA-7B, OPT-30B): sparsekit_cuda (skinny path on) vs sparsekit_cuda_noskinny (SPARSEKIT_CSR_SKINNY=0) vs cuSPARSE" \
        --shapes 'llama-7b.*,opt-30b.*' --m 16 --formats csr --sparsity 0.8
    bench_kernels d2 "(d2) 2:4 fp16 at decode M=16, same shapes as (d)" \
        --shapes 'square.4096,llama-7b.*,llama3-8b.mlp*' --m 16 --formats nm --sparsity 0.5
    stage_end
}

stage_tune() {
    stage_begin tune
    ensure_ext || note "- the extension is not ready (sparsekit.kernels must be installed: pip install -e .)"
    # the script stops starting rows at its budget and rewrites its table after every row: leave the step's limit
    # (and the session's budget) room for the row in progress and the check below
    local budget=${TUNE_BUDGET_S:-360} left
    if [[ $DRY_RUN != 1 && $DEADLINE -gt 0 ]]; then
        left=$(( $(left_s) - 15 - 120 - CAP_TUNE_CHECK / 2 ))
        [[ $left -lt $budget ]] && budget=$left
        [[ $budget -lt 30 ]] && budget=30
    fi
    step tune "Triton launch configs measured per table row (bench/tune_triton.py, fp16, at most ${budget}s of rows)" \
        "$CAP_TUNE" 90 "$PY" bench/tune_triton.py --device cuda --dtype float16 --budget-s "$budget" \
        --max-candidates "${TUNE_MAX_CANDIDATES:-12}" --out-dir "${W:-.}/results"
    [[ $DRY_RUN == 1 || ! -f $W/tune.log ]] || { note '```'; grep -E '^  [a-z_]+\[' "$W/tune.log" >>"$SUMMARY" || true; note '```'; }
    # the measured configs run for real against the reference before anyone ships them
    step tune-check "the measured table's configs against the reference (tests/test_triton_gpu_configs.py, SPARSEKIT_TRITON_CONFIGS set)" \
        "$CAP_TUNE_CHECK" 30 sh -c "f=\$(ls $(printf %q "${W:-.}")/results/tuned_sm*0.json 2>/dev/null | head -n 1); \
[ -n \"\$f\" ] || { echo 'no measured table to check'; exit 1; }; \
SPARSEKIT_TRITON_CONFIGS=\$f exec$(quoted "$PY" -m pytest tests/test_triton_gpu_configs.py -m triton -q -rfE \
-p no:cacheprovider --maxfail="$PYTEST_MAXFAIL")"
    note "- a table that passed tune-check: copy tune/results/tuned_sm<major>0.json to kernels/ and commit it with tune.log"
    stage_end
}

stage_bench_models() {
    stage_begin bench-models
    ensure_ext || note "- the extension is not ready: sparsekit_cuda rows will be missing"
    if selected m1; then
        step m1 "sk.sparsify end to end, fp16, batch 32, eager and torch.compile: BERT-base encoder and ViT-B/16 (stock nn.MultiheadAttention) 90% 32x32 blocks; ResNet-50 compact 50% + 80% 32x32 blocks" \
            "$CAP_MODELS" 90 "$PY" bench/bench_sparsify_models.py --models bert,resnet50,vit --device cuda --dtype float16 --batch 32 --reps 20 --compile \
            --out "${W:-.}/results"
        [[ $DRY_RUN == 1 || ! -f $W/m1.log ]] || { note '```'; grep '^|' "$W/m1.log" >>"$SUMMARY" || true; note '```'; }
    fi
    if selected m2; then
        step m2 "sparsekit bench model: BERT-base-width encoder (12 layers, batch 32 x 128) fp16, BSR 32/64 + n:m at 50/90%, vs eager and torch.compile" \
            "$CAP_MODELS" 90 "${SK[@]}" bench model "${MCOMMON[@]}" --models transformer --formats bsr,nm \
            --block 32,64 --sparsity 0.5,0.9 --out "${W:-.}/results"
        note_bench_table m2
    fi
    if selected m3 && [[ $DRY_RUN == 0 ]] && ! "$PY" -c "import transformers" 2>/dev/null; then
        note "- m3 (bench_decode.py) skipped: transformers is not installed here (it needs LlamaForCausalLM)"
    elif selected m3; then
        step m3 "LLM decoding token by token: TinyLlama-1.1B-shaped (22 layers) fp16, 90% 32x32 blocks sparsified at M = 1, greedy generate() with the KV cache vs dense" \
            "$CAP_MODELS" 90 "$PY" bench/bench_decode.py --device cuda --dtype float16 --layers 22 --new-tokens 64 \
            --reps 5 --out "${W:-.}/results"
        [[ $DRY_RUN == 1 || ! -f $W/m3.log ]] || { note '```'; grep '^|' "$W/m3.log" >>"$SUMMARY" || true; note '```'; }
    fi
    if selected m4; then
        step m4 "kernel time against call and host time per call (fp16, 32x32 and 64x64 blocks, triton and cuda): which layers are host-bound" \
            "$CAP_MODELS" 60 "$PY" bench/bench_launch_overhead.py --backends triton,cuda --dtype float16 --blocks 32,64 \
            --out "${W:-.}/results"
        [[ $DRY_RUN == 1 || ! -f $W/m4.log ]] || { note '```'; grep -E 'kernel .* call .* host' "$W/m4.log" >>"$SUMMARY" || true; note '```'; }
    fi
    if selected m5; then
        step m5 "sk.sparsify(cuda_graphs=True) end to end, fp16, batch 32: the m1 models with layers chosen and timed as CUDA-graph replays (no host time), beside eager" \
            "$CAP_MODELS" 90 "$PY" bench/bench_sparsify_models.py --models bert,resnet50,vit --device cuda --dtype float16 --batch 32 --reps 20 --cuda-graphs \
            --out "${W:-.}/results"
        [[ $DRY_RUN == 1 || ! -f $W/m5.log ]] || { note '```'; grep '^|' "$W/m5.log" >>"$SUMMARY" || true; note '```'; }
    fi
    stage_end
}

# ------------------------------------------------------------------------------------------------ main
finish() {
    local rc=$?
    [[ $DRY_RUN == 1 ]] && return 0
    [[ -n $STAGE ]] && pack
    if [[ ${#SKIPPED[@]} -gt 0 ]]; then
        note ""
        note "## Not run, or stopped at the time limit: run these next"
        local s label stage build=0 tests=() only=() stages=()
        for s in "${SKIPPED[@]}"; do
            label=${s%%|*}; stage=${s#*|}
            case $stage in
                build) build=1 ;;
                test) tests+=("tests/$label.py") ;;
                *) only+=("$label"); [[ " ${stages[*]-} " == *" $stage "* ]] || stages+=("$stage") ;;
            esac
        done
        [[ $build == 0 ]] || note "- \`bash bench/gpu_session.sh build\`"
        [[ ${#tests[@]} -eq 0 ]] || note "- \`TEST_FILES='${tests[*]}' bash bench/gpu_session.sh test\`"
        [[ ${#only[@]} -eq 0 ]] || note "- \`ONLY=$(IFS=,; echo "${only[*]}") bash bench/gpu_session.sh ${stages[*]}\`"
    fi
    note ""
    note "Finished in $(( $(date +%s) - START ))s (exit $rc)."
    cp "$SUMMARY" "$OUT/summary.md" 2>/dev/null || true
    echo; echo "---------------------------------------- summary.md"; cat "$SUMMARY"; echo   # the reply's output tail
    say "done in $(( $(date +%s) - START ))s; \$OUT=$OUT: $(ls "$OUT" | tr '\n' ' ')"
    exec 1>&- 2>&-          # let tee drain session.log before the command returns
    wait 2>/dev/null || sleep 1
}

if [[ $DRY_RUN != 1 ]]; then
    mkdir -p "$OUT" "$WORK"
    SUMMARY="$WORK/summary.md"
    {
        echo "# GPU session summary"
        echo
        echo "stages: ${STAGES[*]}; budget: $([[ $BUDGET_S -gt 0 ]] && echo "${BUDGET_S}s" || echo none);" \
             "started $(date -u +%Y-%m-%dT%H:%M:%S) UTC on $(hostname)"
        echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- 2>/dev/null || echo ' (+ uncommitted changes)')"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /' || true
    } >"$SUMMARY"
    exec > >(tee -a "$OUT/session.log") 2>&1
    trap finish EXIT
else
    echo "[dry-run] stages: ${STAGES[*]}; OUT=$OUT; budget: $([[ $BUDGET_S -gt 0 ]] && echo "${BUDGET_S}s" || echo none)"
fi

for s in "${STAGES[@]}"; do
    case $s in
        build) stage_build ;;
        test) stage_test ;;
        bench-targets-1) stage_bench_targets_1 ;;
        bench-targets-2) stage_bench_targets_2 ;;
        tune) stage_tune ;;
        bench-models) stage_bench_models ;;
    esac
done
