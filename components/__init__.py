"""Kubeflow Pipelines components: one lightweight component per stage, each a thin wrapper over `hivlp`.

Every component imports `hivlp` inside its body and calls library functions; all logic stays in the
package, so the CLI, DVC and the pipeline cannot disagree. The components run in the image built from
the root Dockerfile (`HIVLP_IMAGE`, see components/base.py).
"""

from components.base import HIVLP_IMAGE
from components.data import fingerprint_dataset, stage_dataset
from components.evaluate import evaluate
from components.export import export_shard, sample_queries, shard_indices
from components.index import index_embeddings
from components.promote import promote
from components.train import finetune, pretrain
from components.validate import require_valid, validate

__all__ = [
    "HIVLP_IMAGE",
    "evaluate",
    "export_shard",
    "fingerprint_dataset",
    "finetune",
    "index_embeddings",
    "pretrain",
    "promote",
    "require_valid",
    "sample_queries",
    "shard_indices",
    "stage_dataset",
    "validate",
]
