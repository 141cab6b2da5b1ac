#!/usr/bin/env python3
"""Checks the Helm chart offline: lint, render several value sets, validate
every manifest against the Kubernetes 1.30 schemas (strict), assert what the
chart promises, and run every rendered `serve` argument list through the real
binary (`serve --check-config`) so the chart never passes a flag the server
does not have.

Usage: chart_test.py BINARY   (run by scripts/test.sh with its venv python)
"""

import subprocess
import sys

import helm_python
import kubernetes_validate
import yaml

CHART = "helm/room-allocator"
KUBE_VERSION = "1.30.0"
BINARY = sys.argv[1]

passed = 0
failed = []


def check(name, condition, detail=""):
    global passed
    if condition:
        passed += 1
    else:
        failed.append(f"{name}: {detail}")


def render(values):
    chart = helm_python.Chart.load(CHART)
    chart.validate_schema(values)
    rendered = chart.render(values, name="ra", namespace="inference", is_install=True)
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    return docs, rendered


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def validate(name, docs):
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":  # a CRD: no upstream schema
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            check(f"{name}: {doc['kind']} is valid for Kubernetes {KUBE_VERSION}", True)
        except Exception as error:  # noqa: BLE001 - report every failure
            check(f"{name}: {doc['kind']} {doc['metadata']['name']}", False, str(error)[:500])


def container(docs):
    deployment = by_kind(docs, "Deployment")[0]
    return deployment, deployment["spec"]["template"]["spec"]["containers"][0]


