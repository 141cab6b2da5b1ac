#!/usr/bin/env python3
"""Checks the Helm chart offline, against the real binary.

- Lint, render several value sets, validate every manifest against the
  Kubernetes 1.30 schemas (strict; CRDs are checked by hand), and assert what
  the chart promises.
- Run every rendered `serve` argument list through `serve --check-config`,
  with the mounted Secrets laid out as the kubelet does, so the chart never
  passes a flag, a path or a value the server refuses.
- Compare values.schema.json with `room-allocator config-schema` (the
  binary's own bounds and patterns) and, on every bound's edges, the schema's
  verdict with the binary's.
- For plaintext, TLS and mutual TLS (with and without the token): make real
  certificates with openssl, start the binary with the rendered arguments
  (ports moved to loopback, mounts to temporary files), ask the health port
  what each rendered probe asks, run the rendered `helm test` pod's script
  with busybox, refuse plaintext on the TLS port, and rotate the certificate
  and the token the way the kubelet swaps a Secret volume.
- Scrape /metrics (before any call and after calls of every kind) and check
  that every metric the alerts and the dashboard use exists with the right
  type and labels; check content negotiation and `promtool check metrics`.
- `promtool check rules` and `promtool test rules` on the rendered alerts.

Usage: chart_test.py BINARY   (run by scripts/test.sh with its venv python)
Needs: helm-python-sdk, kubernetes-validate, PyYAML, jsonschema (the venv);
promtool (Debian: prometheus), openssl, busybox (Debian: busybox-static).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import helm_python
import jsonschema
import kubernetes_validate
import yaml

CHART = "helm/room-allocator"
KUBE_VERSION = "1.30.0"
BINARY = os.path.abspath(sys.argv[1])
CHART_YAML = yaml.safe_load(open(f"{CHART}/Chart.yaml"))
RELEASE = "ra"
NAMESPACE = "inference"
FULLNAME = "ra-room-allocator"
ALLOCATOR = "room_allocator.v1.RoomAllocatorService"
# Custom resources: no upstream schema; checked field by field below.
CRDS = {"ServiceMonitor", "PrometheusRule", "GRPCRoute"}
# Every wait on a process or a server is bounded by this many seconds.
WAIT = 15
# Reloads happen every 2 s (RELOAD_INTERVAL in src/server.rs).
RELOAD_WAIT = 10
CLEAN_ENV = {"PATH": "/usr/bin:/bin"}

passed = 0
failed = []
# Every serve flag some rendered configuration sets (for the coverage check).
flags_rendered = set()


def check(name, condition, detail=""):
    global passed
    if condition:
        passed += 1
    else:
        failed.append(f"{name}: {detail}")
    return condition


STARTED = time.monotonic()


def section(title):
    print(f"== {title} (at {time.monotonic() - STARTED:.1f} s)", flush=True)


def report_and_exit(*error):
    """Prints the failures and the closing line scripts/test.sh counts, also
    when the test itself crashed (then with the traceback, as a failure)."""
    if error:
        sys.__excepthook__(*error)
        failed.append(f"the chart test crashed: {error[1]!r}")
    for failure in failed:
        print("FAILED", failure)
    print(f"chart: {passed} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


sys.excepthook = report_and_exit


def run(argv, timeout=WAIT, **kwargs):
    """A bounded subprocess run; a timeout is a failed result, not a crash."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    except subprocess.TimeoutExpired as error:
        return subprocess.CompletedProcess(argv, 124, error.stdout or "", f"timed out after {timeout} s")


# ---------------------------------------------------------------- tools

TOOLS = {
    "promtool": "Debian package prometheus",
    "openssl": "Debian package openssl",
    "busybox": "Debian package busybox-static (the shell the test pod runs)",
}
have = {tool: shutil.which(tool) is not None for tool in TOOLS}
for tool, where in TOOLS.items():
    check(f"tool {tool} is installed", have[tool], f"install it ({where}); CI must have it")
version = run([BINARY, "--version"])
if not check("the binary runs", version.returncode == 0, f"{BINARY}: {version.stderr}"):
    report_and_exit()


# ---------------------------------------------------------------- rendering

_loaded = {}


def load(chart=CHART):
    """Charts are immutable: load each once."""
    if chart not in _loaded:
        _loaded[chart] = helm_python.Chart.load(chart)
    return _loaded[chart]


def render(values, chart=CHART):
    loaded = load(chart)
    loaded.validate_schema(values)
    rendered = loaded.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    return docs, rendered


def render_error(values):
    """The error message if the values do not render, else None."""
    try:
        render(values)
        return None
    except helm_python.HelmError as error:
        return str(error)


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def container(docs):
    deployment = by_kind(docs, "Deployment")[0]
    return deployment, deployment["spec"]["template"]["spec"]["containers"][0]


