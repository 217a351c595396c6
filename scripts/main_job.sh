#!/usr/bin/env bash
# The main job on the embedded defaults (bundled Flickr8k, MLflow on SQLite under outputs/):
# validate -> pretrain -> finetune -> evaluate on val, run by `dvc repro` (dvc.yaml), so a re-run
# after no change is a no-op and a changed recipe re-runs only what depends on it.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
dvc repro
echo
echo "main job done in $(( $(date +%s) - start )) s; fine-tuned checkpoint: outputs/finetune"
python - <<'PY'
import json
from hivlp.retrieval.evaluate import format_table
print(format_table(json.load(open("outputs/metrics.json"))))
PY
