"""Checks that the deployment artifacts parse and agree with the server's flags and metrics.

Usage: check_deploy_artifacts.py REPO_ROOT MOESERVE_BINARY MOESERVE_EPLB_BINARY
"""
import json
import re
import subprocess
import sys

import yaml


def main():
    root, moeserve, eplb = sys.argv[1:4]
    failures = []
    documents = list(yaml.safe_load_all(open(f"{root}/deploy/k8s/moeserve.yaml")))
    kinds = sorted(d["kind"] for d in documents)
    if kinds != ["Deployment", "Deployment", "Namespace", "Secret", "Service", "Service", "Service"]:
        failures.append(f"unexpected k8s objects: {kinds}")
    serve_help = subprocess.run([moeserve, "serve", "--help"], capture_output=True, text=True).stdout
    eplb_help = subprocess.run([eplb, "controller", "--help"], capture_output=True, text=True).stdout
    for document in documents:
        if document["kind"] != "Deployment":
            continue
        container = document["spec"]["template"]["spec"]["containers"][0]
        help_text = eplb_help if container.get("command") else serve_help
        for argument in container["args"]:
            flag = argument.split("=")[0]
            if flag.startswith("--") and flag not in help_text:
                failures.append(f"{document['metadata']['name']}: {flag} is not a known flag")
    dashboard = json.load(open(f"{root}/deploy/grafana/moeserve-dashboard.json"))
    metrics = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            metrics.update(re.findall(r"moeserve_[a-z_]+", target["expr"]))
    sources = subprocess.run(["grep", "-rhoE", r"moeserve_[a-z_]+", f"{root}/engine", f"{root}/eplb",
                              f"{root}/server"], capture_output=True, text=True).stdout.split()
    known = {m for m in sources}
    for metric in sorted(metrics):
        base = re.sub(r"_(bucket|sum|count)$", "", metric)
        if base not in known:
            failures.append(f"dashboard uses {metric}, which the code does not export")
    for failure in failures:
        print("FAIL", failure)
    print(f"{0 if failures else 1} passed, {1 if failures else 0} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
