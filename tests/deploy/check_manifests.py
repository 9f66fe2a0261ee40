"""Renders every kustomization under deploy/k8s with `kubectl kustomize` and checks what comes
out: each object strictly against the Kubernetes OpenAPI schema (kubernetes-validate), the
LeaderWorkerSet and Prometheus Operator objects against the JSON Schemas in schemas/ (written
from those projects' API references; their pod templates against Kubernetes' own), and the
properties the deployment promises: pinned images of this version, security contexts, probes
by health service name, generated (never literal) secrets, one source for the alert rules and
the dashboards, and front ends and EPLB controllers that cover every group.

Usage: check_manifests.py KUBECTL
       check_manifests.py --write-prometheus-rule   (regenerates the PrometheusRule from
                                                     deploy/prometheus/rules.yml)
"""
import json
import os
import re
import sys

import yaml

try:  # from build/deploy-venv (scripts/deploy-venv.sh); --write-prometheus-rule needs neither
    import jsonschema
    import kubernetes_validate
except ImportError:
    jsonschema = kubernetes_validate = None

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploy_common  # noqa: E402
from deploy_common import DEPLOY, KUSTOMIZATIONS, KUBERNETES_VERSION  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMAS = {
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.json",
}
PROMETHEUS_RULE = os.path.join(DEPLOY, "k8s", "monitoring", "prometheusrule.yaml")
RULE_HEADER = """# Generated from deploy/prometheus/rules.yml, the one source of the rules: do not edit here.
# After changing rules.yml, regenerate with
#   python3 tests/deploy/check_manifests.py --write-prometheus-rule
# (the deploy tests fail while the two differ). Prometheus selects PrometheusRules by label
# (its ruleSelector): add the label yours expects, e.g. release: <its Helm release>.
"""


def expected_prometheus_rule():
    with open(os.path.join(DEPLOY, "prometheus", "rules.yml")) as f:
        rules = yaml.safe_load(f)
    obj = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
           "metadata": {"name": "moeserve", "labels": {"app.kubernetes.io/part-of": "moeserve"}},
           "spec": {"groups": rules["groups"]}}
    return RULE_HEADER + yaml.safe_dump(obj, sort_keys=False, width=100)


def camel(name):
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def args_of(container):
    return list(container.get("command", [])[1:]) + list(container.get("args", []))


def flag(arguments, name):
    """The value of --name=VALUE among arguments (the first), or None."""
    for argument in arguments:
        if argument.startswith(f"--{name}="):
            return argument.split("=", 1)[1]
    return None


class Checker:
    def __init__(self):
        self.failures = []
        self.checks = 0

    def check(self, condition, message):
        self.checks += 1
        if not condition:
            self.failures.append(message)
        return condition


def validate_kubernetes(checker, where, obj):
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        checker.check(True, "")
    except kubernetes_validate.ValidationError as error:
        checker.check(False, f"{where}: not valid for Kubernetes {KUBERNETES_VERSION}: {error.message} "
                             f"at {'/'.join(str(p) for p in error.path)}")


def validate_object(checker, where, obj, schemas):
    key = (obj["apiVersion"], obj["kind"])
    if key in schemas:
        errors = sorted(jsonschema.Draft202012Validator(schemas[key]).iter_errors(obj), key=str)
        checker.check(not errors, f"{where}: " + "; ".join(
            f"{e.message} at {'/'.join(str(p) for p in e.path)}" for e in errors[:5]))
        for part, template in deploy_common.pod_templates(obj):
            validate_kubernetes(checker, f"{where} ({part} pod template)",
                                {"apiVersion": "v1", "kind": "PodTemplate",
                                 "metadata": {"name": obj["metadata"]["name"]}, "template": template})
        return
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        checker.check(True, "")
    except kubernetes_validate.SchemaNotFoundError:
        checker.check(False, f"{where}: no schema for {key} (neither Kubernetes' nor one in schemas/)")
    except kubernetes_validate.ValidationError as error:
        checker.check(False, f"{where}: not valid for Kubernetes {KUBERNETES_VERSION}: {error.message} "
                             f"at {'/'.join(str(p) for p in error.path)}")


def check_strictness(checker, schemas):
    """The validators reject what they should: an unknown field, a wrong type."""
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"selector": {"matchLabels": {"a": "b"}}, "replicass": 2,
                    "template": {"metadata": {"labels": {"a": "b"}},
                                 "spec": {"containers": [{"name": "c", "image": "i"}]}}}}
    try:
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)
        checker.check(False, "kubernetes-validate accepted an unknown field (replicass)")
    except kubernetes_validate.ValidationError:
        checker.check(True, "")
    lws = {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet", "metadata": {"name": "x"},
           "spec": {"startupPolicy": "LeaderCreatd",
                    "leaderWorkerTemplate": {"size": "4", "workerTemplate": {"spec": {}}}}}
    errors = list(jsonschema.Draft202012Validator(schemas[("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")])
                  .iter_errors(lws))
    checker.check(len(errors) == 2, f"the LeaderWorkerSet schema should reject a bad enum and a string size: {errors}")


