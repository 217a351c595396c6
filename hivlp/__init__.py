"""hivlp: hierarchical vision-language embeddings for fast image-text retrieval.

The package import is deliberately light: torch, mlflow, kfp, pymilvus and great_expectations are
imported inside the functions that need them, so `hivlp --help` answers quickly.
"""

__version__ = "0.1.0"

# Default nested embedding levels: every prefix of these sizes is a usable embedding.
DEFAULT_LEVELS = (32, 64, 128, 256, 512)
