#!/usr/bin/env bash
# Sweep of the speed levers on one GPU; every bench run appends one JSON line.
#
#   bash benchmarks/gpu_sweep.sh [PHASE ...]      # default: all phases, in priority order
#   DRY_RUN=1 bash benchmarks/gpu_sweep.sh        # print the commands only
#
# Each phase takes under 10 minutes (a 7B-shape run is ~1-2 minutes, mostly compilation and
# init), so the phases can run one at a time, most important first:
#   headline  LLaMA-2-7B layer shapes (LAYERS layers), seq 4096: xla vs cudnn attention, the
#             matmul probe, and the PyTorch reference in the same process (the tokens/s ratio)
#   decode    full LLaMA-2-7B, prompt 512 + 256 new tokens, batch 1 and 32, vs transformers generate
#   remat     every remat policy (POLICIES) with $ATTN attention
#   fit       the largest LLaMA-2-7B-family configuration that trains in 80 GB (OOM is a result)
#   xla       latency-hiding scheduler, cuBLAS instead of Triton GEMMs
#   batch     batch 2 and 4, micro-batches, chunked cross-entropy, bf16 moments
# Results: $RESULTS (default benchmarks/results/bench.jsonl), stderr of every run in the .log
# beside it. Each run is configs/bench.py:$PRESET with --config.* overrides (the trainer's config
# keys; see docs/benchmarks.md). Knobs (env): PY, PRESET, LAYERS, SEQ, STEPS, WARMUP, REMAT
# (policy after the remat phase), ATTN (attention after headline), RUN_TIMEOUT (seconds a run),
# MEM_FRACTION, PROBE (matmul size), POLICIES (remat phase), FIT_LAYERS (fit phase).
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
RESULTS=${RESULTS:-benchmarks/results/bench.jsonl}
LOG=${RESULTS%.jsonl}.log
mkdir -p "$(dirname "$RESULTS")"
export PYTHONUNBUFFERED=1
# Runs that repeat a configuration (the torch fallback, a second sweep) skip compilation.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/astrollama_jax_cache}

# The config keys the sweep varies.
B=--config.train.global_batch_size
ATT=--config.model.attention_impl
RM=--config.model.remat_policy
NL=--config.model.n_layers
BF16_MOMENTS=--config.optimizer.moments_dtype=bfloat16
CE=--config.loss.chunk_size

bench() {
  local cmd=("$PY" -m astrollama_jax bench --config="configs/bench.py:$PRESET" --steps="$STEPS"
             --warmup="$WARMUP" --output="$RESULTS" "$@")
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
  bench --task=train $NL="$LAYERS" --config.data.seq_len="$SEQ" --mem_fraction="$MEM_FRACTION" "$@"
}

phase_headline() {
  train $B=1 $ATT=xla $RM=full --matmul_probe="${PROBE:-8192}"
  train $B=1 $ATT=cudnn $RM=full
  # Same process: torch first (then freed), then JAX. If the two CUDA stacks clash, the fallback
  # times each side in a process of its own.
  bench --task=train $NL="$LAYERS" --config.data.seq_len="$SEQ" $B=1 $ATT="$ATTN" $RM=full \
    --reference=torch --mem_fraction=0.85
  if [ -z "${DRY_RUN:-}" ] && ! tail -n 1 "$RESULTS" | grep -q '"reference"'; then
    train $B=1 $ATT="$ATTN" $RM=full --reference=torch_only
  fi
}

phase_decode() {
  for b in 1 32; do
    bench --task=decode $B=$b --prompt_len=512 --new_tokens=256 --steps=3 --warmup=1 \
      --reference=torch --mem_fraction=0.85
  done
}

phase_remat() {
  for policy in ${POLICIES:-none minimal qkv_out dots_no_batch dots}; do
    train $B=1 $ATT="$ATTN" $RM=$policy
  done
}

phase_fit() {
  # Largest first; an out-of-memory run is recorded with "error": "out of memory".
  bench --task=train $NL=32 --config.data.seq_len="$SEQ" $B=1 $ATT="$ATTN" $RM=full \
    --config.model.param_dtype=bfloat16 $BF16_MOMENTS $CE=1024 --mem_fraction="$MEM_FRACTION" --steps=5
  for n in ${FIT_LAYERS:-32 28 24}; do
    bench --task=train $NL=$n --config.data.seq_len="$SEQ" $B=1 $ATT="$ATTN" $RM=full \
      $BF16_MOMENTS $CE=1024 --mem_fraction="$MEM_FRACTION" --steps=5
  done
}

phase_xla() {
  train $B=1 $ATT="$ATTN" $RM="$REMAT" --xla_flags=latency_hiding
  train $B=1 $ATT="$ATTN" $RM="$REMAT" --xla_flags=no_triton_gemm
}

phase_batch() {
  train $B=2 $ATT="$ATTN" $RM="$REMAT"
  train $B=4 $ATT="$ATTN" $RM="$REMAT" $CE=1024
  train $B=4 --config.train.grad_accum_steps=2 $ATT="$ATTN" $RM="$REMAT"
  train $B=2 $ATT="$ATTN" $RM="$REMAT" $BF16_MOMENTS
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