def test_pod(docs):
    pods = [d for d in docs if d["kind"] == "Pod" and d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    return pods[0] if len(pods) == 1 else None


def nulls(node, path=""):
    """Paths of keys that render empty (`annotations:` with nothing under it)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from (f"{path}.{key}",) if value is None else nulls(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from nulls(value, f"{path}[{index}]")


def validate(name, docs):
    for doc in docs:
        empty = list(nulls(doc))
        check(f"{name}: {doc['kind']} has no empty keys", not empty, empty)
        if doc["kind"] in CRDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            check(f"{name}: {doc['kind']} is valid for Kubernetes {KUBE_VERSION}", True)
        except Exception as error:  # noqa: BLE001 - report every failure
            check(f"{name}: {doc['kind']} {doc['metadata']['name']}", False, str(error)[:500])


# ---------------------------------------------------------------- a fake cluster

def write_secret_volume(directory, files):
    """Lays out a Secret volume as the kubelet's atomic writer does: the files
    in a timestamped directory, `..data` pointing at it, and one link per key
    through `..data`. A later call swaps `..data` atomically (rename), which
    is what a rotation looks like to the pod; subPath mounts never see it."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = directory / f"..{time.time_ns()}"
    stamp.mkdir()
    for path, data in files.items():
        target = stamp / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    old = os.path.realpath(directory / "..data") if (directory / "..data").exists() else None
    tmp_link = directory / "..data_tmp"
    os.symlink(stamp.name, tmp_link)
    os.replace(tmp_link, directory / "..data")
    for path in files:
        top = path.split("/")[0]
        link = directory / top
        if not link.is_symlink():
            os.symlink(f"..data/{top}", link)
    if old:
        shutil.rmtree(old)


def secret_files(volume, secrets):
    source = volume["secret"]
    data = secrets[source["secretName"]]
    items = source.get("items") or [{"key": key, "path": key} for key in data]
    return {item["path"]: data[item["key"]] for item in items}


def materialize(pod_spec, spec, secrets, root):
    """The container's mounts laid out under `root` and its environment, as
    the kubelet would give them. Returns (mounts, env, volume_dirs)."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
    mounts = []
    dirs = {}
    for mount in spec.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        directory = Path(root) / mount["name"]
        if "secret" in volume:
            write_secret_volume(directory, secret_files(volume, secrets))
        else:  # emptyDir, persistentVolumeClaim: an empty writable directory
            directory.mkdir(parents=True, exist_ok=True)
        mounts.append((mount["mountPath"], str(directory)))
        dirs[mount["name"]] = directory
    env = {}
    for variable in spec.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            env[variable["name"]] = secrets[ref["name"]][ref["key"]].decode()
    return mounts, env, dirs


def rewrite(text, mounts):
    for mount_path, directory in sorted(mounts, key=lambda m: -len(m[0])):
        text = text.replace(mount_path, directory)
    return text


def make_pki(directory):
    """A CA, a server certificate (RSA, PKCS#1: cert-manager's default) for
    127.0.0.1/localhost/the Service, one that is also a client certificate
    (EC P-256, PKCS#8), a router's client certificate, and a second CA with a
    server certificate for rotation. Returns {name: bytes}."""
    d = Path(directory)

    def openssl(*args):
        result = run(["openssl", *args], timeout=60, cwd=d)
        if result.returncode != 0:
            raise RuntimeError(f"openssl {' '.join(args)}: {result.stderr}")

    def ca(name):
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
                "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def leaf(name, issuer, usages, rsa=False, san=True):
        if rsa:
            openssl("genrsa", "-traditional", "-out", f"{name}.key", "2048")
        else:
            openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key")
        openssl("req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        extensions = [f"extendedKeyUsage={usages}", "basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment"]
        if san:
            extensions.append(f"subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:{FULLNAME},DNS:{FULLNAME}.{NAMESPACE}.svc")
        (d / f"{name}.ext").write_text("\n".join(extensions) + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{issuer}.crt", "-CAkey", f"{issuer}.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")

    ca("ca")
    leaf("server", "ca", "serverAuth", rsa=True)
    leaf("dual", "ca", "serverAuth,clientAuth")
    leaf("router", "ca", "clientAuth", san=False)
    ca("ca2")
    leaf("server2", "ca2", "serverAuth")
    return {p.name: p.read_bytes() for p in d.iterdir() if p.suffix in (".crt", ".key")}


# ---------------------------------------------------------------- the binary

def accepted_by_binary(name, args, pod_spec, spec, secrets):
    """`serve --check-config` on the rendered arguments, with the container's
    mounts and environment laid out as the kubelet would."""
    with tempfile.TemporaryDirectory() as root:
        mounts, env, _ = materialize(pod_spec, spec, secrets, root)
        env.update(CLEAN_ENV)
        argv = [rewrite(a, mounts) for a in args]
        result = run([BINARY, *argv, "--check-config"], env=env)
    return check(f"{name}: `room-allocator {' '.join(args)}` is accepted", result.returncode == 0, result.stderr[-600:])


def flags_of(args, env=()):
    found = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    for variable in env:
        if variable["name"].startswith("ROOM_ALLOCATOR_"):
            found.add("--" + variable["name"][len("ROOM_ALLOCATOR_"):].lower().replace("_", "-"))
    return found


class Server:
    """The binary started with a rendered container spec: ports moved to
    loopback (port 0; the bound addresses come from its `listening` log line),
    mounts to temporary directories, the drain delay to 0. Stopped by PID."""

    def __init__(self, docs, secrets, root):
        deployment, spec = container(docs)
        self.pod_spec = deployment["spec"]["template"]["spec"]
        self.spec = spec
        self.mounts, env, self.dirs = materialize(self.pod_spec, spec, secrets, Path(root) / "server")
        env.update(CLEAN_ENV)
        self.container_port = {}
        args = []
        for arg in spec["args"]:
            flag, _, value = arg.partition("=")
            if flag in ("--listen", "--metrics-listen", "--health-listen"):
                self.container_port[flag] = int(value.rsplit(":", 1)[1])
                arg = f"{flag}=127.0.0.1:0"
            elif flag == "--drain-delay-secs":
                arg = f"{flag}=0"
            args.append(rewrite(arg, self.mounts))
        self.log_path = Path(root) / "server.log"
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen([BINARY, *args], stdout=subprocess.DEVNULL, stderr=self.log, env=env)
        self.addr = {}
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and self.process.poll() is None:
            for line in self.log_path.read_text().splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("message") == "listening":
                    self.addr = {
                        "--listen": event["grpc_addr"],
                        "--metrics-listen": event["metrics_addr"],
                        "--health-listen": event["health_addr"],
                    }
            if self.addr:
                break
            time.sleep(0.05)
        if not self.addr:
            self.stop()
            raise RuntimeError(f"the server did not start: {self.log_path.read_text()[-1500:]}")

    def at_container_port(self, port):
        """The loopback address of what listens on this container port."""
        flag = next((f for f, p in self.container_port.items() if p == port), None)
        return self.addr.get(flag)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=WAIT)
        self.log.close()
        return self.process.returncode


def client(*args, env=None, timeout=WAIT):
    return run([BINARY, *args], env={**CLEAN_ENV, **(env or {})}, timeout=timeout)


def scrape(addr, accept=None):
    # No proxies: the scrape goes to loopback only.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"http://{addr}/metrics", headers={"Accept": accept} if accept else {})
    with opener.open(request, timeout=WAIT) as response:
        return response.headers.get("Content-Type", ""), response.read().decode()


# ---------------------------------------------------------------- metrics

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
USED = re.compile(r"\b((?:room_allocator|grpc_server|process)_[a-zA-Z0-9_]*)(\{[^}]*\})?")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
RANGE_FUNCTION = re.compile(r"\b(rate|irate|increase)\(\s*$")
# Labels Prometheus adds to targets; the server never exports them.
TARGET_LABELS = {"namespace", "job", "pod", "instance", "service", "container", "endpoint"}


def parse_exposition(text):
    types, samples = {}, []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
        elif line and not line.startswith("#"):
            match = SAMPLE.match(line)
            samples.append((match.group(1), dict(LABEL.findall(match.group(2) or "")), float(match.group(3))))
    return types, samples


def family_of(name, types):
    """The family a sample name belongs to, and its type. The text format
    names counter families with their _total; only histograms have _bucket,
    and _sum/_count belong to histograms and summaries."""
    if name in types:
        return name, types[name]
    for suffix, kinds in (("_bucket", ("histogram",)), ("_sum", ("histogram", "summary")), ("_count", ("histogram", "summary"))):
        base = name[: -len(suffix)]
        if name.endswith(suffix) and types.get(base) in kinds:
            return base, types[base]
    return None, None


def matches(actual, op, value):
    return actual == value if op == "=" else re.fullmatch(value, actual) is not None


def uses(expr):
    """(metric, matchers on the server's own labels, inside a range function)."""
    for match in USED.finditer(expr):
        matchers = [m for m in MATCHER.findall(match.group(2) or "") if m[0] not in TARGET_LABELS]
        yield match.group(1), matchers, bool(RANGE_FUNCTION.search(expr[: match.start()]))


def check_uses(name, exprs, types, samples):
    names = {sample[0] for sample in samples}
    count = 0
    for expr in exprs:
        for metric, matchers, in_range in uses(expr):
            count += 1
            family, kind = family_of(metric, types)
            if not check(f"{name}: {metric} is exported", metric in names and family is not None, f"in {expr}"):
                continue
            if in_range:
                check(f"{name}: rate/increase of {metric} is over a counter or histogram", kind in ("counter", "histogram"), f"{family} is a {kind}")
            else:
                check(f"{name}: {metric} read as it is is a gauge", kind == "gauge", f"{family} is a {kind}: use rate() or increase()")
            # One exported series must satisfy every matcher at once.
            wanted = [(label, op, value) for label, op, value in matchers if "$" not in value and op in ("=", "=~")]
            if wanted:
                selector = ",".join(f'{label}{op}"{value}"' for label, op, value in wanted)
                check(
                    f"{name}: {metric}{{{selector}}} has a series",
                    any(s[0] == metric and all(matches(s[1].get(label, ""), op, value) for label, op, value in wanted) for s in samples),
                    f"in {expr}",
                )
    check(f"{name}: some metrics are used", count > 0)


# ================================================================ static checks

section("values.yaml, lint, schema")
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

report = helm_python.lint(CHART, strict=True, kube_version=f"v{KUBE_VERSION}")
problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
check("helm lint --strict", not problems, problems)

schema = json.load(open(f"{CHART}/values.schema.json"))
try:
    jsonschema.Draft7Validator.check_schema(schema)
    check("values.schema.json is a valid draft-07 schema", True)
except jsonschema.SchemaError as error:
    check("values.schema.json is a valid draft-07 schema", False, str(error)[:300])
defaults = load().values
check("the defaults satisfy the schema (jsonschema)", jsonschema.Draft7Validator(schema).is_valid(defaults))
check("the schema's root admits `global` (subchart use)", "global" in schema["properties"])

readme = Path(f"{CHART}/README.md").read_text() if Path(f"{CHART}/README.md").exists() else ""
check("the chart has a README.md", bool(readme))
for key in yaml.safe_load(open(f"{CHART}/values.yaml")):
    check(f"README.md documents the value {key}", f"`{key}" in readme, key)
for topic in ("## Probes", "## TLS", "Rotation", "## Readiness", "## Alerts", "## Dashboard", "headless", "GRPCRoute", "subchart"):
    check(f"README.md covers {topic}", topic in readme)

# The image's base images are pinned by digest (issue 21 conventions): every
# FROM of the Dockerfile, through its ARG default, names `@sha256:` and 64
# hex digits, so a tag-only default (which moves when the tag is rebuilt)
# fails here. Re-resolving the digests at release is the Dockerfile's note.
dockerfile = open("Dockerfile").read()
arg_defaults = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", dockerfile, re.M))
from_images = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
check("Dockerfile has FROM lines", len(from_images) >= 2, from_images)
for image in from_images:
    arg = re.fullmatch(r"\$\{?(\w+)\}?", image)
    resolved = arg_defaults.get(arg.group(1), "") if arg else image
    check(f"Dockerfile: FROM {image} is pinned by digest ({resolved or 'no default'})", re.fullmatch(r"[^@\s]+@sha256:[0-9a-f]{64}", resolved) is not None, resolved)

# Secrets the renders below name, with real contents (the binary reads them).
pki_dir = tempfile.mkdtemp(prefix="chart-test-pki-")
try:
    pki = make_pki(pki_dir) if have["openssl"] else {}
finally:
    shutil.rmtree(pki_dir, ignore_errors=True)
check("openssl made the test certificates", bool(pki))


def tls_secret(cert, ca="ca"):
    return {"tls.crt": pki.get(f"{cert}.crt", b""), "tls.key": pki.get(f"{cert}.key", b""), "ca.crt": pki.get(f"{ca}.crt", b"")}


SECRETS = {
    "ra-tls": tls_secret("server"),
    "ra-tls-dual": tls_secret("dual"),
    "router-tls": tls_secret("router"),
    "etcd-client-tls": tls_secret("router"),
    "ra-token": {"token": b"s3cret-token"},
    # Mid-rotation: the old token and the new one, one per line.
    "ra-tokens": {"token": b"old-token\n  s3cret-token  \n\n"},
    "etcd-credentials": {"password": b"etcd-password"},
}


def common_checks(name, values):
    docs, rendered = render(values)
    validate(name, docs)
    deployment, main = container(docs)
    pod = deployment["spec"]["template"]["spec"]
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    check(f"{name}: ports grpc, metrics and health", set(ports) == {"grpc", "metrics", "health"}, ports)
    args = main["args"]
    check(f"{name}: --health-listen on the health port", f"--health-listen=0.0.0.0:{ports.get('health')}" in args, args)
    for probe, service in (("startupProbe", ""), ("readinessProbe", ALLOCATOR), ("livenessProbe", "")):
        grpc = main.get(probe, {}).get("grpc", {})
        check(f"{name}: {probe} is a native gRPC probe on the health port", grpc.get("port") == ports.get("health") and "exec" not in main[probe], main.get(probe))
        check(f"{name}: {probe} asks for service {service!r}", grpc.get("service", "") == service, grpc)
    security = main["securityContext"]
    check(f"{name}: read-only root", security.get("readOnlyRootFilesystem") is True)
    check(f"{name}: no privilege escalation", security.get("allowPrivilegeEscalation") is False)
    check(f"{name}: drops ALL capabilities", security.get("capabilities", {}).get("drop") == ["ALL"])
    check(f"{name}: runs as non-root", pod["securityContext"].get("runAsNonRoot") is True)
    check(f"{name}: resources set", "requests" in main["resources"] and "limits" in main["resources"])
    delay = next(int(a.split("=")[1]) for a in args if a.startswith("--drain-delay-secs="))
    timeout = next(int(a.split("=")[1]) for a in args if a.startswith("--drain-timeout-secs="))
    check(f"{name}: terminationGracePeriodSeconds exceeds the drain", pod["terminationGracePeriodSeconds"] > delay + timeout, pod["terminationGracePeriodSeconds"])
    selector = deployment["spec"]["selector"]["matchLabels"]
    check(f"{name}: no chart version in selectors", not any("chart" in k or "version" in k for k in selector), selector)
    service = next(s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") != "None")
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    check(f"{name}: Service grpc port has appProtocol grpc", grpc_port.get("appProtocol") == "grpc")
    check(f"{name}: the health port is on no Service", all(p.get("targetPort") != "health" and p["port"] != ports.get("health") for s in by_kind(docs, "Service") for p in s["spec"]["ports"]))
    # Secrets reach the pod as whole volumes: a subPath mount never sees the
    # kubelet's atomic swap of a rotated Secret.
    for spec_name, spec in [("server", main)] + [("test", c) for c in (test_pod(docs) or {}).get("spec", {}).get("containers", [])]:
        check(f"{name}: {spec_name} mounts have no subPath", not any("subPath" in m or "subPathExpr" in m for m in spec.get("volumeMounts", [])))
    annotations = deployment["spec"]["template"]["metadata"].get("annotations") or {}
    monitor = bool(by_kind(docs, "ServiceMonitor"))
    check(f"{name}: prometheus.io/scrape annotations exactly when there is no ServiceMonitor", (annotations.get("prometheus.io/scrape") == "true") != monitor, annotations)
    accepted_by_binary(name, args, pod, main, SECRETS)
    flags_rendered.update(flags_of(args, main.get("env", [])))

    tester = test_pod(docs)
    if check(f"{name}: one helm test pod", tester is not None):
        spec = tester["spec"]
        labels = tester["metadata"]["labels"]
        check(f"{name}: the test pod is not selected by the Service", not all(labels.get(k) == v for k, v in service["spec"]["selector"].items()), labels)
        script_container = spec["containers"][0]
        command = script_container["command"]
        init = spec.get("initContainers", [])
        check(f"{name}: an init container copies the shell the test runs", len(init) == 1 and init[0]["command"] == ["cp", "/bin/busybox", command[0]], (init, command))
        check(f"{name}: the test runs the room-allocator image", script_container["image"] == main["image"])
        if have["busybox"]:
            syntax = run(["busybox", "sh", "-n", "-c", script_container["args"][0]])
            check(f"{name}: the test script parses (busybox sh -n)", syntax.returncode == 0, syntax.stderr)
    notes = next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))
    check(f"{name}: NOTES has port-forward and grpcurl", "port-forward" in notes and "grpcurl" in notes and "AllocateRoom" in notes)
    return docs, deployment, main, pod


section("renders")
# 1. Defaults: embedded store, one replica, a PVC, Recreate.
docs, deployment, main, pod = common_checks("embedded", {})
check("embedded: 1 replica", deployment["spec"]["replicas"] == 1)
check("embedded: Recreate", deployment["spec"]["strategy"]["type"] == "Recreate")
pvcs = by_kind(docs, "PersistentVolumeClaim")
check("embedded: a PVC by default", len(pvcs) == 1)
mount = next(m for m in main["volumeMounts"] if m["name"] == "data")
check("embedded: the volume is the data dir", f"--data-dir={mount['mountPath']}" in main["args"], main["args"])
volume = next(v for v in pod["volumes"] if v["name"] == "data")
check("embedded: the data volume is the PVC", volume["persistentVolumeClaim"]["claimName"] == pvcs[0]["metadata"]["name"])
check("embedded: no PDB", not by_kind(docs, "PodDisruptionBudget"))
check("embedded: image tag is the appVersion", main["image"] == f"ghcr.io/room-allocator/room-allocator:{CHART_YAML['appVersion']}", main["image"])
check("embedded: no headless Service, GRPCRoute or PrometheusRule by default", len(by_kind(docs, "Service")) == 1 and not by_kind(docs, "GRPCRoute") and not by_kind(docs, "PrometheusRule"))

# 2. Embedded with more than one replica must not render.
message = render_error({"replicaCount": 2}) or ""
check("embedded with 2 replicas is refused", "duplicate rooms" in message and "etcd.endpoints" in message, message or "it rendered")

# 3. etcd mode: 3 replicas, auth, TLS to etcd, PDB, spread, RollingUpdate.
etcd_values = {
    "replicaCount": 3,
    "workerThreads": 4,
    "etcd": {
        "endpoints": ["https://etcd-0.etcd:2379", "https://etcd-1.etcd:2379"],
        "auth": {"username": "room-allocator", "existingSecret": "etcd-credentials"},
        "tls": {"existingSecret": "etcd-client-tls", "clientCert": True},
    },
}
docs, deployment, main, pod = common_checks("etcd", etcd_values)
check("etcd: 3 replicas", deployment["spec"]["replicas"] == 3)
check("etcd: RollingUpdate", deployment["spec"]["strategy"]["type"] == "RollingUpdate")
check("etcd: a PDB", len(by_kind(docs, "PodDisruptionBudget")) == 1)
check("etcd: no PVC", not by_kind(docs, "PersistentVolumeClaim"))
check("etcd: topology spread over nodes and zones", len(pod.get("topologySpreadConstraints", [])) == 2)
check("etcd: anti-affinity", "podAntiAffinity" in pod.get("affinity", {}))
check("etcd: endpoints passed", "--etcd-endpoints=https://etcd-0.etcd:2379,https://etcd-1.etcd:2379" in main["args"])
check("etcd: --worker-threads passed", "--worker-threads=4" in main["args"], main["args"])
# The password is a file from the whole-mounted Secret (reread at each
# authentication: a rotated password needs no restart), never an env var.
check("etcd: --etcd-password-file passed", "--etcd-password-file=/etc/room-allocator/etcd-auth/password" in main["args"], main["args"])
check("etcd: no password in the environment", not any(e["name"].startswith("ROOM_ALLOCATOR_ETCD_PASSWORD") for e in main.get("env", [])), main.get("env"))
auth_volume = next((v for v in pod.get("volumes", []) if v["name"] == "etcd-auth"), {})
check("etcd: the etcd auth Secret's password key is mounted as file password", auth_volume.get("secret", {}).get("secretName") == "etcd-credentials" and auth_volume["secret"].get("items") == [{"key": "password", "path": "password"}], auth_volume)
auth_mount = next((m for m in main.get("volumeMounts", []) if m["name"] == "etcd-auth"), {})
check("etcd: the etcd auth Secret is mounted whole and read-only", auth_mount.get("mountPath") == "/etc/room-allocator/etcd-auth" and auth_mount.get("readOnly") is True and "subPath" not in auth_mount, auth_mount)

docs, deployment, main, pod = common_checks("etcd, no Secrets", {"replicaCount": 2, "etcd": {"endpoints": ["http://etcd.etcd:2379"]}})
check("etcd, no Secrets: no volumes", "volumes" not in pod and "volumeMounts" not in main, pod.get("volumes"))

docs, deployment, main, pod = common_checks("token, allocation opened", {"auth": {"existingSecret": "ra-token", "allowUnauthenticatedAllocation": True}})
check("token, allocation opened: the opt-out flag", "--allow-unauthenticated-allocation" in main["args"], main["args"])

# 4. TLS with client certificates, a bearer token, and every option on.
digest = "sha256:" + "ab" * 32
all_on = {
    "image": {"digest": digest, "tag": "ignored"},
    "tls": {"enabled": True, "existingSecret": "ra-tls", "requireClientCert": True, "clientAllowedNames": ["router-0", "10.0.0.7"]},
    "auth": {"existingSecret": "ra-token", "requireForAllocation": True},
    "tests": {"clientCertSecret": "router-tls", "tlsServerName": "rooms.example.com"},
    "serviceMonitor": {"enabled": True},
    "networkPolicy": {"enabled": True},
    "ingress": {"enabled": True, "className": "nginx", "hosts": ["rooms.example.com"]},
    "grpcRoute": {"enabled": True, "parentRefs": [{"name": "internal", "namespace": "gateways"}], "hostnames": ["rooms.example.com"]},
    "service": {"headless": True},
    "metrics": {"prometheusRule": {"enabled": True, "alertLabels": {"team": "inference"}}, "grafanaDashboard": {"enabled": True}},
    "persistence": {"enabled": False},
    "extraArgs": ["--etcd-prefix=/rooms: #1/"],
}
docs, deployment, main, pod = common_checks("all options", all_on)
check("all options: TLS flags", "--tls-client-ca=/etc/room-allocator/tls/ca.crt" in main["args"])
check("all options: token flag", "--auth-token-file=/etc/room-allocator/auth/token" in main["args"])
check("all options: client names flag", "--tls-client-allowed-names=router-0,10.0.0.7" in main["args"], main["args"])
check("all options: ServiceMonitor", len(by_kind(docs, "ServiceMonitor")) == 1)
check("all options: NetworkPolicy", len(by_kind(docs, "NetworkPolicy")) == 1)
check("all options: Ingress", len(by_kind(docs, "Ingress")) == 1)
check("all options: emptyDir without persistence", any("emptyDir" in v for v in pod["volumes"]))
check("all options: the digest replaces the tag", main["image"] == f"ghcr.io/room-allocator/room-allocator@{digest}", main["image"])
check("all options: the test pod runs the same digest", test_pod(docs)["spec"]["containers"][0]["image"] == main["image"])
check("all options: extraArgs are passed quoted, intact", main["args"][-1] == "--etcd-prefix=/rooms: #1/", main["args"][-1])
check("all options: the test pod names the server certificate", {"name": "ROOM_ALLOCATOR_TLS_SERVER_NAME", "value": "rooms.example.com"} in test_pod(docs)["spec"]["containers"][0]["env"])
client_volume = next(v for v in test_pod(docs)["spec"]["volumes"] if v["name"] == "client-tls")
check("all options: the test presents the client certificate Secret", client_volume["secret"]["secretName"] == "router-tls", client_volume)
policy = by_kind(docs, "NetworkPolicy")[0]
tester_labels = test_pod(docs)["metadata"]["labels"]
test_rule = policy["spec"]["ingress"][0]["from"][1]["podSelector"]["matchLabels"]
check("all options: the NetworkPolicy admits the test pod", all(tester_labels.get(k) == v for k, v in test_rule.items()), test_rule)
headless = [s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") == "None"]
if check("all options: a headless Service", len(headless) == 1):
    spec = headless[0]["spec"]
    check("all options: headless Service is named <fullname>-headless", headless[0]["metadata"]["name"] == f"{FULLNAME}-headless")
    check("all options: headless Service selects the server pods", spec["selector"] == deployment["spec"]["selector"]["matchLabels"])
    check("all options: headless Service has only gRPC (no second scrape)", [p["name"] for p in spec["ports"]] == ["grpc"], spec["ports"])
    check("all options: headless Service lists ready pods only", spec.get("publishNotReadyAddresses") is False)
route = by_kind(docs, "GRPCRoute")
if check("all options: a GRPCRoute", len(route) == 1):
    route = route[0]
    check("all options: GRPCRoute is gateway.networking.k8s.io/v1", route["apiVersion"] == "gateway.networking.k8s.io/v1")
    check("all options: GRPCRoute attaches to the Gateway", route["spec"]["parentRefs"] == [{"name": "internal", "namespace": "gateways"}])
    check("all options: GRPCRoute hostnames", route["spec"]["hostnames"] == ["rooms.example.com"])
    backend = route["spec"]["rules"][0]["backendRefs"][0]
    check("all options: GRPCRoute goes to the Service's gRPC port", backend == {"name": FULLNAME, "port": 50051}, backend)
monitor = by_kind(docs, "ServiceMonitor")[0]
check("all options: ServiceMonitor scrapes the metrics port", monitor["spec"]["endpoints"][0]["port"] == "metrics")
check("all options: ServiceMonitor selects the Service", monitor["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"])
rule = by_kind(docs, "PrometheusRule")
if check("all options: a PrometheusRule", len(rule) == 1):
    rule = rule[0]
    check("all options: PrometheusRule is monitoring.coreos.com/v1", rule["apiVersion"] == "monitoring.coreos.com/v1")
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    check("all options: every alert carries the extra labels", all(r["labels"].get("team") == "inference" for r in alerts))
    check("all options: every alert has a severity, summary and description", all(r["labels"].get("severity") in ("warning", "critical") and r["annotations"].get("summary") and r["annotations"].get("description") for r in alerts))
dashboards = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
if check("all options: a dashboard ConfigMap", len(dashboards) == 1):
    check("all options: the dashboard ConfigMap has grafana_dashboard: \"1\"", dashboards[0]["metadata"]["labels"].get("grafana_dashboard") == "1")
    dashboard = json.loads(dashboards[0]["data"]["room-allocator.json"])
    check("all options: the ConfigMap holds the dashboard file", dashboard == json.load(open(f"{CHART}/dashboards/room-allocator.json")))

# 5. Values that must not render, each with a message saying what to do.
for bad, words in [
    ({"tls": {"enabled": True}}, "tls.existingSecret"),
    ({"tls": {"requireClientCert": True}}, "tls.enabled"),
    ({"auth": {"requireForAllocation": True}}, "auth.existingSecret"),
    ({"auth": {"allowUnauthenticatedAllocation": True}}, "auth.existingSecret"),
    ({"tls": {"enabled": True, "existingSecret": "ra-tls", "clientAllowedNames": ["router-0"]}}, "tls.requireClientCert"),
    ({"auth": {"existingSecret": "ra-token", "requireForAllocation": True, "allowUnauthenticatedAllocation": True}}, "contradict"),
    ({"etcd": {"endpoints": ["http://etcd:2379"], "auth": {"username": "u"}}}, "etcd.auth.existingSecret"),
    ({"grpcRoute": {"enabled": True}}, "parentRefs"),
    ({"minRoom": "10", "maxRoom": "9"}, "minRoom 10 is above maxRoom 9"),
    # Values that render but crash-loop (issue 21, item 5): the binary takes
    # --etcd-username and the password only together, and only with etcd.
    ({"etcd": {"endpoints": ["http://etcd:2379"], "auth": {"existingSecret": "etcd-credentials"}}}, "etcd.auth.existingSecret needs etcd.auth.username"),
    ({"etcd": {"auth": {"username": "u", "existingSecret": "etcd-credentials"}}}, "etcd.auth is set but etcd.endpoints is empty"),
    ({"etcd": {"auth": {"existingSecret": "etcd-credentials"}}}, "etcd.auth is set but etcd.endpoints is empty"),
    ({"etcd": {"auth": {"username": "u"}}}, "etcd.auth is set but etcd.endpoints is empty"),
    ({"etcd": {"tls": {"existingSecret": "etcd-client-tls"}}}, "etcd.tls is set but etcd.endpoints is empty"),
    ({"etcd": {"endpoints": ["https://etcd:2379"], "tls": {"clientCert": True}}}, "etcd.tls.clientCert needs etcd.tls.existingSecret"),
    # Alert rules whose selector can match no series (issue 21, item 4).
    ({"metrics": {"prometheusRule": {"enabled": True}}}, "set metrics.prometheusRule.selector or enable the ServiceMonitor"),
    ({"metrics": {"prometheusRule": {"enabled": True}}, "serviceMonitor": {"enabled": True, "relabelings": [{"targetLabel": "job", "replacement": "rooms"}]}},
     "serviceMonitor.relabelings rewrites the label job"),
    ({"metrics": {"prometheusRule": {"enabled": True}}, "serviceMonitor": {"enabled": True, "metricRelabelings": [{"action": "labeldrop", "regex": "namespace"}]}},
     "serviceMonitor.metricRelabelings rewrites the label namespace"),
]:
    message = render_error(bad) or ""
    check(f"{bad} is refused", words in message, message or "it rendered")
# ... and what the refusals must still let through.
for good in [
    {"metrics": {"prometheusRule": {"enabled": True, "selector": 'job="kubernetes-pods",app_kubernetes_io_instance="ra"'}}},
    {"metrics": {"prometheusRule": {"enabled": True, "selector": 'job="rooms"'}}, "serviceMonitor": {"enabled": True, "relabelings": [{"targetLabel": "job", "replacement": "rooms"}]}},
    {"metrics": {"prometheusRule": {"enabled": True}}, "serviceMonitor": {"enabled": True, "relabelings": [{"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}]}},
    {"etcd": {"endpoints": ["http://etcd:2379"], "auth": {"username": "u", "existingSecret": "etcd-credentials"}}},
]:
    message = render_error(good)
    check(f"{good} renders", message is None, message)

# 6. The schema rejects bad values with a message naming them.
for bad, words in [
    ({"logFormat": "xml"}, "logFormat"),
    ({"replicaCount": 0}, "replicaCount"),
    ({"etcd": {"endpoints": ["etcd:2379"]}}, "endpoints"),
    ({"retention": "a day"}, "retention"),
    ({"retention": "0"}, "retention"),
    ({"replicas": 3}, "replicas"),
    ({"minRoom": 5}, "minRoom"),
    ({"maxRoom": "09"}, "maxRoom"),
    ({"image": {"digest": "latest"}}, "digest"),
    ({"service": {"healthPort": 0}}, "healthPort"),
    ({"metrics": {"prometheusRule": {"alerts": {"notReadyFor": "5 minutes"}}}}, "notReadyFor"),
    ({"tests": {"worker": "a b"}}, "worker"),
]:
    try:
        load().validate_schema(bad)
        check(f"schema rejects {bad}", False, "accepted")
    except helm_python.HelmError as error:
        check(f"schema rejects {bad}", words in str(error), str(error))
try:
    load().validate_schema({"global": {"imageRegistry": "registry.example.com"}})
    check("schema admits global values", True)
except helm_python.HelmError as error:
    check("schema admits global values", False, str(error))

# 7. A long name keeps every Service name a DNS label.
docs, _ = render({"fullnameOverride": "r" * 63, "service": {"headless": True}})
names = [s["metadata"]["name"] for s in by_kind(docs, "Service")]
check("a 63-character full name keeps Service names within 63", all(len(n) <= 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", n) for n in names), names)

# 8. As a subchart: the parent's global values pass the schema.
with tempfile.TemporaryDirectory() as parent:
    shutil.copytree(CHART, f"{parent}/charts/room-allocator", ignore=shutil.ignore_patterns("promtool"))
    Path(f"{parent}/Chart.yaml").write_text(
        f"apiVersion: v2\nname: inference-stack\nversion: 0.1.0\ndependencies:\n  - name: room-allocator\n    version: {CHART_YAML['version']}\n"
    )
    Path(f"{parent}/values.yaml").write_text("global:\n  imageRegistry: registry.example.com\nroom-allocator:\n  maxWorkers: 500\n")
    try:
        docs, _ = render({"global": {"team": "inference"}}, chart=parent)
        _, main = container(docs)
        check("as a subchart with global values: renders with the parent's values", "--max-workers=500" in main["args"], main["args"])
    except helm_python.HelmError as error:
        check("as a subchart with global values: renders", False, str(error))

# 9. Conventions (issue 21): labels, history, disruption, spread, scraping,
# network policy, volume access, image.
docs, deployment, main, pod = common_checks("etcd, conventions", {**etcd_values, "serviceMonitor": {"enabled": True}, "networkPolicy": {"enabled": True}})
for doc in docs + [deployment["spec"]["template"]]:
    labels = doc["metadata"].get("labels", {})
    expected = "test" if doc.get("kind") == "Pod" else "allocator"
    check(f"{doc.get('kind', 'pod template')}: app.kubernetes.io/component is {expected}", labels.get("app.kubernetes.io/component") == expected, labels)
check("conventions: the component label is not in the Deployment's selector (selectors are immutable)", "app.kubernetes.io/component" not in deployment["spec"]["selector"]["matchLabels"])
check("conventions: revisionHistoryLimit is set", deployment["spec"].get("revisionHistoryLimit") == 3, deployment["spec"].get("revisionHistoryLimit"))
budget = by_kind(docs, "PodDisruptionBudget")[0]
check("conventions: the PDB lets unhealthy pods be evicted (AlwaysAllow)", budget["spec"].get("unhealthyPodEvictionPolicy") == "AlwaysAllow", budget["spec"])
spread = {c["topologyKey"]: c for c in pod.get("topologySpreadConstraints", [])}
check("conventions: spread over nodes and zones", set(spread) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}, sorted(spread))
check("conventions: each spread counts only the current ReplicaSet (matchLabelKeys pod-template-hash)", spread and all(c.get("matchLabelKeys") == ["pod-template-hash"] for c in spread.values()), spread)
monitor = by_kind(docs, "ServiceMonitor")[0]["spec"]["endpoints"][0]
check("conventions: the ServiceMonitor has a scrapeTimeout", monitor.get("scrapeTimeout") == "10s", monitor)
policy = by_kind(docs, "NetworkPolicy")[0]["spec"]
check("conventions: the NetworkPolicy restricts ingress only by default", policy["policyTypes"] == ["Ingress"] and "egress" not in policy, policy)
docs, _ = render({**etcd_values, "revisionHistoryLimit": 0, "topologySpread": {"zoneTopologyKey": ""},
                  "serviceMonitor": {"enabled": True, "scrapeTimeout": "5s", "relabelings": [{"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}],
                                     "metricRelabelings": [{"sourceLabels": ["__name__"], "regex": "process_.*", "action": "drop"}]},
                  "networkPolicy": {"enabled": True, "extraIngress": [{"from": [{"podSelector": {"matchLabels": {"app": "debug"}}}], "ports": [{"port": "grpc", "protocol": "TCP"}]}],
                                    "egress": {"enabled": True, "etcdPeers": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "etcd"}}}],
                                               "extra": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 4317, "protocol": "TCP"}]}]}}})
validate("etcd, every convention value", docs)
deployment, main = container(docs)
check("conventions: revisionHistoryLimit 0 is kept (not dropped as empty)", deployment["spec"].get("revisionHistoryLimit") == 0, deployment["spec"].get("revisionHistoryLimit"))
spread = deployment["spec"]["template"]["spec"].get("topologySpreadConstraints", [])
check("conventions: zoneTopologyKey \"\" spreads over nodes only", [c["topologyKey"] for c in spread] == ["kubernetes.io/hostname"], spread)
monitor = by_kind(docs, "ServiceMonitor")[0]["spec"]["endpoints"][0]
check("conventions: scrapeTimeout, relabelings and metricRelabelings reach the ServiceMonitor",
      monitor.get("scrapeTimeout") == "5s" and monitor.get("relabelings", [{}])[0].get("targetLabel") == "node" and monitor.get("metricRelabelings", [{}])[0].get("action") == "drop", monitor)
policy = by_kind(docs, "NetworkPolicy")[0]["spec"]
check("conventions: extraIngress is appended", policy["ingress"][-1]["from"][0]["podSelector"]["matchLabels"] == {"app": "debug"}, policy["ingress"])
check("conventions: egress.enabled restricts egress too", policy["policyTypes"] == ["Ingress", "Egress"], policy["policyTypes"])
egress_ports = [sorted((p["port"], p["protocol"]) for p in rule["ports"]) for rule in policy.get("egress", [])]
check("conventions: egress allows DNS", [(53, "TCP"), (53, "UDP")] in egress_ports, egress_ports)
etcd_rule = next((rule for rule in policy.get("egress", []) if rule["ports"] == [{"port": 2379, "protocol": "TCP"}]), None)
check("conventions: egress allows the etcd endpoints' port to etcdPeers", etcd_rule is not None and etcd_rule.get("to") == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "etcd"}}}], policy.get("egress"))
check("conventions: extra egress rules are appended", policy.get("egress", [{}])[-1].get("ports") == [{"port": 4317, "protocol": "TCP"}], policy.get("egress"))
docs, _ = render({"etcd": {"endpoints": ["https://etcd-0.etcd:2379", "https://etcd-1.etcd:12379", "http://etcd-2.etcd"]}, "replicaCount": 2, "networkPolicy": {"enabled": True, "egress": {"enabled": True}}})
validate("etcd, egress to any etcd", docs)
policy = by_kind(docs, "NetworkPolicy")[0]["spec"]
etcd_ports = next((rule["ports"] for rule in policy.get("egress", []) if rule["ports"][0]["port"] != 53), [])
check("conventions: every endpoint's port is allowed (a URL without one: 80 for http://, 443 for https://, as the client dials)",
      sorted(p["port"] for p in etcd_ports) == [80, 2379, 12379], etcd_ports)
