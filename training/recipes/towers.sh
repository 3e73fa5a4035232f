#!/usr/bin/env bash
# The user-tower comparison of docs/evaluation.md ("The user tower"), one dataset per call:
#
#   training/recipes/towers.sh amazon-beauty-2014 [RUNS_DIR]
#
# For the pooled tower (the default) and the text tower, each with seed 0 and the same budget:
# fine-tune the encoder through that tower (ENCODER_STEPS steps of 64 pairs, default 550: about
# 25 min on 2 quiet cores; a step budget, so that other work on the machine changes the wall time
# and not the result), train the full ranker on it, then one
# evaluation of everything on the same 5,000 users (both protocols), with a paired bootstrap of
# ranker-full-pooled against ranker-full-text. Steps whose output exists are skipped, so a cut run
# resumes. Writes RUNS_DIR/towers-NAME/ (default RUNS_DIR: runs); the report is
# RUNS_DIR/towers-NAME/eval/NAME.{full,sampled-100}.{md,json,png}.
set -euo pipefail
name=${1:?usage: towers.sh DATASET [RUNS_DIR]}
runs=${2:-runs}
semrank=${SEMRANK:-.venv/bin/semrank}
steps=${ENCODER_STEPS:-550}
out=$runs/towers-$name
data=$runs/data/$name
mkdir -p "$out"
log() { echo "[$(date -u +%H:%M:%S)] $name: $*"; }

[ -f "$data/summary.json" ] || { log "import"; $semrank data import "$name" --out "$data"; }
for tower in pooled text; do
  if [ ! -f "$out/enc-$tower/encoder/training.json" ] || ! grep -q '"status": "finished"' "$out/enc-$tower/encoder/training.json"; then
    log "encoder through the $tower tower ($steps steps)"
    $semrank train encoder --data "$data" --out "$out/enc-$tower" --tower "$tower" --max-steps "$steps" \
        --max-minutes 120 --seed 0
  fi
  if [ ! -f "$out/rank-$tower/ranker.txt" ]; then
    log "full ranker on the $tower tower"
    rm -rf "$out/rank-$tower" && mkdir -p "$out/rank-$tower"
    cp -r "$out/enc-$tower/encoder" "$out/rank-$tower/"
    $semrank train ranker --data "$data" --out "$out/rank-$tower" --variant full --seed 0 \
        --embedding-cache "$out/eval/cache/embeddings"
  fi
done
log "evaluation"
$semrank eval --data "$data" --protocol both --users 5000 --seed 0 --out-dir "$out/eval" \
    --tower pooled --tower text \
    --encoder encoder-finetuned-pooled="$out/enc-pooled/encoder" --encoder encoder-finetuned-text="$out/enc-text/encoder" \
    --ranker ranker-full-pooled="$out/rank-pooled" --ranker ranker-full-text="$out/rank-text" \
    --compare ranker-full-pooled:ranker-full-text --compare encoder-finetuned-pooled:encoder-finetuned-text
log "done: $out/eval"
