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

# Training must have learnt something: the MLM loss of the last logged steps well below the first.
python - "$RUN/train/log.jsonl" <<'PY'
import json, sys
losses = [row["mlm_loss"] for row in map(json.loads, open(sys.argv[1])) if "kind" not in row]
first, last = losses[0], sum(losses[-5:]) / len(losses[-5:])
print(f"MLM loss: {first:.3f} at the first logged step -> {last:.3f} (mean of the last 5 logged)")
sys.exit(0 if last < 0.8 * first else f"MLM loss did not fall below 80% of its start ({last:.3f} vs {first:.3f})")
PY

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
