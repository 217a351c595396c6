"""Training across nodes: a recipe run as a Kubeflow PyTorchJob (Training Operator v1), launched and awaited.

Why this shape:
- Every pod runs the same `hivlp pretrain|finetune` as a laptop does, under `torchrun`. The job has a
  `Master` replica (rank 0) and `workers - 1` `Worker` replicas; with a Master the operator sets
  MASTER_ADDR/MASTER_PORT, WORLD_SIZE, RANK and the PET_* variables torchrun reads, so the command
  carries no rendezvous flags. `hivlp.train.distributed` picks nccl on GPUs and gloo on CPU, and the
  trainer gathers embeddings across ranks, so N pods train the objective of one process at the same
  global batch.
- `nprocPerNode` is set explicitly (the pod's GPU count, 1 on CPU): torchrun's default "auto" starts
  one process per CPU core on a CPU node.
- All pods mount the data volume (a PersistentVolumeClaim, ReadWriteMany when pods land on several
  nodes) at the same path as the launching pod: the dataset, the trunk-feature cache rank 0 fills for
  the others, the resume state (so a pod restarted by `restartPolicy: OnFailure` resumes instead of
  starting over) and the checkpoint rank 0 publishes, under `<mount>/runs/<job name>/`.
- The launcher (the pipeline's training task) waits for `Succeeded`, verifies the checkpoint, copies
  it out (the pipeline's Model artifact is the durable copy) and removes the job's folder. A failed or
  timed-out job is one error line naming the job and the `kubectl` command for its logs; its pods and
  folder are kept for that.

Credentials reach the pods as `secretKeyRef` env vars (the secret names, never values, are in the
job spec). `kubeflow.training` is imported only when a job is actually launched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hivlp.errors import HivlpError, UsageError
from hivlp.model.checkpoint import copy_checkpoint, read_meta, verify_checkpoint
from hivlp.redact import redact
from hivlp.train.trainer import TrainResult, run_recipe

log = logging.getLogger(__name__)

RECIPES = ("pretrain", "finetune")
CONTAINER = "pytorch"  # the operator finds the training container by this name
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class ClusterJobError(HivlpError):
    """The PyTorchJob failed, timed out, or left no complete checkpoint."""


@dataclass(frozen=True)
class ClusterTraining:
    """What shapes the PyTorchJob. `image` and `namespace` default to the launching pod's own
    ($HIVLP_IMAGE, $POD_NAMESPACE or the service account's namespace)."""

    workers: int = 2  # pods: one Master and workers - 1 Workers
    gpus_per_worker: int = 0  # nvidia.com/gpu per pod; also processes per pod (1 on CPU)
    cpu: str = "8"
    memory: str = "32G"
    data_pvc: str = "hivlp-data"
    data_mount: str = "/data"
    secret_env: dict[str, tuple[str, str]] = field(default_factory=dict)  # env var -> (secret, key)
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    image: str = ""
    namespace: str = ""
    timeout_s: int = 12 * 3600
    backoff_limit: int = 3  # pod restarts (OnFailure) before the job fails
    ttl_after_finished_s: int = 7 * 24 * 3600  # the operator deletes the finished job (and pods) then
    shm_size: str = "2Gi"  # /dev/shm for DataLoader workers (the container default is 64M)
    poll_s: int = 30

    def __post_init__(self) -> None:
        if self.workers < 2:
            raise UsageError(f"train_workers={self.workers}: a PyTorchJob needs at least 2 pods (1 trains in the pod)")
        if self.gpus_per_worker < 0:
            raise UsageError(f"worker_gpus={self.gpus_per_worker}: must be 0 (CPU) or more")
        if not Path(self.data_mount).is_absolute():
            raise UsageError(f"data mount {self.data_mount!r} must be an absolute path")

    @property
    def nproc_per_node(self) -> int:
        return max(1, self.gpus_per_worker)

    def resolved(self) -> ClusterTraining:
        """The same settings with the image and namespace filled in from the launching pod."""
        from dataclasses import replace

        image = self.image or os.environ.get("HIVLP_IMAGE", "")
        if not image:
            raise UsageError("no image for the PyTorchJob: set $HIVLP_IMAGE in the launching pod (the pipeline "
                             "does) or pass the image")
        namespace = self.namespace or os.environ.get("POD_NAMESPACE", "")
        if not namespace and Path(SA_NAMESPACE_FILE).is_file():
            namespace = Path(SA_NAMESPACE_FILE).read_text().strip()
        if not namespace:
            raise UsageError("no namespace for the PyTorchJob: set $POD_NAMESPACE (the pipeline does) or pass it")
        return replace(self, image=image, namespace=namespace)


def job_name(recipe: str) -> str:
    """A fresh DNS-1123 name per launch (a relaunch never collides with a kept, failed job)."""
    return f"hivlp-{recipe}-{uuid.uuid4().hex[:8]}"


def training_args(
    recipe: str,
    config: str,
    out_dir: str | Path,
    datasets: Sequence[str],
    image_root: str | None = None,
    overrides: Sequence[str] = (),
    init: str | Path | None = None,
) -> list[str]:
    """`hivlp <recipe> ...` as torchrun runs it in every pod: `torchrun -m hivlp <these args>`."""
    if recipe not in RECIPES:
        raise UsageError(f"recipe {recipe!r}: choose one of {list(RECIPES)}")
    if (recipe == "finetune") != (init is not None):
        raise UsageError("finetune needs the pre-trained checkpoint (init); pretrain takes none")
    args = [recipe, "--config", str(config), "--out", str(out_dir)]
    for d in datasets:
        args += ["--dataset", str(d)]
    if image_root:
        args += ["--image-root", str(image_root)]
    for o in overrides:
        args += ["--set", o]
    if init is not None:
        args += ["--init", str(init)]
    return args


def build_pytorchjob(name: str, spec: ClusterTraining, args: Sequence[str]) -> Any:
    """The PyTorchJob object (kubeflow-training models) for `torchrun -m hivlp <args>` on `spec.workers` pods."""
    from kubeflow.training import (
        KubeflowOrgV1PyTorchJob,
        KubeflowOrgV1PyTorchJobSpec,
        KubeflowOrgV1ReplicaSpec,
        KubeflowOrgV1RunPolicy,
    )
    from kubernetes.client import (
        V1Container,
        V1EmptyDirVolumeSource,
        V1EnvVar,
        V1EnvVarSource,
        V1ObjectMeta,
        V1PersistentVolumeClaimVolumeSource,
        V1PodSpec,
        V1PodTemplateSpec,
        V1ResourceRequirements,
        V1SecretKeySelector,
        V1Volume,
        V1VolumeMount,
    )

    limits = {"cpu": spec.cpu, "memory": spec.memory}
    if spec.gpus_per_worker:
        limits["nvidia.com/gpu"] = str(spec.gpus_per_worker)
    env = [V1EnvVar(name=k, value=v) for k, v in spec.env.items()]
    env += [
        # optional: a cluster without, say, MLflow auth runs without that secret.
        V1EnvVar(name=var, value_from=V1EnvVarSource(
            secret_key_ref=V1SecretKeySelector(name=secret, key=key, optional=True)))
        for var, (secret, key) in spec.secret_env.items()
    ]
    labels = {"app.kubernetes.io/name": "hivlp", **spec.labels}
    container = V1Container(
        name=CONTAINER,
        image=spec.image,
        command=["torchrun"],
        args=["-m", "hivlp", *args],
        env=env,
        resources=V1ResourceRequirements(requests=dict(limits), limits=dict(limits)),
        volume_mounts=[V1VolumeMount(name="data", mount_path=spec.data_mount),
                       V1VolumeMount(name="dshm", mount_path="/dev/shm")],
    )
    template = V1PodTemplateSpec(
        metadata=V1ObjectMeta(labels=labels, annotations={"sidecar.istio.io/inject": "false"}),
        spec=V1PodSpec(containers=[container], volumes=[
            V1Volume(name="data", persistent_volume_claim=V1PersistentVolumeClaimVolumeSource(claim_name=spec.data_pvc)),
            V1Volume(name="dshm", empty_dir=V1EmptyDirVolumeSource(medium="Memory", size_limit=spec.shm_size)),
        ]),
    )
    replicas = {"Master": KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy="OnFailure", template=template)}
    replicas["Worker"] = KubeflowOrgV1ReplicaSpec(replicas=spec.workers - 1, restart_policy="OnFailure", template=template)
    return KubeflowOrgV1PyTorchJob(
        api_version="kubeflow.org/v1",
        kind="PyTorchJob",
        metadata=V1ObjectMeta(name=name, namespace=spec.namespace, labels=labels),
        spec=KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(spec.nproc_per_node),
            pytorch_replica_specs=replicas,
            run_policy=KubeflowOrgV1RunPolicy(
                clean_pod_policy="None", backoff_limit=spec.backoff_limit,
                active_deadline_seconds=spec.timeout_s, ttl_seconds_after_finished=spec.ttl_after_finished_s,
            ),
        ),
    )


