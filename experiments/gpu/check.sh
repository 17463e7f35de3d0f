#!/usr/bin/env bash
# One GPU check of jqlm's kernels and throughput, in at most ~8 minutes on
# one H100/H200: the gpu-marked tests, a tile tune, `jqlm bench matmul`,
# `jqlm bench generate` (LLaMA-3-8B shapes) and `jqlm bench train`
# (LLaMA-1B shapes, bf16 AdamW and Q-GaLore's int8 weights; then bf16 vs the
# fp8_rowwise recipe, native fp8 dots: issue 18). Writes JSON and
# markdown tables into OUTDIR (summary.md collects them).
#
#   experiments/gpu/check.sh OUTDIR            # on the GPU machine
#   experiments/gpu/check.sh --dry-run OUTDIR  # the same steps on CPU with
#                                              # tiny shapes (CI runs this)
#
# The GPU machines carry Python 3.12 with jax (cuda), flax, optax,
# orbax-checkpoint, chex, pytest, torch, triton and tokenizers, and have no
# network. jqlm needs nothing else for these steps: it runs from this
# checkout (PYTHONPATH, no install), `datasets` is imported only by the
# training data pipeline (the benchmarks use random tokens), and the
# jax-triton rows are left out without `jax_triton`. To include them, or
# any other missing package, download Python 3.12 manylinux wheels here
# beforehand and carry them:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl jax-triton==0.3.1
# and start the device command with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site
# Each step has its own time limit; a step that fails or times out is
# reported in summary.md and the next one runs.
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT="${1:?usage: experiments/gpu/check.sh [--dry-run] OUTDIR}"
mkdir -p "$OUT"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${PYTHON:-python3}"

# jqlm and jqlm_kernels from this checkout, uninstalled
PKGS="$(mktemp -d)"
ln -s "$ROOT/kernels" "$PKGS/jqlm_kernels"
export PYTHONPATH="$ROOT:$PKGS${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export JQLM_TILES="$OUT/tiles.json"

if [[ $DRY == 1 ]]; then
  export JAX_PLATFORMS=cpu
  TESTS=(tests/kernels/test_lowering.py -k "int8 and channel-16")
  TUNE=(--shapes tiny --ms 1 --interpret --iters 1 --budget 4)
  MATMUL=(--shapes tiny --ms 16 --interpret --iters 1)
  GEN=(--preset llama_tiny --batches 1 --prompt-len 16 --new-tokens 8
       --iters 1 --caches bfloat16)
  TRAIN=(--preset llama_tiny --batch 2 --seq-len 16 --iters 1 --rank 8)
  RECIPES=(--preset llama_tiny --batch 2 --seq-len 16 --iters 1)
  LIMITS=(120 120 120 120 120 120)
else
  TESTS=(-m gpu tests)
  TUNE=(--shapes 8b --ms 1,256 --iters 10 --budget 80)
  MATMUL=(--shapes 8b --ms 1,16,256,4096 --iters 10)
  GEN=(--batches 1,8 --prompt-len 128 --new-tokens 128 --iters 3)
  TRAIN=(--preset llama_1b --batch 8 --seq-len 2048 --iters 5 --rank 256
         --remat)
  RECIPES=(--preset llama_1b --batch 8 --seq-len 2048 --iters 3 --remat)
  LIMITS=(60 90 120 120 90 80)
fi

SUMMARY="$OUT/summary.md"
{
  echo "# jqlm GPU check ($( [[ $DRY == 1 ]] && echo dry run, CPU || echo GPU ))"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
  "$PY" -c "import jax; print('- jax', jax.__version__, '|', jax.devices()[0].device_kind, 'x', jax.device_count())" 2>&1
  echo
} > "$SUMMARY"

step() {  # step NAME LIMIT CMD...
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log"
  local status="ok"
  [[ $rc == 124 ]] && status="timed out"
  [[ $rc != 0 && $rc != 124 ]] && status="failed (rc $rc)"
  echo "- $name: $status in $((SECONDS - t0)) s" >> "$SUMMARY"
  [[ $rc == 0 ]]
}

cd "$ROOT"
step tests "${LIMITS[0]}" "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
step tune "${LIMITS[1]}" "$PY" -m jqlm.cli bench matmul --tune \
  --tiles "$JQLM_TILES" --json "$OUT/tune.json" "${TUNE[@]}"
step matmul "${LIMITS[2]}" "$PY" -m jqlm.cli bench matmul \
  --json "$OUT/matmul.json" "${MATMUL[@]}"
step generate "${LIMITS[3]}" "$PY" -m jqlm.cli bench generate \
  --json "$OUT/generate.json" "${GEN[@]}"
step train "${LIMITS[4]}" "$PY" -m jqlm.cli bench train \
  --json "$OUT/train.json" "${TRAIN[@]}"
step recipes "${LIMITS[5]}" "$PY" -m jqlm.cli bench train --recipes \
  --case fp8_rowwise --json "$OUT/recipes.json" "${RECIPES[@]}"

{
  echo
  for t in tune matmul generate train recipes; do
    [[ -f "$OUT/$t.md" ]] && { echo "## $t"; echo; cat "$OUT/$t.md"; echo; }
  done
} >> "$SUMMARY"
rm -rf "$PKGS"
echo "wrote $SUMMARY"
! grep -q "failed\|timed out" "$SUMMARY"