check("conventions: no etcdPeers allows the etcd ports to any destination", all("to" not in rule for rule in policy.get("egress", []) if rule["ports"][0]["port"] != 53), policy.get("egress"))
docs, _ = render({"networkPolicy": {"enabled": True, "egress": {"enabled": True}}})
policy = by_kind(docs, "NetworkPolicy")[0]["spec"]
check("conventions: the embedded store needs DNS at most (no etcd egress)", len(policy.get("egress", [])) == 1, policy.get("egress"))
pvc = by_kind(render({})[0], "PersistentVolumeClaim")[0]
check("conventions: the claim is ReadWriteOncePod on Kubernetes 1.29 and later (one pod mounts it, ever)", pvc["spec"]["accessModes"] == ["ReadWriteOncePod"], pvc["spec"]["accessModes"])
pvc = by_kind(render({"persistence": {"accessMode": "ReadWriteOnce"}})[0], "PersistentVolumeClaim")[0]
check("conventions: persistence.accessMode overrides the access mode", pvc["spec"]["accessModes"] == ["ReadWriteOnce"], pvc["spec"]["accessModes"])
dockerfile = Path("Dockerfile").read_text()
exposed = {int(p) for line in re.findall(r"^EXPOSE (.*)$", dockerfile, re.M) for p in line.split()}
check("Dockerfile EXPOSEs the gRPC, metrics and health ports of the chart", {defaults["service"][k] for k in ("grpcPort", "metricsPort", "healthPort")} <= exposed, exposed)
oci = dict(re.findall(r"(org\.opencontainers\.image\.[a-z]+)=\"?([^\s\"\\]*)", dockerfile))
for key in ("source", "title", "description", "licenses", "version", "revision", "created"):
    check(f"Dockerfile has the OCI label org.opencontainers.image.{key}", f"org.opencontainers.image.{key}" in oci, sorted(oci))
