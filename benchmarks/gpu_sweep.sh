#!/usr/bin/env bash
# Sweep of the speed levers of issue 8 on one lent GPU; every bench run appends one JSON line.
#
#   bash benchmarks/gpu_sweep.sh [PHASE ...]      # default: all phases, in priority order
#   DRY_RUN=1 bash benchmarks/gpu_sweep.sh        # print the commands only
#
# Phases are sized to fit one device call each (< 10 minutes; a 7B-shape run is ~1-2 minutes,
# mostly compilation and init), so a session with 30 minutes of device time runs them one per call,
# most important first:
#   headline  LLaMA-2-7B layer shapes (LAYERS layers), seq 4096: xla vs cudnn attention, the
#             matmul probe, and the PyTorch reference in the same process (the tokens/s ratio)
#   decode    full LLaMA-2-7B, prompt 512 + 256 new tokens, batch 1 and 32, vs transformers generate
#   remat     every remat policy (POLICIES) with $ATTN attention
#   fit       the largest LLaMA-2-7B-family configuration that trains in 80 GB (OOM is a result)
#   xla       latency-hiding scheduler, cuBLAS instead of Triton GEMMs
#   batch     batch 2 and 4, micro-batches, chunked cross-entropy, bf16 moments
# Results: $RESULTS (default $OUT/bench.jsonl on the device machine, else benchmarks/results/),
# stderr of every run in the .log beside it. Knobs (env): PY, PRESET, LAYERS, SEQ, STEPS, WARMUP,
# REMAT (policy after the remat phase), ATTN (attention after headline), RUN_TIMEOUT (seconds a
# run), MEM_FRACTION, PROBE (matmul size), POLICIES (remat phase), FIT_LAYERS (fit phase).
#
# On the device image (jax, torch, transformers, flax, optax present) ml_collections is missing:
# carry it as a wheel (see docs/benchmarks.md, "Speed (bench)").
set -u
cd "$(dirname "$0")/.."

PY=${PY:-python3}
PRESET=${PRESET:-llama2_7b}
LAYERS=${LAYERS:-8}
SEQ=${SEQ:-4096}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-2}
REMAT=${REMAT:-full}
ATTN=${ATTN:-cudnn}
RUN_TIMEOUT=${RUN_TIMEOUT:-420}
MEM_FRACTION=${MEM_FRACTION:-0.94}
RESULTS=${RESULTS:-${OUT:-benchmarks/results}/bench.jsonl}
LOG=${RESULTS%.jsonl}.log
mkdir -p "$(dirname "$RESULTS")"
export PYTHONUNBUFFERED=1
# Runs that repeat a configuration (the torch fallback, a second sweep) skip compilation.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/astrollama_jax_cache}

bench() {
  local cmd=("$PY" -m astrollama_jax.bench --preset="$PRESET" --steps="$STEPS" --warmup="$WARMUP"
             --out="$RESULTS" "$@")
  echo "+ ${cmd[*]}"
  [ -n "${DRY_RUN:-}" ] && return 0
  local start=$SECONDS
  timeout "$RUN_TIMEOUT" "${cmd[@]}" 2>>"$LOG" | sed '$d'  # the table, not the JSON line
  local rc=${PIPESTATUS[0]}
  # rc 3: the run finished and recorded an out-of-memory side; anything else is a failure.
  if [ "$rc" != 0 ] && [ "$rc" != 3 ]; then
    echo "  ! rc=$rc after $((SECONDS - start))s; see $LOG"
    printf '{"failed": true, "rc": %s, "command": "%s"}\n' "$rc" "${cmd[*]}" >>"$RESULTS"
  fi
  return 0
}

train() {  # 7B layer shapes at $LAYERS layers, sequence $SEQ
  bench --task=train --layers="$LAYERS" --seq="$SEQ" --mem_fraction="$MEM_FRACTION" "$@"
}

phase_headline() {
  train --batch=1 --attention=xla --remat=full --matmul_probe="${PROBE:-8192}"
  train --batch=1 --attention=cudnn --remat=full
  # Same process: torch first (then freed), then JAX. If the two CUDA stacks clash, the fallback
  # times each side in a process of its own.
  bench --task=train --layers="$LAYERS" --seq="$SEQ" --batch=1 --attention="$ATTN" --remat=full \
    --reference=torch --mem_fraction=0.85
  if [ -z "${DRY_RUN:-}" ] && ! tail -n 1 "$RESULTS" | grep -q '"reference"'; then
    train --batch=1 --attention="$ATTN" --remat=full --reference=torch_only
  fi
}

phase_decode() {
  for b in 1 32; do
    bench --task=decode --batch=$b --prompt_len=512 --new_tokens=256 --steps=3 --warmup=1 \
      --reference=torch --mem_fraction=0.85
  done
}

phase_remat() {
  for policy in ${POLICIES:-none minimal qkv_out dots_no_batch dots}; do
    train --batch=1 --attention="$ATTN" --remat=$policy
  done
}

phase_fit() {
  # Largest first; an out-of-memory run is recorded with "error": "out of memory".
  bench --task=train --layers=32 --seq="$SEQ" --batch=1 --attention="$ATTN" --remat=full \
    --param_dtype=bfloat16 --bf16_moments --ce_chunk=1024 --mem_fraction="$MEM_FRACTION" --steps=5
  for n in ${FIT_LAYERS:-32 28 24}; do
    bench --task=train --layers=$n --seq="$SEQ" --batch=1 --attention="$ATTN" --remat=full \
      --bf16_moments --ce_chunk=1024 --mem_fraction="$MEM_FRACTION" --steps=5
  done
}

phase_xla() {
  train --batch=1 --attention="$ATTN" --remat="$REMAT" --xla_flags=latency_hiding
  train --batch=1 --attention="$ATTN" --remat="$REMAT" --xla_flags=no_triton_gemm
}

phase_batch() {
  train --batch=2 --attention="$ATTN" --remat="$REMAT"
  train --batch=4 --attention="$ATTN" --remat="$REMAT" --ce_chunk=1024
  train --batch=4 --micro_batches=2 --attention="$ATTN" --remat="$REMAT"
  train --batch=2 --attention="$ATTN" --remat="$REMAT" --bf16_moments
}

phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(headline decode remat fit xla batch)
if [ -z "${DRY_RUN:-}" ]; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader | tee -a "$LOG"
  "$PY" -c "import ml_collections, jax, flax, optax; print('jax', jax.__version__, jax.devices())" ||
    { echo "missing Python packages (see the header of this script)"; exit 1; }
fi
for p in "${phases[@]}"; do
  if ! declare -F "phase_$p" >/dev/null; then
    echo "unknown phase '$p' (headline decode remat fit xla batch)" >&2
    exit 2
  fi
  echo "== phase $p ($(date +%T))"
  "phase_$p"
done
echo "results: $RESULTS"
