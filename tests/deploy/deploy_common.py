"""What the deployment checks share: the overlays, rendering them with `kubectl kustomize`, and
walking the rendered objects' pod templates and containers.

The overlays' secretGenerators read an admin token file the operator writes (never committed);
rendering copies deploy/ into a temporary folder and writes a random token there first.
"""
import copy
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(REPO, "deploy")
# Every kustomization an operator applies, relative to deploy/k8s.
KUSTOMIZATIONS = ["overlays/cpu-demo", "overlays/gpu-node", "overlays/mission",
                  "overlays/mission-rdma", "monitoring"]
# Kubernetes version the objects must be valid for: the oldest the overlays support (the
# StatefulSets' pod-index label is 1.28+; LeaderWorkerSet needs 1.26+).
KUBERNETES_VERSION = "1.30.0"


def project_version():
    with open(os.path.join(REPO, "CMakeLists.txt")) as f:
        match = re.search(r"project\(moeserve VERSION ([0-9.]+)", f.read())
    return match.group(1)


class Rendered:
    """The deploy/ tree copied to a temporary folder with admin tokens, and its renderings."""

    def __init__(self, kubectl="kubectl"):
        self.kubectl = kubectl
        self.root = tempfile.mkdtemp(prefix="moeserve-deploy-")
        self.deploy = os.path.join(self.root, "deploy")
        shutil.copytree(DEPLOY, self.deploy)
        self.tokens = {}
        for overlay in os.listdir(os.path.join(self.deploy, "k8s", "overlays")):
            token = secrets.token_hex(32)
            path = os.path.join(self.deploy, "k8s", "overlays", overlay, "admin-token")
            with open(path, "w") as f:
                f.write(token + "\n")
            self.tokens[overlay] = token

    def render(self, kustomization):
        """The objects `kubectl kustomize` renders for deploy/k8s/KUSTOMIZATION."""
        result = subprocess.run([self.kubectl, "kustomize", os.path.join(self.deploy, "k8s", kustomization)],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"kubectl kustomize {kustomization} failed:\n{result.stderr}")
        return [d for d in yaml.safe_load_all(result.stdout) if d]

    def render_text(self, kustomization):
        result = subprocess.run([self.kubectl, "kustomize", os.path.join(self.deploy, "k8s", kustomization)],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"kubectl kustomize {kustomization} failed:\n{result.stderr}")
        return result.stdout

    def close(self):
        shutil.rmtree(self.root, ignore_errors=True)


def pod_templates(obj):
    """(description, pod template) of every pod template an object holds."""
    kind = obj["kind"]
    name = obj["metadata"]["name"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield f"{kind}/{name}", obj["spec"]["template"]
    elif kind == "LeaderWorkerSet":
        template = obj["spec"]["leaderWorkerTemplate"]
        if "leaderTemplate" in template:
            yield f"{kind}/{name} leader", template["leaderTemplate"]
        yield f"{kind}/{name} workers", template["workerTemplate"]


def containers(obj):
    """(description, pod spec, container) of every container of an object's pod templates."""
    for where, template in pod_templates(obj):
        spec = template["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            yield f"{where} container {container['name']}", spec, container


def fail_summary(failures, checks):
    for failure in failures:
        print("FAIL", failure)
    print(f"{checks - len(failures)} passed, {len(failures)} failed")
    sys.exit(1 if failures else 0)
