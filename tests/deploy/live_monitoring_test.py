"""The dashboards and rules against a live cluster and a real Prometheus.

On loopback: a prefill group of 2 rank processes (one `moeserve node`), a decode group of 2
(two `moeserve node`s of one rank each), `moeserve frontend` over both, and the EPLB
controller of the decode group. Prometheus scrapes every /metrics port through the shipped
deploy/prometheus/prometheus.yml: its Kubernetes discovery is swapped for static targets that
carry the __meta_kubernetes_* labels discovery would give (namespace, pod, container, port
name, pod labels), so the shipped relabelling rules produce the labels, and it loads the
shipped rules.yml. Load runs through the front end until the controller has pushed a
placement; then the health services the probes ask answer by name, and every dashboard panel
query, template variable and annotation (variables
substituted; panels whose description starts with [dcgm] need the GPU exporter and are
skipped) and every rule is evaluated through Prometheus' HTTP API: each must return data with
the labels its legend, annotation or alert text uses. Alerts are evaluated with their
thresholds relaxed (a healthy cluster fires none), so what is checked is that their series
exist with those labels.

Usage: live_monitoring_test.py MOESERVE MOESERVE_EPLB MOESERVE_LOADGEN PROMETHEUS
"""
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploy_common  # noqa: E402

NAMESPACE = "moeserve-live"
RATE_INTERVAL = "15s"
DEADLINE = time.monotonic() + 170


