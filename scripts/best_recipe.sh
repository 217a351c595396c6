#!/usr/bin/env bash
# The best recipe (configs/best-*.yaml): pretrain -> finetune -> evaluate on val, into outputs/best/.
# Same engine and commands as the main job; a larger image tower, so about twice its feature caching.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
hivlp pretrain --config configs/best-pretrain.yaml --out outputs/best/pretrain --no-resume
hivlp finetune --config configs/best-finetune.yaml --init outputs/best/pretrain --out outputs/best/finetune --no-resume
hivlp evaluate --checkpoint outputs/best/finetune --dataset data/flickr8k/dataset_flickr8k.json --split val \
  --out outputs/best/metrics.json
echo
echo "best recipe done in $(( $(date +%s) - start )) s; checkpoint: outputs/best/finetune"