def job_dict(job: Any) -> dict[str, Any]:
    """The job as the JSON the Kubernetes API receives (camelCase keys)."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(job)


def _master_log_tail(client: Any, name: str, namespace: str, lines: int = 20) -> str:
    """The last lines of rank 0's log, if the client can fetch them (best effort: the error must come
    out even when the logs cannot)."""
    try:
        logs, _ = client.get_job_logs(name, namespace=namespace, job_kind="PyTorchJob", is_master=True)
    except Exception:  # noqa: BLE001 - any failure here must not hide the job's own failure
        return ""
    text = "\n".join(str(v) for v in (logs or {}).values())
    return redact("\n".join(text.strip().splitlines()[-lines:]))


def run_pytorchjob(job: Any, client: Any = None, timeout_s: int = 12 * 3600, poll_s: int = 30) -> Any:
    """Create the job and wait until it succeeds; ClusterJobError (one line, then rank 0's last log lines)
    when it fails or runs out of time. `client`: a `kubeflow.training.TrainingClient` (default: in-cluster)."""
    name, namespace = job.metadata.name, job.metadata.namespace
    if client is None:
        from kubeflow.training import TrainingClient

        client = TrainingClient(namespace=namespace)
    client.create_job(job=job)
    log.info("PyTorchJob %s/%s created; waiting for it (up to %.1f h)", namespace, name, timeout_s / 3600)
    try:
        return client.wait_for_job_conditions(
            name, namespace=namespace, job_kind="PyTorchJob", expected_conditions={"Succeeded"},
            wait_timeout=timeout_s, polling_interval=poll_s,
        )
    except (RuntimeError, TimeoutError) as e:
        what = "did not finish in time" if isinstance(e, TimeoutError) else "failed"
        tail = _master_log_tail(client, name, namespace)
        raise ClusterJobError(
            f"PyTorchJob {namespace}/{name} {what}; its pods are kept: "
            f"kubectl -n {namespace} logs {name}-master-0" + (f"\nlast lines of rank 0:\n{tail}" if tail else "")
        ) from None


def train_on_cluster(
    recipe: str,
    out_dir: str | Path,
    spec: ClusterTraining,
    config: str,
    datasets: Sequence[str],
    image_root: str | None = None,
    overrides: Sequence[str] = (),
    init: str | Path | None = None,
    client: Any = None,
) -> TrainResult:
    """Run a recipe as a PyTorchJob and put its checkpoint (and history.json) at `out_dir`, as an in-pod
    `run_recipe(..., keep_resume_state=False)` would. `init` (finetune) is copied onto the data volume
    first, so every pod can read it."""
    t0 = time.time()
    spec = spec.resolved()
    name = job_name(recipe)
    run_dir = Path(spec.data_mount) / "runs" / name
    job_out = run_dir / recipe
    init_on_volume = None
    if init is not None:
        init_on_volume = copy_checkpoint(init, run_dir / "init")
    # The trunk-feature cache: filled by rank 0, read by the other pods, gone with the run's folder.
    sets = [*overrides, f"train.cache_dir={json.dumps(str(run_dir / 'cache'))}"]
    args = training_args(recipe, config, job_out, datasets, image_root, sets, init_on_volume)
    job = build_pytorchjob(name, spec, args)
    run_pytorchjob(job, client=client, timeout_s=spec.timeout_s, poll_s=spec.poll_s)

    try:
        verify_checkpoint(job_out)
    except UsageError as e:
        raise ClusterJobError(f"PyTorchJob {spec.namespace}/{name} succeeded but left no complete checkpoint: {e}") from None
    out = Path(out_dir)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # KFP may create the artifact folder; copy_checkpoint makes its own
    copy_checkpoint(job_out, out)
    history: list[dict] = []
    if (job_out / "history.json").is_file():
        shutil.copy2(job_out / "history.json", out / "history.json")
        history = json.loads((job_out / "history.json").read_text())
    meta = read_meta(out)
    shutil.rmtree(run_dir, ignore_errors=True)
    best = float(meta.get("metrics", {}).get("full", {}).get("r_mean", float("nan")))
    return TrainResult(out_dir=out, best_metric=best, best_epoch=int(meta.get("epoch", 0)), history=history,
                       seconds=time.time() - t0, run_id=meta.get("mlflow_run_id") or None, step_losses=[])


def train_recipe(
    recipe: str,
    out_dir: str | Path,
    config: str,
    datasets: Sequence[str],
    image_root: str | None = None,
    overrides: Sequence[str] = (),
    init: str | Path | None = None,
    tracking_uri: str | None = None,
    cluster: ClusterTraining | None = None,
    client: Any = None,
) -> TrainResult:
    """Train a recipe into `out_dir`: in this process when `cluster` is None (what `train_workers=1`
    means in the pipeline), else as a PyTorchJob of `cluster.workers` pods. The checkpoint alone is kept
    (no resume state), so `out_dir` is a model artifact either way."""
    if cluster is None:
        if tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        return run_recipe(config, out_dir, recipe, datasets=list(datasets), image_root=image_root,
                          overrides=list(overrides), init=init, keep_resume_state=False)
    if tracking_uri:
        from dataclasses import replace

        cluster = replace(cluster, env={**cluster.env, "MLFLOW_TRACKING_URI": tracking_uri})
    return train_on_cluster(recipe, out_dir, cluster, config, datasets, image_root, overrides, init, client)
