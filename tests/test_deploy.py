"""The KubeRay RayJob manifest (deploy/rayjob.yaml) against KubeRay's CRD field names, and its job command against our CLI.

No cluster needed: the manifest is parsed, every key is checked against the fields of
KubeRay's ``ray.io/v1`` types (``ray-operator/apis/ray/v1/rayjob_types.go`` and
``raycluster_types.go``, the json tags of ``RayJobSpec``, ``RayClusterSpec``,
``HeadGroupSpec`` and ``WorkerGroupSpec``), and the entrypoint is parsed by
``platform.sweep``'s own argument parser.
"""

from __future__ import annotations

import re
import shlex
from string import Template

import yaml

from conftest import REPO_ROOT
from platform.sweep import build_parser

MANIFEST = REPO_ROOT / "deploy" / "rayjob.yaml"
CLUSTER_DOC = REPO_ROOT / "docs" / "cluster.md"

# json tags of KubeRay's ray.io/v1 Go types (the CRD's field names).
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata", "clusterSelector",
               "submitterConfig", "managedBy", "deletionPolicy", "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode",
               "entrypointResources", "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
               "shutdownAfterJobFinishes", "suspend"}
RAYCLUSTER_SPEC = {"suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
                   "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs"}
HEAD_GROUP = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
HEAD_GROUP_REQUIRED = {"template", "rayStartParams"}
WORKER_GROUP = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "rayStartParams",
                "template", "scaleStrategy", "numOfHosts"}
WORKER_GROUP_REQUIRED = {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"}
# Kubernetes core/v1 fields this manifest uses (PodSpec, Container).
POD_SPEC = {"containers", "volumes", "tolerations", "nodeSelector", "affinity", "serviceAccountName", "imagePullSecrets"}
CONTAINER = {"name", "image", "resources", "env", "envFrom", "ports", "volumeMounts", "command", "args", "workingDir", "lifecycle"}

SAMPLE = {"MAVA_IMAGE": "registry.example.com/mava-platform:0.1.0", "MLFLOW_TRACKING_URI": "http://mlflow.mlflow.svc:5000",
          "MAVA_STORAGE_PATH": "s3://bucket/mava/ray", "MAVA_SWEEP_FILE": "search_spaces/paper-clip-vitb16.yaml",
          "GPU_WORKERS": "2", "GPUS_PER_POD": "1", "CPUS_PER_POD": "8", "MEMORY_PER_POD": "32Gi"}


def manifest() -> dict:
    return yaml.safe_load(Template(MANIFEST.read_text()).substitute(SAMPLE))


def test_the_rayjob_uses_only_kuberay_field_names():
    job = manifest()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC, set(cluster) - RAYCLUSTER_SPEC
    head = cluster["headGroupSpec"]
    assert HEAD_GROUP_REQUIRED <= set(head) <= HEAD_GROUP, set(head) ^ HEAD_GROUP
    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert WORKER_GROUP_REQUIRED <= set(group) <= WORKER_GROUP, set(group) ^ WORKER_GROUP
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for template in [head["template"]] + [g["template"] for g in groups]:
        assert set(template) == {"spec"} and set(template["spec"]) <= POD_SPEC, set(template["spec"]) - POD_SPEC
        for container in template["spec"]["containers"]:
            assert set(container) <= CONTAINER, set(container) - CONTAINER
            assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay's map[string]string


def test_the_worker_group_asks_for_gpus_and_the_head_for_none():
    cluster = manifest()["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    [gpu] = cluster["workerGroupSpecs"]
    [container] = gpu["template"]["spec"]["containers"]
    for side in ("requests", "limits"):
        assert container["resources"][side]["nvidia.com/gpu"] == SAMPLE["GPUS_PER_POD"]


def test_the_job_command_is_a_valid_sweep_command_with_the_variables():
    spec = manifest()["spec"]
    command = spec["entrypoint"].split("&&")[-1]
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "platform.sweep"]
    args = build_parser().parse_args(words[3:])
    assert (args.space, args.tracking_uri, args.storage_path) == (SAMPLE["MAVA_SWEEP_FILE"], SAMPLE["MLFLOW_TRACKING_URI"], SAMPLE["MAVA_STORAGE_PATH"])
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == SAMPLE["MLFLOW_TRACKING_URI"]  # also on every worker
    assert spec["rayClusterSpec"]["rayVersion"] == __import__("ray").__version__


def test_every_variable_of_the_manifest_is_documented():
    variables = set(re.findall(r"\$\{(\w+)\}", MANIFEST.read_text()))
    assert variables == set(SAMPLE)
    doc = CLUSTER_DOC.read_text()
    assert all(f"`{name}`" in doc for name in variables), [n for n in variables if f"`{n}`" not in doc]