def check_containers(checker, name, objects, version):
    for obj in objects:
        for where, template in deploy_common.pod_templates(obj):
            spec = template["spec"]
            where = f"{name}: {where}"
            pod_security = spec.get("securityContext", {})
            checker.check(pod_security.get("runAsNonRoot") is True and isinstance(pod_security.get("runAsUser"), int)
                          and pod_security.get("runAsUser", 0) >= 10000,
                          f"{where}: the pod must run as a numeric non-root user (>= 10000)")
            checker.check(pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault",
                          f"{where}: seccompProfile RuntimeDefault")
            checker.check(spec.get("automountServiceAccountToken") is False,
                          f"{where}: no service account token")
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for container in spec["containers"]:
                cwhere = f"{where} container {container['name']}"
                image = container["image"]
                gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
                expected = f"moeserve-cuda:{version}" if gpus else f"moeserve:{version}"
                checker.check(image == expected, f"{cwhere}: image {image}, expected {expected}")
                checker.check(container.get("imagePullPolicy") == "IfNotPresent",
                              f"{cwhere}: imagePullPolicy IfNotPresent (images loaded without a registry)")
                security = container.get("securityContext", {})
                checker.check(security.get("allowPrivilegeEscalation") is False, f"{cwhere}: allowPrivilegeEscalation false")
                checker.check(security.get("readOnlyRootFilesystem") is True, f"{cwhere}: readOnlyRootFilesystem true")
                checker.check(security.get("capabilities", {}).get("drop") == ["ALL"], f"{cwhere}: drop ALL capabilities")
                added = security.get("capabilities", {}).get("add", [])
                checker.check(set(added) <= ({"IPC_LOCK"} if gpus else set()),
                              f"{cwhere}: adds {added}; only GPU ranks may add IPC_LOCK")
                resources = container.get("resources", {})
                for kind in ("cpu", "memory"):
                    checker.check(kind in resources.get("requests", {}) and kind in resources.get("limits", {}),
                                  f"{cwhere}: {kind} request and limit")
                mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
                checker.check("/tmp" in mounts and "emptyDir" in volumes.get(mounts.get("/tmp"), {}),
                              f"{cwhere}: a writable /tmp (emptyDir) beside the read-only root")
                if gpus:
                    shm = volumes.get(mounts.get("/dev/shm"), {}).get("emptyDir", {})
                    checker.check(shm.get("medium") == "Memory", f"{cwhere}: /dev/shm as a memory emptyDir")
                    checker.check("IPC_LOCK" in added, f"{cwhere}: GPU ranks keep IPC_LOCK")
                    env = {e["name"] for e in container.get("env", [])}
                    checker.check("NCCL_SOCKET_IFNAME" in env, f"{cwhere}: NCCL_SOCKET_IFNAME set")
                arguments = args_of(container)
                subcommand = arguments[0] if arguments else ""
                if subcommand in ("frontend", "node", "serve"):
                    port = int(flag(arguments, "port") or (50100 if subcommand == "node" else 50051))
                    for probe, service in (("startupProbe", "readiness"), ("readinessProbe", "readiness"),
                                           ("livenessProbe", "liveness")):
                        grpc = container.get(probe, {}).get("grpc", {})
                        checker.check(grpc.get("port") == port and grpc.get("service") == service,
                                      f"{cwhere}: {probe} must ask gRPC health service {service!r} on port {port}, "
                                      f"not {grpc}")
                    startup = container.get("startupProbe", {})
                    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
                    checker.check(budget >= 600, f"{cwhere}: the startup probe's budget is {budget} s; loading needs more")
                elif subcommand == "controller":
                    checker.check("livenessProbe" in container and "readinessProbe" in container,
                                  f"{cwhere}: liveness and readiness probes")