def accepted_by_binary(name, args, env_vars):
    # The container's environment as Kubernetes would set it (Secrets stubbed).
    env = {e["name"]: e.get("value", "from-a-secret") for e in env_vars}
    env["PATH"] = "/usr/bin:/bin"
    result = subprocess.run(
        [BINARY, *args, "--check-config"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    check(f"{name}: `room-allocator {' '.join(args)}` is accepted", result.returncode == 0, result.stderr)


def common_checks(name, docs, rendered):
    validate(name, docs)
    deployment, main = container(docs)
    pod = deployment["spec"]["template"]["spec"]
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    check(f"{name}: ports grpc and metrics", ports == {"grpc": 50051, "metrics": 9090}, ports)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        check(f"{name}: native grpc {probe}", main[probe].get("grpc", {}).get("port") == 50051, main[probe])
    check(
        f"{name}: readiness asks for the allocator service",
        main["readinessProbe"]["grpc"].get("service") == "room_allocator.v1.RoomAllocatorService",
    )
    security = main["securityContext"]
    check(f"{name}: read-only root", security.get("readOnlyRootFilesystem") is True)
    check(f"{name}: no privilege escalation", security.get("allowPrivilegeEscalation") is False)
    check(f"{name}: drops ALL capabilities", security.get("capabilities", {}).get("drop") == ["ALL"])
    check(f"{name}: runs as non-root", pod["securityContext"].get("runAsNonRoot") is True)
    check(f"{name}: resources set", "requests" in main["resources"] and "limits" in main["resources"])
    args = main["args"]
    delay = next(int(a.split("=")[1]) for a in args if a.startswith("--drain-delay-secs="))
    timeout = next(int(a.split("=")[1]) for a in args if a.startswith("--drain-timeout-secs="))
    check(
        f"{name}: terminationGracePeriodSeconds exceeds the drain",
        pod["terminationGracePeriodSeconds"] > delay + timeout,
        pod["terminationGracePeriodSeconds"],
    )
    selector = deployment["spec"]["selector"]["matchLabels"]
    check(f"{name}: no chart version in selectors", not any("chart" in k or "version" in k for k in selector), selector)
    service = by_kind(docs, "Service")[0]
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    check(f"{name}: Service grpc port has appProtocol grpc", grpc_port.get("appProtocol") == "grpc")
    check(f"{name}: ClusterIP by default", service["spec"]["type"] == "ClusterIP")
    accepted_by_binary(name, args, main.get("env", []))
    test_pods = [d for d in docs if d["kind"] == "Pod" and d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    check(f"{name}: a helm test pod", len(test_pods) == 1)
    test_args = test_pods[0]["spec"]["containers"][0]["args"]
    check(f"{name}: the test pod calls the health service", test_args[0] == "health")
    usage = subprocess.run([BINARY, *test_args, "--help"], capture_output=True, text=True, check=False)
    check(f"{name}: the test pod's flags exist", usage.returncode == 0, usage.stderr)
    notes = next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))
    check(f"{name}: NOTES has port-forward and grpcurl", "port-forward" in notes and "grpcurl" in notes and "AllocateRoom" in notes)
    return deployment, main, pod


# Every chart value has a comment (values inside Kubernetes objects that are
# passed through, such as resources, are that object's fields).
PASSED_THROUGH = ("podSecurityContext", "securityContext", "resources", "routerPodLabels")
lines = open(f"{CHART}/values.yaml").read().split("\n")
parents = []
for number, line in enumerate(lines, 1):
    stripped = line.lstrip()
    if not stripped or stripped.startswith("#") or ":" not in stripped or stripped.startswith("-"):
        continue
    indent = len(line) - len(stripped)
    parents = [p for p in parents if p[0] < indent]
    key = stripped.split(":")[0]
    if not any(p[1] in PASSED_THROUGH for p in parents):
        previous = next(l.strip() for l in reversed(lines[: number - 1]) if l.strip())
        check(f"values.yaml:{number} {key} has a comment", previous.startswith("#"), line)
    parents.append((indent, key))

# The lint, strict, against Kubernetes 1.30.
report = helm_python.lint(CHART, strict=True, kube_version=f"v{KUBE_VERSION}")
problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
check("helm lint --strict", not problems, problems)

# 1. Defaults: embedded store, one replica, a PVC, Recreate.
docs, rendered = render({})
deployment, main, pod = common_checks("embedded", docs, rendered)
check("embedded: 1 replica", deployment["spec"]["replicas"] == 1)
check("embedded: Recreate", deployment["spec"]["strategy"]["type"] == "Recreate")
pvcs = by_kind(docs, "PersistentVolumeClaim")
check("embedded: a PVC by default", len(pvcs) == 1)
mount = next(m for m in main["volumeMounts"] if m["name"] == "data")
check("embedded: the volume is the data dir", f"--data-dir={mount['mountPath']}" in main["args"], main["args"])
volume = next(v for v in pod["volumes"] if v["name"] == "data")
check("embedded: the data volume is the PVC", volume["persistentVolumeClaim"]["claimName"] == pvcs[0]["metadata"]["name"])
check("embedded: no PDB", not by_kind(docs, "PodDisruptionBudget"))

# 2. Embedded with more than one replica must not render.
try:
    render({"replicaCount": 2})
    check("embedded with 2 replicas is refused", False, "it rendered")
except helm_python.HelmError as error:
    message = str(error)
    check("embedded with 2 replicas is refused", "duplicate rooms" in message and "etcd.endpoints" in message, message)

# 3. etcd mode: 3 replicas, auth, TLS to etcd, PDB, spread, RollingUpdate.
etcd_values = {
    "replicaCount": 3,
    "etcd": {
        "endpoints": ["https://etcd-0.etcd:2379", "https://etcd-1.etcd:2379"],
        "auth": {"username": "room-allocator", "existingSecret": "etcd-credentials"},
        "tls": {"existingSecret": "etcd-client-tls", "clientCert": True},
    },
}
docs, rendered = render(etcd_values)
deployment, main, pod = common_checks("etcd", docs, rendered)
check("etcd: 3 replicas", deployment["spec"]["replicas"] == 3)
check("etcd: RollingUpdate", deployment["spec"]["strategy"]["type"] == "RollingUpdate")
check("etcd: a PDB", len(by_kind(docs, "PodDisruptionBudget")) == 1)
check("etcd: no PVC", not by_kind(docs, "PersistentVolumeClaim"))
check("etcd: topology spread", len(pod.get("topologySpreadConstraints", [])) == 1)
check("etcd: anti-affinity", "podAntiAffinity" in pod.get("affinity", {}))
check("etcd: endpoints passed", "--etcd-endpoints=https://etcd-0.etcd:2379,https://etcd-1.etcd:2379" in main["args"])
password = next(e for e in main["env"] if e["name"] == "ROOM_ALLOCATOR_ETCD_PASSWORD")
check("etcd: password from the Secret", password["valueFrom"]["secretKeyRef"]["name"] == "etcd-credentials")

# 4. TLS with client certificates, a bearer token, and every option on.
all_on = {
    "tls": {"enabled": True, "existingSecret": "ra-tls", "requireClientCert": True},
    "auth": {"existingSecret": "ra-token", "requireForAllocation": True},
    "serviceMonitor": {"enabled": True},
    "networkPolicy": {"enabled": True},
    "ingress": {"enabled": True, "className": "nginx", "hosts": ["rooms.example.com"]},
    "persistence": {"enabled": False},
}
docs, rendered = render(all_on)
deployment, main, pod = common_checks("all options", docs, rendered)
check("all options: TLS flags", "--tls-client-ca=/etc/room-allocator/tls/ca.crt" in main["args"])
check("all options: token flag", "--auth-token-file=/etc/room-allocator/auth/token" in main["args"])
check("all options: ServiceMonitor", len(by_kind(docs, "ServiceMonitor")) == 1)
check("all options: NetworkPolicy", len(by_kind(docs, "NetworkPolicy")) == 1)
check("all options: Ingress", len(by_kind(docs, "Ingress")) == 1)
check("all options: emptyDir without persistence", any("emptyDir" in v for v in pod["volumes"]))

# 5. The schema rejects bad values with a message.
for bad, words in [
    ({"logFormat": "xml"}, "logFormat"),
    ({"replicaCount": 0}, "replicaCount"),
    ({"etcd": {"endpoints": ["etcd:2379"]}}, "endpoints"),
    ({"retention": "a day"}, "retention"),
    ({"replicas": 3}, "replicas"),
]:
    try:
        helm_python.Chart.load(CHART).validate_schema(bad)
        check(f"schema rejects {bad}", False, "accepted")
    except helm_python.HelmError as error:
        check(f"schema rejects {bad}", words in str(error), str(error))

for failure in failed:
    print("FAILED", failure)
print(f"chart: {passed} passed, {len(failed)} failed")
sys.exit(1 if failed else 0)
