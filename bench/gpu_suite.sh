#!/usr/bin/env bash
# Everything that needs CUDA, in one command, about 8 minutes on one H100/H200-class GPU:
#   1. checks      bench/gpu_checks.py      fp16 + gradient scaler, --full_fp16, --full_bf16, xformers, SDPA's
#                                           memory-efficient kernel, attention backends with a hypernetwork,
#                                           8-bit optimizers, fp16 VAE latent caching (real sdtune train runs)
#   2. throughput  bench/gpu_throughput.py  real-size SD 1.5 (random weights), 512 px, batch 1/8/16, bf16,
#                                           eager and compiled: samples/s and model-FLOPs utilisation
#   3. memory      bench/gpu_memory.py      peak memory per memory option set beside the planner's prediction
# then one JSON summary (bench/gpu_summary.py). Each stage has a time limit, so a stuck stage still
# leaves the others' results and the summary.
#
#   bench/gpu_wheels.sh                       # here, once: the wheels the GPU machine lacks, into .whl/
#   bench/gpu_suite.sh                        # there, from the repository root (carry .whl)
#   bench/gpu_suite.sh --cpu-smoke            # anywhere: the same stages, tiny and on the CPU
#   bench/gpu_suite.sh --out DIR              # where the JSON lines go (default $OUT, else gpu_suite_out)
#
# The wheels are installed into a private folder on PYTHONPATH, never into the machine's Python.
set -u
cd "$(dirname "$0")/.."
MODE=gpu
DEST=${OUT:-gpu_suite_out}
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) MODE=cpu-smoke ;;
    --out) DEST=$2; shift ;;
    *) echo "gpu_suite.sh: unknown argument $1 (use --cpu-smoke, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
mkdir -p "$DEST"
: > "$DEST/stages.jsonl"
SITE=/tmp/sdtune-gpu-site
if [ "$MODE" = gpu ] && ls .whl/*.whl >/dev/null 2>&1; then  # (wheels for the GPU machine's Python only)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "gpu_suite.sh: installing the wheels of .whl/ failed" >&2; exit 1; }
  export PYTHONPATH="$SITE:$PWD/src"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
SMOKE=()
[ "$MODE" = cpu-smoke ] && SMOKE=(--cpu-smoke)

stage() {  # name, seconds allowed, script and its arguments
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== $name (at most ${limit}s)" >&2
  [ "$MODE" = cpu-smoke ] && limit=$((limit * 10))  # a CPU (a shared one, too) is far slower; the limits guard the GPU run
  timeout --kill-after=10 "$limit" "$PY" "$@" "${SMOKE[@]}" > "$DEST/$name.jsonl" 2> "$DEST/$name.log"
  rc=$?
  cat "$DEST/$name.jsonl"
  [ $rc -ne 0 ] && tail -5 "$DEST/$name.log" >&2
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start ))}" >> "$DEST/stages.jsonl"
}

stage checks 150 bench/gpu_checks.py
stage throughput 240 bench/gpu_throughput.py
stage memory 90 bench/gpu_memory.py
"$PY" bench/gpu_summary.py "$DEST" --mode "$MODE"