def check_layout(checker, name, objects):
    by_kind = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    frontends = [o for o in by_kind.get("Deployment", []) if o["metadata"]["name"] == "moeserve-frontend"]
    if not checker.check(len(frontends) == 1, f"{name}: one front-end Deployment"):
        return
    frontend = frontends[0]
    checker.check(frontend["spec"].get("replicas", 1) >= 2, f"{name}: at least 2 front ends")
    checker.check(any(p["spec"]["selector"] == frontend["spec"]["selector"] for p in by_kind.get("PodDisruptionBudget", [])),
                  f"{name}: a PodDisruptionBudget for the front ends")
    groups = {}
    for argument in args_of(frontend["spec"]["template"]["spec"]["containers"][0]):
        if argument.startswith("--group="):
            group, leader = argument[len("--group="):].split("=", 1)
            groups[group] = leader
    checker.check(groups, f"{name}: the front ends serve no group")
    controllers = {}
    for obj in by_kind.get("Deployment", []):
        for where, _, container in deploy_common.containers(obj):
            arguments = args_of(container)
            if arguments and arguments[0] == "controller":
                controllers[flag(arguments, "group")] = flag(arguments, "targets")
    checker.check(set(controllers) == set(groups),
                  f"{name}: EPLB controllers for groups {sorted(controllers)}, front ends serve {sorted(groups)}")
    for group, targets in controllers.items():
        checker.check(targets == "moeserve-frontend:50051",
                      f"{name}: the {group} controller must push through one front-end address, not {targets}")
    # Each group's leader address names a pod that exists with the group's ranks.
    for group, leader in groups.items():
        host, port = leader.rsplit(":", 1)
        pod, service = host.split(".")[:2]
        owners = [o for o in by_kind.get("StatefulSet", []) + by_kind.get("LeaderWorkerSet", [])
                  if o["metadata"]["name"] == service]
        if not checker.check(len(owners) == 1, f"{name}: group {group}'s leader {leader}: no StatefulSet or "
                                               f"LeaderWorkerSet {service}"):
            continue
        owner = owners[0]
        checker.check(pod == f"{service}-0", f"{name}: group {group}'s leader must be pod {service}-0, not {pod}")
        for where, spec, container in deploy_common.containers(owner):
            arguments = args_of(container)
            rank_arguments = arguments[arguments.index("--") + 1:] if "--" in arguments else []
            checker.check(flag(rank_arguments, "group") == group, f"{name}: {where} runs group {flag(rank_arguments, 'group')}, the front ends expect {group}")
            checker.check(flag(arguments, "port") == port, f"{name}: {where}: node --port must be the leader port {port}")
            ranks_per_node = int(flag(arguments, "ranks-per-node") or 1)
            gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            if gpus:
                checker.check(int(gpus) == ranks_per_node, f"{name}: {where}: {gpus} GPUs for {ranks_per_node} ranks")
                checker.check(flag(rank_arguments, "device") == "cuda", f"{name}: {where}: GPU ranks need --device=cuda")
        if owner["kind"] == "LeaderWorkerSet":
            spec = owner["spec"]
            checker.check(spec.get("startupPolicy") == "LeaderCreated", f"{name}: {service}: startupPolicy LeaderCreated")
            checker.check(spec["leaderWorkerTemplate"].get("restartPolicy") == "RecreateGroupOnPodRestart",
                          f"{name}: {service}: restartPolicy RecreateGroupOnPodRestart")


