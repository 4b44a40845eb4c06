"""deploy/ files parse and say what the README promises (no Docker engine or cluster runs here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _manifests() -> dict[str, dict]:
    found = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path
            found[doc["kind"]] = doc
    return found


def test_compose_has_every_service_and_a_gpu_worker():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "postgres", "s3", "worker", "producer", "flower"} <= set(services)
    worker = services["worker"]
    assert worker["command"][:3] == ["worker", "--device", "cuda:0"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    env = worker["environment"]
    assert env["SALIENT_BROKER_URL"].startswith("redis://redis:")
    assert env["SALIENT_OBJECT_STORE_URL"].startswith("s3://")
    for name in ("AWS_SECRET_ACCESS_KEY", "SALIENT_DATABASE_URL"):  # secrets only from the environment
        assert re.search(r"\$\{[A-Z0-9_]+:\?", env[name]), name
    assert "noeviction" in services["redis"]["command"]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["salient"]' in dockerfile


def test_k8s_gpu_worker_and_queue_length_autoscaling():
    manifests = _manifests()
    assert {"ConfigMap", "Secret", "Deployment", "ScaledObject", "Job"} <= set(manifests)
    deployment = manifests["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"][0] == "worker"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["terminationGracePeriodSeconds"] >= 60  # room for the warm shutdown
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    scaled = manifests["ScaledObject"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "redis"
    # Celery's Redis queue is a list named after the queue the workers consume.
    assert trigger["metadata"]["listName"] == manifests["ConfigMap"]["data"]["SALIENT_QUEUE"]
    assert int(trigger["metadata"]["listLength"]) > 0
