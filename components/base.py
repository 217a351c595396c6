"""What every component shares: the image it runs in, where things are inside it, and the cluster
settings fixed when the pipeline is compiled.

Compile-time environment (read here, pinned into the compiled YAML):
- `HIVLP_IMAGE`: the components' image, built from the repository's root Dockerfile (default: the
  release tag). The image already has the locked `kfp`, so components skip KFP's start-up
  `pip install kfp` (which also lets them start on clusters without internet access).
- `HIVLP_DATA_MOUNT`: where the data PersistentVolumeClaim is mounted in every data task (default
  `/data`). A compile-time string because kfp-kubernetes 2.17 takes the mount path as a constant
  (the claim's *name* is a run parameter, `data_pvc`).
- `HIVLP_MLFLOW_SECRET`, `HIVLP_OBJECT_STORE_SECRET`, `HIVLP_MILVUS_SECRET`: names of the Kubernetes
  secrets the credentials come from (defaults `hivlp-mlflow`, `hivlp-object-store`, `hivlp-milvus`).
  Only the names are in the YAML; every secret is optional, so a cluster without (say) MLflow auth
  runs without that secret.
"""

import functools
import os

from kfp import dsl

from hivlp import __version__

HIVLP_IMAGE = os.environ.get("HIVLP_IMAGE", f"ghcr.io/hivlp/hivlp:{__version__}")

# Paths inside the image (root Dockerfile: WORKDIR /app, `COPY configs/ configs/`);
# tests/test_pipeline.py checks them against the Dockerfile.
IMAGE_WORKDIR = "/app"
IMAGE_CONFIGS = f"{IMAGE_WORKDIR}/configs"

DATA_MOUNT = os.environ.get("HIVLP_DATA_MOUNT", "/data")

MLFLOW_SECRET = os.environ.get("HIVLP_MLFLOW_SECRET", "hivlp-mlflow")
OBJECT_STORE_SECRET = os.environ.get("HIVLP_OBJECT_STORE_SECRET", "hivlp-object-store")
MILVUS_SECRET = os.environ.get("HIVLP_MILVUS_SECRET", "hivlp-milvus")

# secret name -> {key in the secret: environment variable the code reads}
MLFLOW_ENV = {
    "username": "MLFLOW_TRACKING_USERNAME",
    "password": "MLFLOW_TRACKING_PASSWORD",
    "token": "MLFLOW_TRACKING_TOKEN",
}
# The MLflow artifact store (S3 or MinIO) that logged models and checkpoints go to.
OBJECT_STORE_ENV = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_S3_ENDPOINT_URL": "MLFLOW_S3_ENDPOINT_URL",
}
MILVUS_ENV = {"token": "MILVUS_TOKEN"}

SECRETS = {
    "mlflow": {MLFLOW_SECRET: MLFLOW_ENV, OBJECT_STORE_SECRET: OBJECT_STORE_ENV},
    "milvus": {MILVUS_SECRET: MILVUS_ENV},
}


def secret_env(kind: str) -> dict[str, list[str]]:
    """{env var: [secret name, key]} for `kind`: what a PyTorchJob's pods get as secretKeyRefs."""
    return {env: [name, key] for name, keys in SECRETS[kind].items() for key, env in keys.items()}


hivlp_component = functools.partial(dsl.component, base_image=HIVLP_IMAGE, install_kfp_package=False)
