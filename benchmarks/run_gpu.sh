#!/usr/bin/env bash
# The one GPU command: GPU test tier, then every benchmark family, results under OUT.
#
#   bash benchmarks/run_gpu.sh OUT
#
# Needs .peers/ and .whl/ from benchmarks/stage_peers.sh (carried along). Writes:
#   OUT/tests.log  OUT/bench.log  OUT/<gpu-slug>/{gemm,attention,prefill,kv_write,floors}.json
# Each step has its own timeout, so one hang cannot eat the run (worst case ≈ 12.5 min, typically ≈ 8: lower the
# T_* limits or pass --quick through the *_ARGS to fit a 10-minute call).
# Environment: ANGEL_GIT_SHA (commit recorded in the rows; default: .peers/GIT_SHA written when staging),
# GEMM_ARGS / ATTN_ARGS / PREFILL_ARGS / WRITE_ARGS (extra arguments, e.g. GEMM_ARGS=--quick), PYTHON (default python3).
set -u
OUT=${1:?usage: bash benchmarks/run_gpu.sh OUT}
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SITE=/tmp/site

T_TESTS=${T_TESTS:-120}  # GPU test tier
T_GEMM=${T_GEMM:-270}   # bench_gemm stops starting cases after its 220 s budget (GEMM_ARGS=--budget-s N)
T_ATTN=${T_ATTN:-130}   # bench_attention: 90 s budget
T_PREFILL=${T_PREFILL:-130}  # bench_prefill: 90 s budget
T_WRITE=${T_WRITE:-100}  # bench_kv_write: 60 s budget

export PYTHONUNBUFFERED=1
if [ -z "${ANGEL_GIT_SHA:-}" ] && [ -s .peers/GIT_SHA ]; then
  ANGEL_GIT_SHA=$(head -c 40 .peers/GIT_SHA)
  export ANGEL_GIT_SHA
fi

log() { echo "[run_gpu $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/bench.log"; }

: > "$OUT/bench.log"
log "GPU run in $ROOT, results in $OUT, git ${ANGEL_GIT_SHA:-unknown}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 \
  | tee -a "$OUT/bench.log"

# Carried pure-Python wheels (pytest, hypothesis, tqdm, ...) into a private site dir.
if compgen -G ".whl/*.whl" > /dev/null; then
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl > /dev/null 2>&1; then
    for w in .whl/*.whl; do  # one unsuitable wheel must not keep the others out
      "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$w" > /dev/null 2>&1 \
        || log "could not install $w"
    done
  fi
else
  log "no .whl/ wheels (run benchmarks/stage_peers.sh on the CPU machine): the test tier may not import"
fi
for d in .peers/vllm .peers/gemlite; do
  [ -d "$d" ] || log "missing $d (run benchmarks/stage_peers.sh): its peers will be skipped"
done
BASE_PATH="$ROOT:$ROOT/integration:$SITE${PYTHONPATH:+:$PYTHONPATH}"
# The staged vLLM is a stub package around its attention kernels: the tests must not mistake it for vLLM
# (an importorskip("vllm") would pass and then fail), so only the benchmarks see the staged peers.
PEERS_PATH="$ROOT/.peers/vllm:$ROOT/.peers/gemlite"

status=0

# 1. GPU test tier. Exit code 5 (nothing collected) is fine while the tier is empty.
log "pytest -m gpu (timeout ${T_TESTS}s)"
PYTHONPATH="$BASE_PATH" timeout -k 10 "$T_TESTS" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests \
  > "$OUT/tests.log" 2>&1
rc=$?
tail -n 15 "$OUT/tests.log"
case $rc in
  0) log "tests: passed" ;;
  5) log "tests: no GPU tests collected (ok)" ;;
  124|137) log "tests: TIMED OUT after ${T_TESTS}s"; status=1 ;;
  *) log "tests: FAILED (exit $rc)"; status=1 ;;
esac

# 2. Benchmarks, one family at a time; rows are written after every case, so a timeout keeps what was measured.
bench() {
  local limit=$1; shift
  log "$* (timeout ${limit}s)"
  PYTHONPATH="$ROOT:$ROOT/integration:$PEERS_PATH:$SITE${PYTHONPATH:+:$PYTHONPATH}" \
    timeout -k 10 "$limit" "$PY" "$@" --out "$OUT" 2>&1 | tee -a "$OUT/bench.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    log "$1: exit $rc$( [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo ' (timed out)')"
    status=1
  fi
}
# shellcheck disable=SC2086  # *_ARGS are word lists on purpose
bench "$T_GEMM" benchmarks/bench_gemm.py ${GEMM_ARGS:-}
# shellcheck disable=SC2086
bench "$T_ATTN" benchmarks/bench_attention.py ${ATTN_ARGS:-}
# shellcheck disable=SC2086
bench "$T_PREFILL" benchmarks/bench_prefill.py ${PREFILL_ARGS:-}
# shellcheck disable=SC2086
bench "$T_WRITE" benchmarks/bench_kv_write.py ${WRITE_ARGS:-}

# 3. The tables, last (from the JSON files, so they show whatever was measured before any timeout).
log "done (status $status); tables:"
shopt -s nullglob
files=("$OUT"/*/gemm.json "$OUT"/*/attention.json "$OUT"/*/prefill.json "$OUT"/*/kv_write.json)
if [ ${#files[@]} -gt 0 ]; then
  "$PY" benchmarks/harness.py table --metric us "${files[@]}"  # the % of floor tables are in bench.log
fi
exit $status
