#!/usr/bin/env bash
# The main job on the embedded defaults (bundled Flickr8k, MLflow on SQLite under outputs/).
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET=${HIVLP_DATASET:-data/flickr8k/dataset_flickr8k.json}
hivlp validate "$DATASET" --report outputs/validation/report.json
