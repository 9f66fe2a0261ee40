"""The plain Prometheus configuration and the rules: `promtool check config` (Debian's Prometheus
is built without Kubernetes discovery, so the discovery block is checked here for shape and
swapped for a static target carrying the same __meta_kubernetes_* labels), `promtool check
rules`, `promtool test rules`, and that the unit tests fire every alert with the labels its
annotations name.

Usage: check_prometheus.py PROMTOOL
"""
import os
import re
import subprocess
import sys
import tempfile

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploy_common  # noqa: E402

PROMETHEUS = os.path.join(deploy_common.DEPLOY, "prometheus")


def static_config(config, rules_path):
    """The configuration with each job's Kubernetes discovery swapped for one static target."""
    config = yaml.safe_load(yaml.safe_dump(config))
    config["rule_files"] = [rules_path]
    for job in config["scrape_configs"]:
        if "kubernetes_sd_configs" in job:
            del job["kubernetes_sd_configs"]
            job["static_configs"] = [{"targets": ["127.0.0.1:9400"], "labels": {
                "__meta_kubernetes_namespace": "moeserve",
                "__meta_kubernetes_pod_name": "moeserve-decode-0",
                "__meta_kubernetes_pod_container_name": "node",
                "__meta_kubernetes_pod_container_port_name": "metrics-0",
                "__meta_kubernetes_pod_label_app_kubernetes_io_name": "moeserve",
                "__meta_kubernetes_pod_label_moeserve_io_group": "decode"}}]
    return config


def main():
    promtool = sys.argv[1]
    failures = []
    checks = 0

    def run(command, what):
        nonlocal checks
        checks += 1
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        print(f"{what}: exit {result.returncode}")
        if result.returncode != 0:
            failures.append(f"{what}:\n{result.stdout}{result.stderr}")

    with open(os.path.join(PROMETHEUS, "prometheus.yml")) as f:
        config = yaml.safe_load(f)
    for job in config["scrape_configs"]:
        checks += 1
        sd = job.get("kubernetes_sd_configs", [])
        if not (len(sd) == 1 and sd[0].get("role") == "pod" and set(sd[0]) <= {"role", "namespaces", "selectors"}):
            failures.append(f"job {job['job_name']}: expected one kubernetes_sd_configs entry with role pod, got {sd}")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "prometheus.yml")
        with open(path, "w") as f:
            yaml.safe_dump(static_config(config, os.path.join(PROMETHEUS, "rules.yml")), f)
        run([promtool, "check", "config", path], "promtool check config (discovery swapped for static)")
    run([promtool, "check", "rules", os.path.join(PROMETHEUS, "rules.yml")], "promtool check rules")
    os.chdir(PROMETHEUS)
    run([promtool, "test", "rules", "rules_test.yml"], "promtool test rules")

    with open(os.path.join(PROMETHEUS, "rules.yml")) as f:
        rules = [r for g in yaml.safe_load(f)["groups"] for r in g["rules"] if "alert" in r]
    with open(os.path.join(PROMETHEUS, "rules_test.yml")) as f:
        tests = yaml.safe_load(f)["tests"]
    fired = {}
    for test in tests:
        for case in test.get("alert_rule_test", []):
            for alert in case.get("exp_alerts") or []:
                fired.setdefault(case["alertname"], []).append(alert)
    for rule in rules:
        checks += 1
        name = rule["alert"]
        if name not in fired:
            failures.append(f"rules_test.yml has no case where {name} fires")
            continue
        used = set(re.findall(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)", " ".join(rule.get("annotations", {}).values())))
        for alert in fired[name]:
            missing = used - set(alert.get("exp_labels", {}))
            if missing:
                failures.append(f"{name}: its annotations use {sorted(missing)}, which its test alert lacks")
    deploy_common.fail_summary(failures, checks)


if __name__ == "__main__":
    main()