check("Dockerfile's image source is the chart's source", oci.get("org.opencontainers.image.source") == CHART_YAML["sources"][0], oci.get("org.opencontainers.image.source"))
check("Dockerfile says how the base images are pinned by digest", "@sha256:" in dockerfile and "digest" in dockerfile.lower())
check("README.md's token rotation matches the server (several tokens, one per line)", "one per line" in readme and "exactly one token" not in readme)


def unschematized(values, node, path=""):
    """Value paths with no entry in the schema (free-form objects, those
    without `properties`, hold whatever the user puts there)."""
    for key, value in values.items():
        child = node.get("properties", {}).get(key)
        if child is None:
            yield f"{path}{key}"
        elif isinstance(value, dict) and "properties" in child:
            yield from unschematized(value, child, f"{path}{key}.")


missing_schema = list(unschematized(defaults, schema))
check("every value has a schema entry", not missing_schema, missing_schema)

# 10. Alerts (issue 21, item 4): a runbook for each, RESOURCE_EXHAUSTED and
# time-to-full alerts, a traffic floor on ratios, one page per job for state
# the replicas share.
RUNBOOKS = Path("docs/runbooks.md")
runbooks = RUNBOOKS.read_text() if RUNBOOKS.exists() else ""
anchors = {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^##+ (.*)$", runbooks, re.M)}
RULE_VALUES = {"serviceMonitor": {"enabled": True}, "metrics": {"prometheusRule": {"enabled": True}}}
ETCD_RULE_VALUES = {**RULE_VALUES, "replicaCount": 3, "etcd": {"endpoints": ["http://etcd:2379"]}}


def rules_of(values):
    return {r["alert"]: r for g in by_kind(render(values)[0], "PrometheusRule")[0]["spec"]["groups"] for r in g["rules"]}


embedded_rules, etcd_rules = rules_of(RULE_VALUES), rules_of(ETCD_RULE_VALUES)
base = CHART_YAML["sources"][0] + "/blob/main/docs/runbooks.md"
for alert, rule in {**embedded_rules, **etcd_rules}.items():
    url = rule["annotations"].get("runbook_url", "")
    check(f"{alert}: runbook_url is the chart source's docs/runbooks.md#{alert.lower()}", url == f"{base}#{alert.lower()}", url)
    check(f"{alert}: docs/runbooks.md has its section", alert.lower() in anchors, sorted(anchors))
for section_title in ("what it means", "impact", "diagnose", "what to do"):
    sections = [s for s in re.split(r"^## ", runbooks, flags=re.M)[1:] if s.split("\n")[0].strip() in embedded_rules]
    check(f"docs/runbooks.md: every alert's section says {section_title!r}", sections and all(section_title in s.lower() for s in sections), len(sections))
moved = rules_of({**RULE_VALUES, "metrics": {"prometheusRule": {"enabled": True, "runbookBaseUrl": "https://wiki.example.com/room-allocator"}}})
check("metrics.prometheusRule.runbookBaseUrl moves every runbook_url", all(r["annotations"].get("runbook_url") == f"https://wiki.example.com/room-allocator#{a.lower()}" for a, r in moved.items()))
exhausted = [a for a, r in embedded_rules.items() if 'grpc_code="ResourceExhausted"' in r["expr"]]
check("an alert fires on RESOURCE_EXHAUSTED answers", exhausted, sorted(embedded_rules))
filling = embedded_rules.get("RoomAllocatorRoomSpaceFilling", {}).get("annotations", {}).get("description", "")
check("RoomAllocatorRoomSpaceFilling says a full space answers RESOURCE_EXHAUSTED (src/service.rs), not UNAVAILABLE", "RESOURCE_EXHAUSTED" in filling and "UNAVAILABLE" not in filling, filling)
check("a predict_linear alert on the room space's time to full", any("predict_linear(room_allocator_space_used_rooms" in r["expr"] for r in embedded_rules.values()))
floored = rules_of({**RULE_VALUES, "metrics": {"prometheusRule": {"enabled": True, "alerts": {"minRequestsPerSecond": 0.123}}}})
for alert, rule in floored.items():
    if "/" in rule["expr"] or "histogram_quantile" in rule["expr"]:
        if "room_allocator_space_" in rule["expr"] or "room_allocator_workers_" in rule["expr"]:
            continue  # gauges over gauges: no traffic involved
        check(f"{alert}: a ratio alert has the minimum-traffic guard", "> 0.123" in rule["expr"], rule["expr"])
SHARED = ("RoomAllocatorStoreUnreachable", "RoomAllocatorRegistrationsStale", "RoomAllocatorWorkerTableFilling")
for alert in SHARED:
    groupings = lambda rules: re.findall(r"by \(([^)]*)\)", rules.get(alert, {}).get("expr", ""))
    check(f"{alert}: one page per job in etcd mode (no pod in the grouping)", groupings(etcd_rules) and all("pod" not in g for g in groupings(etcd_rules)), groupings(etcd_rules))
    check(f"{alert}: one alert per pod in embedded mode", groupings(embedded_rules) and all("pod" in g for g in groupings(embedded_rules)), groupings(embedded_rules))


# ================================================================ schema == binary

section("schema against the binary's bounds")
config_schema = json.loads(run([BINARY, "config-schema"]).stdout or "{}")
VALUE_OF_FLAG = {
    "--max-workers": ("maxWorkers",),
    "--drain-delay-secs": ("shutdown", "drainDelaySecs"),
    "--drain-timeout-secs": ("shutdown", "drainTimeoutSecs"),
    "--request-timeout-secs": ("requestTimeoutSecs",),
    "--max-concurrent-requests": ("maxConcurrentRequests",),
    "--max-connection-age-secs": ("maxConnectionAgeSecs",),
    "--max-connection-age-grace-secs": ("maxConnectionAgeGraceSecs",),
    "--store-timeout-secs": ("storeTimeoutSecs",),
    "--etcd-staleness-secs": ("etcd", "stalenessSecs"),
    "--worker-threads": ("workerThreads",),
    "--min-room": ("minRoom",),
    "--max-room": ("maxRoom",),
}
ROOM_FLAGS = {"--min-room", "--max-room"}
bounds = config_schema.get("bounds", {})
check("config-schema: every bounded flag has a chart value", set(bounds) == set(VALUE_OF_FLAG), sorted(set(bounds) ^ set(VALUE_OF_FLAG)))


def schema_node(path):
    node = schema
    for key in path:
        node = node["properties"][key]
    return node


def with_value(path, value, base=None):
    values = json.loads(json.dumps(base or {}))
    node = values
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return values


def schema_verdict(values):
    """Helm's verdict; jsonschema must agree (the patterns are RE2 in Helm)."""
    try:
        load().validate_schema(values)
        helm_ok = True
    except helm_python.HelmError:
        helm_ok = False
    merged = load().merge_values(values)
    check(f"Helm and jsonschema agree on {values}", helm_ok == jsonschema.Draft7Validator(schema).is_valid(merged))
    return helm_ok


_base_docs = {}


def binary_verdict(flag, text, base):
    """`serve --check-config` on the default rendered arguments with `flag`
    set to `text`."""
    key = json.dumps(base, sort_keys=True)
    if key not in _base_docs:
        _base_docs[key] = render(base)[0]
    deployment, main = container(_base_docs[key])
    args = [a for a in main["args"] if not a.startswith(f"{flag}=")] + [f"{flag}={text}"]
    with tempfile.TemporaryDirectory() as root:
        mounts, env, _ = materialize(deployment["spec"]["template"]["spec"], main, SECRETS, root)
        result = run([BINARY, *[rewrite(a, mounts) for a in args], "--check-config"], env={**env, **CLEAN_ENV})
    return result.returncode == 0


ETCD_BASE = {"etcd": {"endpoints": ["http://etcd:2379"]}}
for flag, path in VALUE_OF_FLAG.items():
    if flag not in bounds:
        continue
    low, high = bounds[flag]["minimum"], bounds[flag]["maximum"]
    node = schema_node(path)
    if flag in ROOM_FLAGS:
        check(f"schema {'.'.join(path)} is a string with the binary's room_pattern", node.get("type") == "string" and node.get("pattern") == config_schema["room_pattern"], node)
    else:
        check(f"schema {'.'.join(path)} bounds are the binary's {low}..{high}", (node.get("minimum"), node.get("maximum")) == (low, high), node)
    base = ETCD_BASE if flag.startswith("--etcd-") else {}
    for number in (low - 1, low, high, high + 1):
        value = str(number) if flag in ROOM_FLAGS else number
        schema_ok = schema_verdict(with_value(path, value, base))
        binary_ok = binary_verdict(flag, str(number), base)
        check(f"{'.'.join(path)}={value}: schema and `serve --check-config` agree", schema_ok == binary_ok, f"schema {'accepts' if schema_ok else 'rejects'}, binary {'accepts' if binary_ok else 'rejects'}")
        if schema_ok:
            docs, _ = render(with_value(path, value, base))
            _, main = container(docs)
            check(f"{'.'.join(path)}={value} renders as {flag}={number}", f"{flag}={number}" in main["args"], [a for a in main["args"] if a.startswith(flag)])
check("schema retention pattern is the binary's duration_pattern", schema_node(("retention",)).get("pattern") == config_schema.get("duration_pattern"))
for text in ("0", "1s", "999999d", "1000000s", "24h", "01s"):
    schema_ok = schema_verdict({"retention": text})
    binary_ok = binary_verdict("--retention", text, {})
    check(f"retention={text!r}: schema and `serve --check-config` agree", schema_ok == binary_ok, f"schema {schema_ok}, binary {binary_ok}")
check("retention \"0\" is refused", not schema_verdict({"retention": "0"}))
# minRoom <= maxRoom: the chart's verdict (a fail in the template) is the binary's.
for low_room, high_room in (("10", "9"), ("9", "10"), ("5", "5"), ("9223372036854775807", "9223372036854775806")):
    chart_ok = render_error({"minRoom": low_room, "maxRoom": high_room}) is None
    docs, _ = render({})
    deployment, main = container(docs)
    args = [a for a in main["args"] if not a.startswith(("--min-room=", "--max-room="))] + [f"--min-room={low_room}", f"--max-room={high_room}"]
    binary_ok = run([BINARY, *args, "--check-config"], env=CLEAN_ENV).returncode == 0
    check(f"minRoom={low_room} maxRoom={high_room}: the chart and the binary agree", chart_ok == binary_ok, f"chart {chart_ok}, binary {binary_ok}")

# Every serve flag an operator tunes comes from a value.
help_text = run([BINARY, "serve", "--help"]).stdout
serve_flags = set(re.findall(r"^\s+(?:-\w, )?(--[a-z0-9-]+)", help_text, re.M))
NOT_VALUES = {"--help", "--version", "--check-config"}
# The chart passes the etcd password as a file (--etcd-password-file, reread
# at each authentication), never as a value that needs a restart to change.
NOT_FROM_CHART = {"--etcd-password"}
missing = serve_flags - flags_rendered - NOT_VALUES - NOT_FROM_CHART
check("every serve flag is set from a value in some render", bool(serve_flags) and not missing, sorted(missing))


# ================================================================ live: probes, test pod, rotation

def run_test_pod(name, docs, server, root, expected_scheme):
    """Runs the rendered test pod's script with busybox, its env and mounts
    laid out as the kubelet would, the Service address moved to the server's
    loopback gRPC port, and the image's /usr/local/bin/room-allocator being
    the binary under test."""
    tester = test_pod(docs)
    spec = tester["spec"]
    script_container = spec["containers"][0]
    mounts, env, _ = materialize(spec, script_container, SECRETS, root)
    # The init container: `cp /bin/busybox /shell/busybox`, busybox from the host.
    init = spec["initContainers"][0]
    shell = rewrite(init["command"][2], mounts)
    shutil.copy(shutil.which("busybox"), shell)
    image_bin = Path(root) / "usr-local-bin"
    image_bin.mkdir(exist_ok=True)
    if not (image_bin / "room-allocator").exists():
        os.symlink(BINARY, image_bin / "room-allocator")
    mounts.append(("/usr/local/bin", str(image_bin)))
    env = {key: rewrite(value, mounts) for key, value in env.items()}
    scheme, _, hostport = env["ROOM_ALLOCATOR_SERVER"].partition("://")
    service = next(s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") != "None")
    service_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    check(f"{name}: the test pod calls the Service's gRPC port", hostport == f"{service['metadata']['name']}:{service_port}", hostport)
    check(f"{name}: the test pod uses {expected_scheme}", scheme == expected_scheme, scheme)
    _, main = container(docs)
    grpc_port = next(p["containerPort"] for p in main["ports"] if p["name"] == "grpc")
    env["ROOM_ALLOCATOR_SERVER"] = f"{scheme}://{server.at_container_port(grpc_port)}"
    argv = [rewrite(a, mounts) for a in script_container["command"] + script_container.get("args", [])]
    return run(argv, env=env, timeout=60)


def plaintext_refused(name, server):
    grpc = server.addr["--listen"]
    health = client("health", "--server", f"http://{grpc}")
    check(f"{name}: plaintext health on the TLS port is refused", health.returncode != 0, health.stdout)
    register = client("register", "--server", f"http://{grpc}", "--worker", "plain", "--dp-size", "1")
    check(f"{name}: a plaintext call on the TLS port is refused", register.returncode != 0, register.stdout)


def wait_until(condition, seconds=RELOAD_WAIT):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.25)
    return condition()


MODES = [
    ("plaintext", {}),
    ("plaintext, token", {"auth": {"existingSecret": "ra-token"}}),
    ("plaintext, two tokens mid-rotation", {"auth": {"existingSecret": "ra-tokens"}}),
    ("TLS, token for every call", {"tls": {"enabled": True, "existingSecret": "ra-tls"}, "auth": {"existingSecret": "ra-token", "requireForAllocation": True}}),
    ("mutual TLS, router certificate, token", {"tls": {"enabled": True, "existingSecret": "ra-tls", "requireClientCert": True}, "tests": {"clientCertSecret": "router-tls"}, "auth": {"existingSecret": "ra-token"}}),
    ("mutual TLS, server Secret as client", {"tls": {"enabled": True, "existingSecret": "ra-tls-dual", "requireClientCert": True}}),
]

def check_rotation(name, server, root, connect):
    """Renews both Secrets the way the kubelet does (files beside the old
    ones, `..data` swapped in one rename) and checks the server takes them
    without a restart, refuses a broken one, and counts each reload."""
    grpc = server.addr["--listen"]
    tls_dir = server.dirs["tls"]
    old_ca = f"{root}/old-ca.crt"
    shutil.copy(f"{tls_dir}/ca.crt", old_ca)
    # A new token, and a new CA and server certificate as a re-issue brings.
    write_secret_volume(server.dirs["auth"], {"token": b"rotated-token"})
    write_secret_volume(tls_dir, tls_secret("server2", "ca2"))
    rotated = lambda: client("health", "--server", f"https://{grpc}", "--tls-ca", f"{tls_dir}/ca.crt").returncode == 0
    check(f"{name}: new connections get the rotated certificate within {RELOAD_WAIT} s", wait_until(rotated))
    stale = client("health", "--server", f"https://{grpc}", "--tls-ca", old_ca)
    check(f"{name}: the old CA no longer verifies new connections", stale.returncode != 0, stale.stdout)
    connect = [f"{tls_dir}/ca.crt" if arg == f"{root}/server/tls/ca.crt" else arg for arg in connect]
    register = lambda token: client("register", *connect, "--worker", "rotated", "--dp-size", "1", env={"ROOM_ALLOCATOR_TOKEN": token})
    check(f"{name}: a rotated token is in force within {RELOAD_WAIT} s", wait_until(lambda: register("rotated-token").returncode == 0))
    old = register("s3cret-token")
    check(f"{name}: the old token is refused after rotation", old.returncode != 0 and "UNAUTHENTICATED" in old.stderr, old.stderr)

    def reloads():
        _, samples = parse_exposition(scrape(server.addr["--metrics-listen"])[1])
        return {(s[1]["file"], s[1]["result"]): s[2] for s in samples if s[0] == "room_allocator_reloads_total"}

    counted = reloads()
    check(f"{name}: reloads counted as successes", counted.get(("tls", "success"), 0) >= 1 and counted.get(("token", "success"), 0) >= 1, counted)
    check(f"{name}: no reload failed (the swap is atomic)", counted.get(("tls", "failure")) == 0 and counted.get(("token", "failure")) == 0, counted)
    # A broken renewal (the key of another certificate) is refused and counted.
    broken = tls_secret("server2", "ca2")
    broken["tls.key"] = pki["dual.key"]
    write_secret_volume(tls_dir, broken)
    check(f"{name}: a mismatched key is refused and counted", wait_until(lambda: reloads().get(("tls", "failure"), 0) >= 1), reloads())
    check(f"{name}: the previous certificate stays in use", rotated())


def check_mode(name, values, docs, server, root):
    """Probes, the test pod and refusals against one running server."""
    _, main = container(docs)
    health_port = next(p["containerPort"] for p in main["ports"] if p["name"] == "health")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc = main[probe]["grpc"]
        addr = server.at_container_port(grpc["port"])
        check(f"{name}: {probe} port is the health listener", grpc["port"] == health_port and addr is not None, grpc)
        # What the kubelet does: a plaintext grpc.health.v1 Check.
        answer = client("health", "--server", addr or "127.0.0.1:1", "--service", grpc.get("service", ""))
        check(f"{name}: {probe} ({grpc.get('service', '')!r}) is SERVING", answer.returncode == 0 and '"SERVING"' in answer.stdout, answer.stderr)
    # The health listener serves grpc.health.v1 only: no allocator calls.
    side_door = client("register", "--server", server.at_container_port(health_port) or "127.0.0.1:1", "--worker", "w", "--dp-size", "1")
    check(f"{name}: the health port refuses allocator calls", side_door.returncode != 0 and "UNIMPLEMENTED" in side_door.stderr, side_door.stderr)

    tls = values.get("tls", {})
    for attempt in (1, 2):  # again: `helm test` may run many times
        result = run_test_pod(name, docs, server, f"{root}/test-pod-{attempt}", "https" if tls.get("enabled") else "http")
        check(f"{name}: the helm test pod passes (run {attempt})", result.returncode == 0 and "passed" in result.stdout, (result.stdout + result.stderr)[-800:])

    grpc = server.addr["--listen"]
    ca = f"{root}/server/tls/ca.crt"
    if tls.get("enabled"):
        plaintext_refused(name, server)
    if tls.get("requireClientCert"):
        anonymous = client("health", "--server", f"https://{grpc}", "--tls-ca", ca)
        check(f"{name}: TLS without a client certificate is refused", anonymous.returncode != 0, anonymous.stdout)
        if tls["existingSecret"] == "ra-tls":
            # This server certificate lacks the client-auth usage: as
            # README.md says, it cannot double as a client certificate.
            server_as_client = client("health", "--server", f"https://{grpc}", "--tls-ca", ca,
                                      "--tls-cert", f"{root}/server/tls/tls.crt", "--tls-key", f"{root}/server/tls/tls.key")
            check(f"{name}: a certificate without client auth is refused as a client", server_as_client.returncode != 0, server_as_client.stdout)
    auth = values.get("auth", {})
    if auth.get("existingSecret"):
        connect = ["--server", f"https://{grpc}" if tls.get("enabled") else grpc]
        if tls.get("enabled"):
            connect += ["--tls-ca", ca]
        if tls.get("requireClientCert"):
            connect += ["--tls-cert", f"{root}/test-pod-1/client-tls/tls.crt", "--tls-key", f"{root}/test-pod-1/client-tls/tls.key"]
        anonymous = client("register", *connect, "--worker", "no-token", "--dp-size", "1")
        check(f"{name}: RegisterWorker without the token is refused", anonymous.returncode != 0 and "UNAUTHENTICATED" in anonymous.stderr, anonymous.stderr)
        if not auth.get("allowUnauthenticatedAllocation"):
            anonymous = client("resolve", *connect, "1")
            check(f"{name}: ResolveRank without the token is refused", anonymous.returncode != 0 and "UNAUTHENTICATED" in anonymous.stderr, anonymous.stderr)
        if tls.get("enabled") and not tls.get("requireClientCert"):
            section("live: rotation through the kubelet's atomic Secret swap")
            check_rotation(name, server, root, connect)


if have["openssl"] and have["busybox"] and pki:
    section("live: probes and the helm test pod in every TLS mode")
    for name, values in MODES:
        docs, _ = render(values)
        with tempfile.TemporaryDirectory(prefix="chart-test-") as root:
            try:
                server = Server(docs, SECRETS, root)
            except RuntimeError as error:
                check(f"{name}: the server starts with the rendered arguments", False, str(error))
                continue
            try:
                check_mode(name, values, docs, server, root)
            except Exception as error:  # noqa: BLE001 - one mode's crash must not hide the others
                check(f"{name}: the live checks ran", False, repr(error))
            finally:
                code = server.stop()
                check(f"{name}: SIGTERM stops the server with exit 0", code == 0, f"exit {code}: {server.log_path.read_text()[-500:]}")


# ================================================================ live: metrics

section("live: metrics the alerts and the dashboard use")
docs, _ = render({"serviceMonitor": {"enabled": True}, "metrics": {"prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}}})
rule_doc = by_kind(docs, "PrometheusRule")[0]
rule_exprs = [r["expr"] for g in rule_doc["spec"]["groups"] for r in g["rules"]]
# The etcd-mode rules differ (shared state paged once per job); their
# metrics must exist too (an embedded server exports the same families).
etcd_rule_doc = by_kind(render(ETCD_RULE_VALUES)[0], "PrometheusRule")[0]
rule_exprs += [r["expr"] for g in etcd_rule_doc["spec"]["groups"] for r in g["rules"]]
dashboard = json.load(open(f"{CHART}/dashboards/room-allocator.json"))
dashboard_exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
dashboard_exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
titles = " | ".join(p["title"] for p in dashboard["panels"]).lower()
for words in ("rooms", "code", "p50", "p99", "ready", "store reachable", "confirmed age", "space used", "limit", "memory", "cpu"):
    check(f"dashboard has a panel for {words}", words in titles, titles)
check("dashboard panels use the datasource variable", all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"]))
check("dashboard panels do not overlap", len({(p["gridPos"]["x"], p["gridPos"]["y"]) for p in dashboard["panels"]}) == len(dashboard["panels"]))

with tempfile.TemporaryDirectory(prefix="chart-test-metrics-") as root:
    server = None
    try:
        server = Server(docs, SECRETS, root)
        metrics = server.addr["--metrics-listen"]
        content_type, text = scrape(metrics)
        types, samples = parse_exposition(text)
        check_uses("alerts at start", rule_exprs, types, samples)
        grpc = server.addr["--listen"]
        def call(args, status=None):
            result = client(*args, "--server", grpc)
            ok = result.returncode == 0 if status is None else (result.returncode != 0 and status in result.stderr)
            check(f"metrics: `{' '.join(args)}` gives {status or 'OK'}", ok, result.stderr)
            return result.stdout

        call(("register", "--worker", "w1", "--dp-size", "4"))
        allocated = call(("allocate", "--worker", "w1", "--rank", "3"))
        room = json.loads(allocated or "{}").get("room", 0)
        check("metrics: the room is aligned to the rank", room % 4 == 3, allocated)
        call(("lease", "--worker", "w1", "--count", "8"))
        resolved = call(("resolve", str(room)))
        check("metrics: the room resolves to its worker and rank", '"prefill_worker":"w1"' in resolved and '"dp_rank":3' in resolved, resolved)
        call(("workers",))
        call(("allocate", "--worker", "w1", "--rank", "1", "--dp-size", "8"), "FAILED_PRECONDITION")
        call(("allocate", "--worker", "nobody", "--rank", "0"), "NOT_FOUND")
        call(("resolve", "999999999999"), "NOT_FOUND")
        call(("deregister", "--worker", "w1"))
        call(("allocate", "--worker", "w1", "--rank", "3"), "FAILED_PRECONDITION")
        content_type, text = scrape(metrics)
        types, samples = parse_exposition(text)
        check("metrics: Prometheus text format 0.0.4 by default", content_type.startswith("text/plain") and "version=0.0.4" in content_type, content_type)
        check_uses("alerts after calls", rule_exprs, types, samples)
        check_uses("dashboard", dashboard_exprs, types, samples)
        value = lambda name, **labels: sum(s[2] for s in samples if s[0] == name and all(s[1].get(k) == v for k, v in labels.items()))
        for method in ("RegisterWorker", "AllocateRoom", "LeaseRooms", "ResolveRank", "ListWorkers", "DeregisterWorker"):
            check(f"metrics: {method} OK counted", value("room_allocator_requests_total", method=method, code="OK") >= 1 and value("grpc_server_handled_total", grpc_method=method, grpc_code="OK") >= 1)
        for code, grpc_code in (("NOT_FOUND", "NotFound"), ("FAILED_PRECONDITION", "FailedPrecondition")):
            check(f"metrics: {code} counted in both families", value("room_allocator_requests_total", code=code) >= 1 and value("grpc_server_handled_total", grpc_service=ALLOCATOR, grpc_code=grpc_code) >= 1)
        check("metrics: rooms issued counted by method", value("room_allocator_rooms_issued_total", method="AllocateRoom") >= 1 and value("room_allocator_rooms_issued_total", method="LeaseRooms") >= 8)
        if have["promtool"]:
            lint = run(["promtool", "check", "metrics"], input=text)
            check("metrics: `promtool check metrics` accepts the text format", lint.returncode == 0, lint.stdout + lint.stderr)
        content_type, open_text = scrape(metrics, accept="application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5")
        check("metrics: Accept: application/openmetrics-text gives OpenMetrics", content_type.startswith("application/openmetrics-text"), content_type)
        check("metrics: OpenMetrics ends in # EOF", open_text.endswith("# EOF\n"), open_text[-40:])
        check("metrics: OpenMetrics names counter families without _total", "# TYPE room_allocator_requests counter" in open_text)
    except Exception as error:  # noqa: BLE001 - report, then the closing line
        check("metrics: the server started and the checks ran", False, repr(error))
    finally:
        if server is not None:
            code = server.stop()
            check("metrics: SIGTERM stops the server with exit 0", code == 0, f"exit {code}")


# ================================================================ promtool

section("promtool: check and unit-test the alerts")


def promtool_rules(mode, groups, test_file, required):
    """`promtool check rules` and `promtool test rules` on one mode's rendered
    groups; every alert in `required` needs a firing and a quiet case."""
    with tempfile.TemporaryDirectory(prefix="chart-test-rules-") as directory:
        Path(f"{directory}/rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
        shutil.copy(f"{CHART}/promtool/{test_file}", directory)
        checked = run(["promtool", "check", "rules", f"{directory}/rules.yaml"], timeout=60)
        check(f"{mode}: promtool check rules", checked.returncode == 0, checked.stdout + checked.stderr)
        tested = run(["promtool", "test", "rules", f"{directory}/{test_file}"], timeout=60)
        check(f"{mode}: promtool test rules {test_file} (each alert firing and not firing)", tested.returncode == 0, (tested.stdout + tested.stderr)[-3000:])
    tests = yaml.safe_load(open(f"{CHART}/promtool/{test_file}"))["tests"]
    firing = {t["alertname"] for test in tests for t in test["alert_rule_test"] if t["exp_alerts"]}
    quiet = {t["alertname"] for test in tests for t in test["alert_rule_test"] if not t["exp_alerts"]}
    check(f"{mode}: every alert has a firing unit test", required <= firing, sorted(required - firing))
    check(f"{mode}: every alert has a not-firing unit test", required <= quiet, sorted(required - quiet))


if have["promtool"]:
    embedded_groups, etcd_groups = rule_doc["spec"]["groups"], etcd_rule_doc["spec"]["groups"]
    embedded_alerts = {r["alert"]: r["expr"] for g in embedded_groups for r in g["rules"]}
    etcd_alerts = {r["alert"]: r["expr"] for g in etcd_groups for r in g["rules"]}
    promtool_rules("embedded", embedded_groups, "alerts_test.yaml", set(embedded_alerts))
    # etcd mode: its own cases for every alert whose rule differs.
    differing = {a for a in etcd_alerts if etcd_alerts[a] != embedded_alerts.get(a)}
    check("etcd mode pages shared state once per job (its rules differ)", set(SHARED) <= differing, sorted(differing))
    promtool_rules("etcd", etcd_groups, "alerts_test_etcd.yaml", differing)
    # Alerts rendered only where the pods mount certificates.
    tls_groups = by_kind(render({**RULE_VALUES, "tls": {"enabled": True, "existingSecret": "ra-tls"}})[0], "PrometheusRule")[0]["spec"]["groups"]
    tls_alerts = {r["alert"] for g in tls_groups for r in g["rules"]} - set(embedded_alerts)
    check("tls: the certificate expiry alert renders with tls.enabled", "RoomAllocatorCertificateExpiringSoon" in tls_alerts, sorted(tls_alerts))
    promtool_rules("tls", tls_groups, "alerts_test_tls.yaml", tls_alerts)

report_and_exit()
