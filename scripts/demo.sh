#!/usr/bin/env bash
# The main job end to end on the bundled songs (examples/midi), on CPU:
# preprocess -> train a tiny BERT-neighbor on 2 ranks -> evaluate it and a random-init twin.
# Usage: scripts/demo.sh [RUN_DIR]   (make demo runs it with runs/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/demo}
mkdir -p "$RUN"

echo "== [1/4] preprocess examples/midi -> $RUN/shards"
# Small shards, so that 2 ranks x 1 data worker each read several.
python -m preprocess --src examples/midi --out "$RUN/shards" --workers 2 --shard-size 2 --overwrite

echo "== [2/4] train a tiny BERT-neighbor with torchrun on 2 CPU ranks (gloo)"
torchrun --standalone --nproc_per_node=2 train_ddp.py --config configs/demo.yaml \
    run_dir="$RUN/train" data.shards="$RUN/shards"

echo "== [3/4] evaluate: the seven probing metrics for every layer"
# 24 train and 3 test songs are few: draw 20 bars per train song and 40 per test song
# (the reference's 5 and 10 are for Lakh's ~13k test songs). One thread suits a tiny model.
EVAL=(--shards "$RUN/shards" --train-bars 20 --test-bars 40 --threads 1)
python -m musicbert.evaluate --checkpoint "$RUN/train" "${EVAL[@]}" --out "$RUN/eval/trained"
python -m musicbert.evaluate --checkpoint "$RUN/train" "${EVAL[@]}" --out "$RUN/eval/random" --random-init

echo "== [4/4] trained vs random-init"
python -m musicbert.evaluate --compare "$RUN/eval/trained/metrics.json" "$RUN/eval/random/metrics.json"
echo
echo "Figures: $RUN/eval/trained/layers.png   TensorBoard: tensorboard --logdir $RUN/train/tb"