def free_ports(count):
    """`count` consecutive free TCP ports on loopback."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65000:
            continue
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                sockets.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free ports")


class Cluster:
    def __init__(self, moeserve, eplb, prometheus):
        self.folder = tempfile.mkdtemp(prefix="moeserve-live-")
        self.processes = []
        self.token = os.path.join(self.folder, "admin-token")
        with open(self.token, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        self.moeserve, self.eplb, self.prometheus = moeserve, eplb, prometheus
        self.targets = []  # (port, pod, container, port name, group or None)

    def start(self, name, command):
        log = open(os.path.join(self.folder, name + ".log"), "w")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append((name, process))
        return process

    def log(self, name):
        with open(os.path.join(self.folder, name + ".log")) as f:
            return f.read()[-3000:]

    def start_node(self, name, group, leader, ranks, index, nodes, port, metrics):
        self.start(name, [self.moeserve, "node", f"--ranks-per-node={ranks}", f"--node-index={index}",
                          f"--num-nodes={nodes}", f"--port={port}", f"--metrics-port={metrics}", "--",
                          f"--group={group}", f"--leader={leader}", "--model=builtin:tiny",
                          "--num-redundant-experts=8", f"--admin-token-file={self.token}"])
        for local in range(ranks):
            self.targets.append((metrics + local, name, "node", f"metrics-{local}", group))

    def stop(self):
        for name, process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        give_up = time.monotonic() + 20
        for name, process in self.processes:
            try:
                process.wait(timeout=max(0.1, give_up - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def prometheus_config(targets, rules_path, interval="1s"):
    with open(os.path.join(deploy_common.DEPLOY, "prometheus", "prometheus.yml")) as f:
        config = yaml.safe_load(f)
    config["global"] = {"scrape_interval": interval, "evaluation_interval": interval}
    config["rule_files"] = [rules_path]
    job = config["scrape_configs"][0]
    del job["kubernetes_sd_configs"]
    job["static_configs"] = []
    for port, pod, container, port_name, group in targets:
        labels = {"__meta_kubernetes_namespace": NAMESPACE, "__meta_kubernetes_pod_name": pod,
                  "__meta_kubernetes_pod_container_name": container,
                  "__meta_kubernetes_pod_container_port_name": port_name,
                  "__meta_kubernetes_pod_label_app_kubernetes_io_name": "moeserve"}
        if group:
            labels["__meta_kubernetes_pod_label_moeserve_io_group"] = group
        job["static_configs"].append({"targets": [f"127.0.0.1:{port}"], "labels": labels})
    return config


class Prometheus:
    def __init__(self, url):
        self.url = url

    def get(self, path, **params):
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=20) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body}")
        return body["data"]

    def instant(self, query):
        return self.get("/api/v1/query", query=query)["result"]

    def range(self, query, start, end, step="2s"):
        return self.get("/api/v1/query_range", query=query, start=f"{start:.3f}", end=f"{end:.3f}", step=step)["result"]

    def ready(self):
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False


def health(address, service):
    """grpc.health.v1 Check, as a Kubernetes gRPC probe asks it: the status name, or the error."""
    import grpc  # Debian's python3-grpcio (scripts/install-deps.sh)
    request = b"\x0a" + bytes([len(service)]) + service.encode() if service else b""
    with grpc.insecure_channel(address) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        try:
            response = check(request, timeout=5)
        except grpc.RpcError as error:
            return error.code().name
    status = response[1] if len(response) >= 2 and response[0] == 0x08 else 0
    return {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}.get(status, str(status))


def template_labels(text):
    return set(re.findall(r"\{\{\s*\$?(?:labels\.)?([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}", text or ""))


def annotation_labels(text):
    return set(re.findall(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)", text or ""))


def relax(expression):
    """The alert expression with every comparison against a number made always true."""
    return re.sub(r"(==|!=|>=|<=|>|<)\s*-?[0-9.]+(e[+-]?[0-9]+)?\b", ">= -Inf", expression)


def substitute(expression, variables):
    for name in sorted(variables, key=len, reverse=True):
        expression = expression.replace("$" + name, variables[name]).replace("${" + name + "}", variables[name])
    return expression


def has_data(series):
    return [s for s in series if any(v[1] not in ("NaN", "+Inf", "-Inf") for v in s.get("values", []))]


def main():
    moeserve, eplb, loadgen, prometheus_binary = sys.argv[1:5]
    failures = []
    checks = 0
    cluster = Cluster(moeserve, eplb, prometheus_binary)
    try:
        prefill_port = free_ports(2)
        decode_port = free_ports(2)
        metrics = free_ports(4)
        frontend_port, frontend_metrics, controller_metrics, prometheus_port = (free_ports(1) for _ in range(4))
        prefill_leader = f"127.0.0.1:{prefill_port}"
        decode_leader = f"127.0.0.1:{decode_port}"
        cluster.start_node("moeserve-prefill-0", "prefill", prefill_leader, 2, 0, 1, prefill_port, metrics)
        cluster.start_node("moeserve-decode-0", "decode", decode_leader, 1, 0, 2, decode_port, metrics + 2)
        cluster.start_node("moeserve-decode-1", "decode", decode_leader, 1, 1, 2, decode_port + 1, metrics + 3)
        cluster.start("moeserve-frontend-7d9f", [
            moeserve, "frontend", f"--port={frontend_port}", "--http-port=-1", f"--metrics-port={frontend_metrics}",
            f"--group=prefill={prefill_leader}", f"--group=decode={decode_leader}",
            f"--admin-token-file={cluster.token}", "--poll-interval-seconds=0.2"])
        cluster.targets.append((frontend_metrics, "moeserve-frontend-7d9f", "frontend", "metrics", None))
        cluster.targets.append((controller_metrics, "moeserve-eplb-controller-5c8b", "eplb-decode", "metrics", None))

        rules_path = os.path.join(cluster.folder, "rules.yml")
        shutil.copy(os.path.join(deploy_common.DEPLOY, "prometheus", "rules.yml"), rules_path)
        config_path = os.path.join(cluster.folder, "prometheus.yml")
        with open(config_path, "w") as f:
            yaml.safe_dump(prometheus_config(cluster.targets, rules_path), f)
        cluster.start("prometheus", [prometheus_binary, f"--config.file={config_path}",
                                     f"--storage.tsdb.path={cluster.folder}/data",
                                     f"--web.listen-address=127.0.0.1:{prometheus_port}"])
        prometheus = Prometheus(f"http://127.0.0.1:{prometheus_port}")
        # The controller starts before there is any load: its first cycles fail (partial data),
        # so its failure counter has series too.
        cluster.start("moeserve-eplb-controller", [
            eplb, "controller", f"--prometheus-url={prometheus.url}", "--group=decode",
            f"--targets=127.0.0.1:{frontend_port}", f"--admin-token-file={cluster.token}", "--window=20s",
            "--interval=3s", "--min-improvement=0.01", "--metrics-host=127.0.0.1",
            f"--metrics-port={controller_metrics}"])
        while not prometheus.ready():
            if time.monotonic() > DEADLINE - 120:
                raise RuntimeError("Prometheus did not start:\n" + cluster.log("prometheus"))
            time.sleep(0.5)
        start = time.time()

        # Load until the controller pushed a placement (and at least 25 s of it).
        load_until = time.monotonic() + 25
        pushed = False
        while time.monotonic() < DEADLINE - 60:
            result = subprocess.run([loadgen, f"--target=127.0.0.1:{frontend_port}", "--concurrency", "4",
                                     "--requests=24", "--prompt-tokens=48", "--max-tokens=24", "--warmup=0",
                                     "--connect-timeout=60"], capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                raise RuntimeError(f"loadgen failed:\n{result.stdout}{result.stderr}\nfrontend:\n"
                                   + cluster.log("moeserve-frontend-7d9f"))
            pushed = pushed or any(float(s["value"][1]) > 0 for s in prometheus.instant(
                "moeserve_eplb_pushes_total"))
            if pushed and time.monotonic() > load_until:
                break
        checks += 1
        if not pushed:
            failures.append("the EPLB controller pushed no placement:\n" + cluster.log("moeserve-eplb-controller"))
        time.sleep(3)  # a last scrape and rule evaluation after the load
        end = time.time()

        # What the manifests' probes ask: the front end's gRPC port and each node's first rank
        # (the node's --port) answer `readiness` and `liveness` by name.
        probes = [(f"127.0.0.1:{frontend_port}", service) for service in
                  ("readiness", "liveness", "", "moeserve.v1.Generation", "moeserve.v1.Generation/prefill",
                   "moeserve.v1.Generation/decode")]
        probes += [(f"127.0.0.1:{port}", service) for port in (prefill_port, decode_port, decode_port + 1)
                   for service in ("readiness", "liveness")]
        for address, service in probes:
            checks += 1
            status = health(address, service)
            if status != "SERVING":
                failures.append(f"health {service!r} on {address}: {status}, expected SERVING")
        checks += 1
        status = health(f"127.0.0.1:{frontend_port}", "no-such-service")
        if status != "NOT_FOUND":
            failures.append(f"health 'no-such-service' answered {status}, expected NOT_FOUND")

        # The scrape produced the labels the rules and dashboards rely on.
        up = prometheus.instant('up{job="moeserve"}')
        checks += 1
        if len(up) != len(cluster.targets) or any(s["value"][1] != "1" for s in up):
            failures.append(f"not every target is up: {[(s['metric'].get('pod'), s['value'][1]) for s in up]}")
        for series in prometheus.instant('{job="moeserve", __name__=~"moeserve_.*", container="node"}'):
            missing = {"namespace", "pod", "container", "group"} - set(series["metric"])
            if missing:
                checks += 1
                failures.append(f"a rank series lacks {sorted(missing)}: {series['metric']}")
                break
        checks += 1
        if prometheus.instant('count({__name__=~".+", exported_group=~".+"})'):
            failures.append("some series carry exported_group: the scrape overwrote a series' own group")

        # Dashboards.
        variables = {"namespace": NAMESPACE, "job": "moeserve", "instance": ".*", "group": ".*",
                     "__rate_interval": RATE_INTERVAL, "__interval": "2s", "datasource": "prometheus"}
        layers = prometheus.instant('count by (layer) (moeserve_expert_tokens_total{group="decode"})')
        variables["layer"] = sorted((s["metric"]["layer"] for s in layers), key=int)[0] if layers else "0"
        grafana = os.path.join(deploy_common.DEPLOY, "grafana")
        for file in sorted(f for f in os.listdir(grafana) if f.endswith(".json")):
            with open(os.path.join(grafana, file)) as f:
                dashboard = json.load(f)
            for variable in dashboard["templating"]["list"]:
                if variable["type"] != "query":
                    continue
                checks += 1
                match = re.fullmatch(r"label_values\((.*),\s*([a-zA-Z_]+)\)", variable["query"]["query"])
                query = substitute(f"count by ({match.group(2)}) ({match.group(1)})", variables)
                if not [s for s in prometheus.instant(query) if match.group(2) in s["metric"]]:
                    failures.append(f"{file}: variable {variable['name']}: {query} finds no values")
            for annotation in dashboard["annotations"]["list"]:
                if "expr" not in annotation:
                    continue
                checks += 1
                query = substitute(annotation["expr"], variables)
                series = has_data(prometheus.range(query, start, end))
                used = template_labels(annotation.get("titleFormat")) | template_labels(annotation.get("textFormat"))
                if not series:
                    failures.append(f"{file}: annotation {annotation['name']!r} finds nothing: {query}")
                elif any(used - set(s["metric"]) for s in series):
                    failures.append(f"{file}: annotation {annotation['name']!r} lacks labels {sorted(used)}")
            for panel in dashboard["panels"]:
                if panel["type"] == "row" or panel.get("description", "").startswith("[dcgm]"):
                    continue
                for target in panel["targets"]:
                    checks += 1
                    query = substitute(target["expr"], variables)
                    label = f"{file}: panel {panel['title']!r}"
                    try:
                        series = has_data(prometheus.range(query, start, end))
                    except Exception as error:  # noqa: BLE001 -- report the query that broke
                        failures.append(f"{label}: {query}: {error}")
                        continue
                    used = template_labels(target.get("legendFormat"))
                    if not series:
                        failures.append(f"{label}: no data for {query}")
                        continue
                    lacking = sorted({name for s in series for name in used - set(s["metric"])})
                    if lacking:
                        failures.append(f"{label}: series lack {lacking} (legend {target['legendFormat']!r}): {query}")

        # Rules: every rule loaded and evaluates without error; recorded series exist; each
        # alert's series exist with the labels its annotations use.
        with open(rules_path) as f:
            groups = yaml.safe_load(f)["groups"]
        loaded = {r["name"]: r for g in prometheus.get("/api/v1/rules")["groups"] for r in g["rules"]}
        for rule in (r for g in groups for r in g["rules"]):
            checks += 1
            name = rule.get("record") or rule["alert"]
            state = loaded.get(name)
            if state is None or state.get("health") != "ok":
                failures.append(f"rule {name}: {state and state.get('lastError') or 'not loaded'}")
                continue
            if "record" in rule:
                series = has_data(prometheus.range(name, start, end))
                by = re.search(r"by \(([^)]*)\)", rule["expr"])
                used = {label.strip() for label in by.group(1).split(",")} - {"le"} if by else set()
                what = f"recording rule {name}"
            else:
                series = has_data(prometheus.range(relax(rule["expr"]), start, end))
                used = annotation_labels(" ".join(rule.get("annotations", {}).values()))
                what = f"alert {name} (relaxed: {relax(rule['expr'])})"
            if not series:
                failures.append(f"{what}: no data")
                continue
            lacking = sorted({n for s in series for n in used - set(s["metric"])})
            if lacking:
                failures.append(f"{what}: series lack {lacking}")
    except Exception as error:  # noqa: BLE001 -- one clear failure with the logs
        checks += 1
        failures.append(f"{type(error).__name__}: {error}")
    finally:
        cluster.stop()
    deploy_common.fail_summary(failures, checks)


if __name__ == "__main__":
    main()
