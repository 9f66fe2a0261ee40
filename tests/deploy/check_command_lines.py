"""Every container command line of every rendered overlay is accepted by the binary's own
parser: `moeserve --check-flags ARGS...` (for `node`, its ranks' flags after `--` too) and
`moeserve-eplb --check-flags controller ...` parse and validate the flags and exit 0 without
starting anything.

Each command line is run as the container would run it: $(VAR) references expanded from the
container's env (downward-API fields get the values Kubernetes would give: the pod's IP, its
StatefulSet index for every replica), the LeaderWorkerSet variables set for the first and last
pod of a group, and every mounted path mirrored into a temporary folder (the admin token Secret
with the generated token, the model volume with a small checkpoint of the same architecture),
so checks of existing files pass or fail as they would in the pod.

Usage: check_command_lines.py KUBECTL MOESERVE MOESERVE_EPLB
"""
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploy_common  # noqa: E402

FIXTURE_MODEL = os.path.join(deploy_common.REPO, "tests", "fixtures", "hf", "deepseek_v3")


def field_value(field, pod_name, pod_index, namespace):
    if field == "status.podIP":
        return "10.0.0.10"
    if field == "metadata.name":
        return pod_name
    if field == "metadata.namespace":
        return namespace
    if field == "metadata.labels['apps.kubernetes.io/pod-index']":
        return str(pod_index)
    raise ValueError(f"no test value for the downward-API field {field}")


def expand(text, env):
    # Kubernetes' rule: $(VAR) expands when VAR is defined, $$ escapes, anything else stays.
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def pods(obj):
    """(pod name, pod index, extra env) for the pods an object makes that are worth checking."""
    name = obj["metadata"]["name"]
    namespace = obj["metadata"].get("namespace", "default")
    if obj["kind"] == "StatefulSet":
        for index in range(obj["spec"].get("replicas", 1)):
            yield f"{name}-{index}", index, {}
    elif obj["kind"] == "LeaderWorkerSet":
        size = obj["spec"]["leaderWorkerTemplate"]["size"]
        for index in sorted({0, size - 1}):
            yield (f"{name}-0" if index == 0 else f"{name}-0-{index}", index,
                   {"LWS_LEADER_ADDRESS": f"{name}-0.{name}.{namespace}", "LWS_GROUP_SIZE": str(size),
                    "LWS_WORKER_INDEX": str(index)})
    else:
        yield f"{name}-pod", 0, {}


def mirror(root, spec, container, token):
    """Creates the container's mounts under root; returns {mount path: mirrored path}."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    paths = {}
    for mount in container.get("volumeMounts", []):
        target = root + mount["mountPath"]
        volume = volumes[mount["name"]]
        os.makedirs(target, exist_ok=True)
        if "secret" in volume:
            with open(os.path.join(target, "token"), "w") as f:
                f.write(token + "\n")
        paths[mount["mountPath"]] = target
    return paths


def rewrite_paths(argument, paths):
    for mount_path in sorted(paths, key=len, reverse=True):
        for prefix in ("=", ""):
            if argument.startswith(prefix + mount_path) if prefix == "" else f"={mount_path}" in argument:
                return argument.replace(mount_path, paths[mount_path], 1)
    return argument


def main():
    kubectl, moeserve, eplb = sys.argv[1:4]
    failures = []
    checks = 0

    # The parser's check mode rejects what it should, or passing it would prove nothing.
    for command, what in (([moeserve, "--check-flags", "frontend", "--group=mixed=a:1", "--no-such-flag"],
                           "an unknown front-end flag"),
                          ([moeserve, "--check-flags", "node", "--ranks-per-node=2", "--", "--group=decode",
                            "--no-such-rank-flag"], "an unknown rank flag after node's --"),
                          ([eplb, "--check-flags", "controller", "--prometheus-url=http://p:9090"],
                           "a controller without --targets")):
        checks += 1
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        if result.returncode == 0:
            failures.append(f"--check-flags accepted {what}: {' '.join(command)}")

    rendered = deploy_common.Rendered(kubectl)
    try:
        for name in deploy_common.KUSTOMIZATIONS:
            if not name.startswith("overlays/"):
                continue
            overlay = name.split("/")[-1]
            token = rendered.tokens["mission" if overlay == "mission-rdma" else overlay]
            for obj in rendered.render(name):
                for pod_name, pod_index, lws_env in pods(obj):
                    for where, spec, container in deploy_common.containers(obj):
                        with tempfile.TemporaryDirectory(prefix="moeserve-pod-") as root:
                            paths = mirror(root, spec, container, token)
                            env = dict(lws_env)
                            for variable in container.get("env", []):
                                if "value" in variable:
                                    env[variable["name"]] = expand(variable["value"], env)
                                else:
                                    env[variable["name"]] = field_value(
                                        variable["valueFrom"]["fieldRef"]["fieldPath"], pod_name, pod_index,
                                        obj["metadata"].get("namespace", "default"))
                            command = container.get("command", ["/usr/local/bin/moeserve"])
                            arguments = [expand(a, env) for a in command[1:] + container.get("args", [])]
                            arguments = [rewrite_paths(a, paths) for a in arguments]
                            # The model volume holds a checkpoint folder; mirror it with a small one
                            # of the same architecture.
                            for argument in arguments:
                                if argument.startswith("--model=") and not argument.startswith("--model=builtin:"):
                                    model = argument.split("=", 1)[1]
                                    os.makedirs(os.path.dirname(model), exist_ok=True)
                                    if not os.path.exists(model):
                                        os.symlink(FIXTURE_MODEL, model)
                            binary = {"/usr/local/bin/moeserve": moeserve,
                                      "/usr/local/bin/moeserve-eplb": eplb}.get(command[0])
                            checks += 1
                            if binary is None:
                                failures.append(f"{name}: {where}: runs {command[0]}, which the image does not have")
                                continue
                            full_env = dict(os.environ, **env)
                            full_env.pop("LWS_LEADER_ADDRESS", None) if "LWS_LEADER_ADDRESS" not in env else None
                            result = subprocess.run([binary, "--check-flags"] + arguments, env=full_env,
                                                    capture_output=True, text=True, timeout=60)
                            label = f"{name}: {where} (pod {pod_name})"
                            if result.returncode != 0:
                                failures.append(f"{label}: exit {result.returncode}: "
                                                f"{(result.stdout + result.stderr).strip()}\n    command: "
                                                f"{os.path.basename(binary)} --check-flags {' '.join(arguments)}")
                            else:
                                print(f"ok {label}: {os.path.basename(binary)} {arguments[0]}")
    finally:
        rendered.close()
    deploy_common.fail_summary(failures, checks)


if __name__ == "__main__":
    main()