def check_mission_sizes(checker, objects):
    sizes = {o["metadata"]["name"]: o["spec"]["leaderWorkerTemplate"]["size"] for o in objects
             if o["kind"] == "LeaderWorkerSet"}
    checker.check(sizes == {"moeserve-prefill": 4, "moeserve-decode": 16},
                  f"mission: LeaderWorkerSet sizes {sizes}, expected prefill 4 (EP32) and decode 16 (EP128)")
    hpas = [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    checker.check(len(hpas) == 1 and hpas[0]["spec"]["scaleTargetRef"]["name"] == "moeserve-frontend",
                  "mission: an autoscaler for the front ends")


def check_secrets(checker, name, objects, token):
    secrets = [o for o in objects if o["kind"] == "Secret"]
    for secret in secrets:
        checker.check(re.fullmatch(r"moeserve-admin-token-[a-z0-9]{10}", secret["metadata"]["name"]) is not None,
                      f"{name}: Secret {secret['metadata']['name']} must come from the secretGenerator")
        checker.check("stringData" not in secret, f"{name}: Secret with literal stringData")
        import base64
        value = base64.b64decode(secret.get("data", {}).get("token", "")).decode().strip()
        checker.check(value == token, f"{name}: the Secret must hold the operator's admin-token file")
    names = {s["metadata"]["name"] for s in secrets}
    for obj in objects:
        for where, template in deploy_common.pod_templates(obj):
            for volume in template["spec"].get("volumes", []):
                if "secret" in volume:
                    checker.check(volume["secret"]["secretName"] in names,
                                  f"{name}: {where} mounts Secret {volume['secret']['secretName']}, "
                                  f"which the overlay does not generate")


def check_committed_sources(checker):
    for directory, _, files in os.walk(os.path.join(DEPLOY, "k8s")):
        for file in files:
            if not file.endswith(".yaml"):
                continue
            with open(os.path.join(directory, file)) as f:
                for doc in yaml.safe_load_all(f):
                    if isinstance(doc, dict) and doc.get("kind") == "Secret":
                        checker.check(False, f"{file}: a committed Secret; generate it from the operator's file")


def check_monitoring(checker, objects):
    rule = [o for o in objects if o["kind"] == "PrometheusRule"]
    with open(PROMETHEUS_RULE) as f:
        committed = f.read()
    checker.check(committed == expected_prometheus_rule(),
                  "deploy/k8s/monitoring/prometheusrule.yaml differs from deploy/prometheus/rules.yml: run "
                  "python3 tests/deploy/check_manifests.py --write-prometheus-rule")
    with open(os.path.join(DEPLOY, "prometheus", "rules.yml")) as f:
        checker.check(len(rule) == 1 and rule[0]["spec"]["groups"] == yaml.safe_load(f)["groups"],
                      "the rendered PrometheusRule must carry rules.yml's groups")
    # The PodMonitor relabels like the plain configuration.
    with open(os.path.join(DEPLOY, "prometheus", "prometheus.yml")) as f:
        job = yaml.safe_load(f)["scrape_configs"][0]
    podmonitor = [o for o in objects if o["kind"] == "PodMonitor"][0]
    endpoint = podmonitor["spec"]["podMetricsEndpoints"][0]
    plain = [{camel(k): v for k, v in r.items()} for r in job["metric_relabel_configs"]]
    checker.check(endpoint.get("metricRelabelings") == plain,
                  "the PodMonitor's metricRelabelings differ from prometheus.yml's metric_relabel_configs")
    keep = [r for r in job["relabel_configs"] if r.get("action") == "keep"
            and r["source_labels"] == ["__meta_kubernetes_pod_container_port_name"]][0]
    checker.check(any(r.get("regex") == keep["regex"] and r.get("action") == "keep" for r in endpoint["relabelings"]),
                  "the PodMonitor must keep the same metrics ports as prometheus.yml")
    # Dashboards: one ConfigMap per JSON file, labelled for the sidecar, with the file's content.
    grafana = os.path.join(DEPLOY, "grafana")
    for file in sorted(f for f in os.listdir(grafana) if f.endswith(".json")):
        with open(os.path.join(grafana, file)) as f:
            content = f.read()
        json.loads(content)
        maps = [o for o in objects if o["kind"] == "ConfigMap" and file in o.get("data", {})]
        checker.check(len(maps) == 1 and maps[0]["data"][file] == content
                      and maps[0]["metadata"].get("labels", {}).get("grafana_dashboard") == "1",
                      f"{file}: one ConfigMap labelled grafana_dashboard=1 with the file's content")


def main():
    if sys.argv[1:] == ["--write-prometheus-rule"]:
        with open(PROMETHEUS_RULE, "w") as f:
            f.write(expected_prometheus_rule())
        print(f"wrote {PROMETHEUS_RULE}")
        return
    if kubernetes_validate is None:
        sys.exit("check_manifests.py: run it with build/deploy-venv/bin/python (scripts/deploy-venv.sh)")
    kubectl = sys.argv[1]
    version = deploy_common.project_version()
    schemas = {}
    for key, file in SCHEMAS.items():
        with open(os.path.join(HERE, "schemas", file)) as f:
            schemas[key] = json.load(f)
    checker = Checker()
    check_strictness(checker, schemas)
    check_committed_sources(checker)
    rendered = deploy_common.Rendered(kubectl)
    try:
        for name in KUSTOMIZATIONS:
            try:
                objects = rendered.render(name)
            except RuntimeError as error:
                checker.check(False, str(error))
                continue
            checker.check(objects, f"{name}: renders nothing")
            print(f"{name}: {len(objects)} objects: " + ", ".join(sorted({o['kind'] for o in objects})))
            for obj in objects:
                validate_object(checker, f"{name}: {obj['kind']}/{obj['metadata']['name']}", obj, schemas)
            check_containers(checker, name, objects, version)
            overlay = name.split("/")[-1]
            if name.startswith("overlays/"):
                check_layout(checker, name, objects)
                check_secrets(checker, name, objects,
                              rendered.tokens["mission" if overlay == "mission-rdma" else overlay])
            if name in ("monitoring", "overlays/mission"):
                check_monitoring(checker, objects)
            if overlay == "mission":
                check_mission_sizes(checker, objects)
            if overlay == "mission-rdma":
                lws = [o for o in objects if o["kind"] == "LeaderWorkerSet"]
                checker.check(lws and all(any(k.startswith("rdma/") for k in c["resources"]["limits"])
                                          for o in lws for _, _, c in deploy_common.containers(o)),
                              "mission-rdma: every rank container requests an RDMA device")
    finally:
        rendered.close()
    deploy_common.fail_summary(checker.failures, checker.checks)


if __name__ == "__main__":
    main()
