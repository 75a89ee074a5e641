"""docker-compose.yml stays wired to the code: real commands, real settings fields, one bucket, one broker; and it
is a valid Compose file.

Pure: reads the YAML and the Dockerfile, asks the typer app and the settings classes; needs no Docker. The Compose
file is validated against the Compose specification's JSON schema, vendored as tests/data/compose-spec.json
(origin and licence in tests/data/README.md): nothing is downloaded at test time.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import typer.main
import yaml
from jsonschema.validators import validator_for
from pydantic import BaseModel, ValidationError
from pydantic_settings import BaseSettings

import producer.cli
from producer.core import constants
from producer.core.settings import DEV_WEBHOOK_SECRET, WebhookSettings
from producer.errors import ConfigurationError
from producer.settings import ClientSettings
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"

WORKERS = ("worker", "worker-cpu")
MINIO_DEFAULT_API_PORT = 9000

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}; "$$" is a literal "$".
_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Substitute compose variables in ``value`` as ``docker compose`` would with environment ``env``.

    Raises:
        KeyError: a required variable (``${NAME:?message}``) is unset or empty.
    """

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name", "op", "arg")
        current = env.get(name)
        if op in (":-", ":?") and not current:
            current = None
        if current is not None:
            return current
        if op is not None and op.endswith("?"):
            raise KeyError(f"{name} is required: {arg}")
        return arg if op is not None else ""

    return _VARIABLE.sub(substitute, value)


def settings_path(env_name: str, settings_cls: type[BaseSettings]) -> tuple[str, ...] | None:
    """The field path that environment variable ``env_name`` sets on ``settings_cls``.

    Follows the class's own ``env_prefix`` and ``env_nested_delimiter``:
    ``GENQ_S3__BUCKET`` -> ``("s3", "bucket")``.

    Returns:
        The path of field names, or None where no field reads the variable (pydantic-settings ignores it
        silently, which is why a misspelt name in a deployment file is worth a test).
    """
    config = settings_cls.model_config
    prefix = config.get("env_prefix") or ""
    delimiter = config.get("env_nested_delimiter") or ""
    case_sensitive = bool(config.get("case_sensitive"))
    name = env_name if case_sensitive else env_name.lower()
    prefix = prefix if case_sensitive else prefix.lower()
    if not name.startswith(prefix):
        return None
    parts = name[len(prefix) :].split(delimiter) if delimiter else [name[len(prefix) :]]
    model: type[BaseModel] | None = settings_cls
    path: list[str] = []
    for part in parts:
        if model is None:  # the previous part is a plain value: nothing below it
            return None
        fields = {(key if case_sensitive else key.lower()): key for key in model.model_fields}
        if part not in fields:
            return None
        field = model.model_fields[fields[part]]
        path.append(fields[part])
        model = _model_of(field.annotation)
    return tuple(path)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``annotation`` (``M``, ``M | None``), or None for plain values."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [m for m in map(_model_of, typing.get_args(annotation)) if m is not None]
        return models[0] if len(models) == 1 else None
    return None


# --- the files under test -----------------------------------------------------------------------------------


def _load_compose() -> dict[str, Any]:
    with COMPOSE_FILE.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "docker-compose.yml has no services"
    return data


COMPOSE = _load_compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
# Services built from this repository's Dockerfile: their entrypoint is `genq` unless they override it.
PROJECT_SERVICES = sorted(name for name, svc in SERVICES.items() if "build" in svc)


def environment(service: str) -> dict[str, str]:
    """A service's environment as a dict, whether the file writes it as a mapping or as KEY=VALUE items."""
    env = SERVICES[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def argv(value: str | list[str] | None) -> list[str]:
    """A compose command or entrypoint as a list of arguments (a string is split as a shell would)."""
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(arg) for arg in value]


def genq_commands() -> dict[str, Any]:
    """The `genq` sub-commands by name, as click sees them (typer vendors its own click: duck-typed)."""
    group = typer.main.get_command(producer.cli.app)
    commands = getattr(group, "commands", None)
    assert isinstance(commands, dict), "producer.cli.app should be a group of sub-commands"
    return dict(commands)


def interpolate_all(value: Any, env: Mapping[str, str]) -> Any:
    """``value`` (a loaded Compose document or part of one) with every string interpolated as by :func:`interpolate`
    (``docker compose`` validates the file after interpolation)."""
    if isinstance(value, str):
        return interpolate(value, env)
    if isinstance(value, dict):
        return {key: interpolate_all(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate_all(item, env) for item in value]
    return value


def schema_errors(document: Any) -> list[str]:
    """Where and why ``document`` breaks the Compose specification's JSON schema (empty: a valid Compose file)."""
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    validator_cls = validator_for(schema)
    validator = validator_cls(schema, format_checker=validator_cls.FORMAT_CHECKER)
    return [f"{error.json_path}: {error.message}" for error in validator.iter_errors(document)]


def started_by(*profiles: str) -> set[str]:
    """The services ``docker compose [--profile P ...] up`` starts when it names no service: those with no
    ``profiles`` and those in one of ``profiles``."""
    return {name for name, svc in SERVICES.items() if not svc.get("profiles") or set(svc["profiles"]) & set(profiles)}


def reserves_gpu(service: str) -> bool:
    devices = SERVICES[service].get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return any("gpu" in device.get("capabilities", []) for device in devices)


def published(service: str, env: Mapping[str, str]) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each of a service's ``ports`` (short syntax
    ``ADDRESS:HOST:CONTAINER``), as ``docker compose`` would publish them with environment ``env``."""
    ports = []
    for entry in SERVICES[service].get("ports", []):
        address, host, container = interpolate(str(entry), env).rsplit(":", 2)
        ports.append((address, int(host), int(container)))
    return ports


def minio_ports() -> tuple[int, int | None]:
    """(API port, console port) the minio service listens on, from its `server` arguments."""
    args = argv(SERVICES["minio"].get("command"))

    def port_of(flag: str) -> int | None:
        if flag not in args:
            return None
        return int(args[args.index(flag) + 1].rsplit(":", 1)[1])

    return port_of("--address") or MINIO_DEFAULT_API_PORT, port_of("--console-address")


# --- the helpers themselves: they must be able to fail ------------------------------------------------------


@pytest.mark.parametrize(
    ("env_name", "settings_cls", "expected"),
    [
        ("GENQ_REDIS__URL", ClientSettings, ("redis", "url")),
        ("GENQ_S3__BUCKET", WorkerSettings, ("s3", "bucket")),
        ("GENQ_CELERY__VISIBILITY_TIMEOUT_S", WorkerSettings, ("celery", "visibility_timeout_s")),
        ("GENQ_DEVICE", WorkerSettings, ("device",)),
        ("genq_storage", WorkerSettings, ("storage",)),  # pydantic-settings matches names case-insensitively
    ],
)
def test_settings_path_follows_prefix_and_nested_delimiter(
    env_name: str, settings_cls: type[BaseSettings], expected: tuple[str, ...]
) -> None:
    assert settings_path(env_name, settings_cls) == expected


@pytest.mark.parametrize(
    ("env_name", "settings_cls"),
    [
        ("GENQ_S3__BUCKETS", WorkerSettings),  # misspelt sub-field
        ("GENQ_REDIS_URL", WorkerSettings),  # single underscore: no field "redis_url"
        ("GENQ_WEBHOOK__SECRET__VALUE", WorkerSettings),  # below a plain value
        ("GENQ_CELERY__VISIBILITY_TIMEOUT_S", ClientSettings),  # a worker-only group
        ("REDIS__URL", WorkerSettings),  # no prefix
        ("GENQ_", WorkerSettings),
    ],
)
def test_settings_path_rejects_names_no_field_reads(env_name: str, settings_cls: type[BaseSettings]) -> None:
    assert settings_path(env_name, settings_cls) is None


def test_settings_path_agrees_with_what_pydantic_settings_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENQ_CELERY__VISIBILITY_TIMEOUT_S", "42")
    monkeypatch.setenv("GENQ_S3__BUCKETS", "ignored")
    settings = WorkerSettings()
    assert settings.celery.visibility_timeout_s == 42
    assert settings.s3.bucket != "ignored"


def test_interpolate_takes_defaults_values_and_literal_dollars() -> None:
    assert interpolate("${A:-x}/${B-y}/${C}", {}) == "x/y/"
    assert interpolate("${A:-x}/${B-y}", {"A": "", "B": ""}) == "x/"
    assert interpolate("${A:?set A}", {"A": "v"}) == "v"
    assert interpolate("$$HOME", {}) == "$HOME"
    with pytest.raises(KeyError, match="set A"):
        interpolate("${A:?set A}", {})


def test_schema_errors_name_what_breaks_the_compose_specification() -> None:
    broken = interpolate_all(COMPOSE, {})
    broken["services"]["worker-cpu"]["profile"] = ["cpu"]  # misspelt: compose would refuse the file
    broken["services"]["redis"]["healthcheck"]["interval"] = 5  # a duration is a string ("5s")
    broken["services"]["minio-init"]["depends_on"]["minio"]["condition"] = "service_ready"  # no such condition
    errors = "\n".join(schema_errors(broken))
    assert "$.services['worker-cpu']: 'profile' does not match" in errors
    assert "$.services.redis.healthcheck.interval: 5 is not of type 'string'" in errors
    assert "$.services['minio-init'].depends_on" in errors


def test_started_by_follows_compose_profiles() -> None:
    assert started_by() == {name for name, svc in SERVICES.items() if "profiles" not in svc}
    assert started_by("cpu") == started_by() | {"worker-cpu"}
    assert started_by("cpu", "monitoring") == started_by("cpu") | {"flower"}


# --- the file itself ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [
        {},  # every default
        {"REDIS_HOST_PORT": "16379", "GENQ_WEBHOOK__ALLOW_HOSTS": '["hooks.internal"]', "GENQ_ENV": "prod"},
    ],
    ids=["defaults", "overridden"],
)
def test_compose_file_is_valid_against_the_compose_specification(env: dict[str, str]) -> None:
    assert schema_errors(COMPOSE) == []  # as written: `${...}` strings where the schema allows strings
    assert schema_errors(interpolate_all(COMPOSE, env)) == []  # as `docker compose` validates it


# --- commands -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("service", PROJECT_SERVICES)
def test_project_image_services_run_a_real_command(service: str) -> None:
    svc = SERVICES[service]
    command = argv(svc.get("command"))
    entrypoint = argv(svc.get("entrypoint"))
    if entrypoint:
        # Only Flower overrides the genq entrypoint; it loads the Celery app by import path.
        assert entrypoint == ["celery"], f"{service}: unexpected entrypoint {entrypoint}"
        assert "-A" in command, f"{service}: celery needs -A <module>:<app>"
        module = command[command.index("-A") + 1].split(":", 1)[0]
        module_file = ROOT.joinpath(*module.split(".")).with_suffix(".py")
        missing = module_file.relative_to(ROOT)
        assert module_file.is_file(), f"{service}: celery -A {module}, but {missing} is missing"
        assert "flower" in command, f"{service}: expected `celery ... flower`"
        extra = str(svc["build"].get("args", {}).get("EXTRA_PACKAGES", ""))
        assert "flower" in extra, f"{service}: the image must install flower (build arg EXTRA_PACKAGES)"
        return
    assert command, f"{service}: no command; the image would only print `genq --help`"
    commands = genq_commands()
    sub = command[0]
    assert sub in commands, (
        f"{service} runs `genq {' '.join(command)}`, but genq has no {sub!r} sub-command "
        f"(known: {', '.join(sorted(commands))}); add it to producer/cli/main.py"
    )
    known_options = {opt for param in commands[sub].params for opt in (*param.opts, *param.secondary_opts)}
    for arg in command[1:]:
        if arg.startswith("-"):
            assert arg.split("=", 1)[0] in known_options, f"{service}: `genq {sub}` has no option {arg}"


@pytest.mark.parametrize("service", WORKERS)
def test_workers_consume_every_queue_in_the_order_genq_worker_does(service: str) -> None:
    command = argv(SERVICES[service].get("command"))
    assert "-Q" in command, f"{service}: name the queues with -Q"
    queues = command[command.index("-Q") + 1].split(",")
    # Served strictly in this order: callbacks, then generate.high, generate, generate.low.
    assert queues == list(constants.WORKER_QUEUES)
    default = next(p.default for p in genq_commands()["worker"].params if p.name == "queues")
    assert default.split(",") == queues, "the compose workers and `genq worker` should consume alike"


@pytest.mark.parametrize("service", WORKERS)
def test_workers_deliver_callbacks_beside_generation_and_give_deliveries_time_to_end(service: str) -> None:
    command = argv(SERVICES[service].get("command"))
    # `genq worker` hands the callbacks queue to a callbacks worker of its own unless told to serve it inline.
    assert "--inline-callbacks" not in command, f"{service}: a slow receiver would hold generation threads"
    grace = str(SERVICES[service].get("stop_grace_period", "10s"))
    assert grace.endswith("s") and grace[:-1].isdigit(), f"{service}: stop_grace_period in seconds, e.g. 60s"
    # genq worker gives the callbacks worker the attempt deadline and 15 s before it kills it.
    assert int(grace[:-1]) >= WebhookSettings().attempt_deadline_s + 15


def test_compose_build_args_are_declared_in_the_dockerfile() -> None:
    declared = set(re.findall(r"^ARG\s+(\w+)", DOCKERFILE.read_text(encoding="utf-8"), flags=re.MULTILINE))
    for service in PROJECT_SERVICES:
        build = SERVICES[service]["build"]
        args = set(build.get("args", {})) if isinstance(build, dict) else set()
        assert args <= declared, f"{service}: build args {sorted(args - declared)} are not Dockerfile ARGs"


def test_dockerfile_runs_genq_as_a_non_root_user() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r'^ENTRYPOINT \["genq"\]$', text, flags=re.MULTILINE)
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), "the image must end on a non-root USER"


# --- settings -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_genq_variable_sets_a_settings_field(service: str) -> None:
    unknown = [
        name
        for name in environment(service)
        if name.upper().startswith("GENQ_")
        and settings_path(name, WorkerSettings) is None
        and settings_path(name, ClientSettings) is None
    ]
    assert not unknown, f"{service}: {unknown} set no field of WorkerSettings or ClientSettings"


@pytest.mark.parametrize("service", WORKERS)
def test_worker_environment_builds_the_settings_it_names(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("GENQ_"):
            monkeypatch.delenv(name)
    env = environment(service)
    genq_env = {name: interpolate(value, {}) for name, value in env.items() if name.upper().startswith("GENQ_")}
    for name, value in genq_env.items():
        monkeypatch.setenv(name, value)
    settings = WorkerSettings()
    for name, value in genq_env.items():
        field: Any = settings
        for part in settings_path(name, WorkerSettings) or ():
            field = getattr(field, part)
        assert str(field) == value, f"{service}: {name}={value!r} but the worker would see {field!r}"
    assert settings.storage == "s3"
    assert settings.device == ("cuda" if service == "worker" else "cpu")


def test_webhook_secret_default_is_the_placeholder_prod_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    # Unset, the compose default must be the known placeholder, so that GENQ_ENV=prod refuses to start
    # (an empty or made-up default would pass the check and sign webhooks with a guessable key).
    for service in WORKERS:
        assert interpolate(environment(service)["GENQ_WEBHOOK__SECRET"], {}) == DEV_WEBHOOK_SECRET
    monkeypatch.setenv("GENQ_ENV", "prod")
    monkeypatch.setenv("GENQ_WEBHOOK__SECRET", DEV_WEBHOOK_SECRET)
    with pytest.raises((ConfigurationError, ValidationError)):
        WorkerSettings()


# --- wiring between services --------------------------------------------------------------------------------


@pytest.mark.parametrize("service", WORKERS)
def test_s3_endpoint_is_the_minio_api_port(service: str) -> None:
    env = environment(service)
    url = urlparse(interpolate(env["AWS_ENDPOINT_URL"], {}))
    api_port, console_port = minio_ports()
    assert url.hostname == "minio", f"{service}: AWS_ENDPOINT_URL reaches {url.hostname}, not minio"
    assert url.port == api_port != console_port, f"{service}: {url.port} is not MinIO's S3 API port {api_port}"
    minio_env = environment("minio")
    assert env["AWS_ACCESS_KEY_ID"] == minio_env["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == minio_env["MINIO_ROOT_PASSWORD"]
    assert interpolate(env["AWS_DEFAULT_REGION"], {})


def test_minio_init_creates_the_workers_bucket() -> None:
    script = " ".join(argv(SERVICES["minio-init"].get("command")))
    alias = re.search(r"mc alias set (\S+) (\S+)", script)
    assert alias, "minio-init must set an mc alias for the minio service"
    assert urlparse(alias.group(2)).hostname == "minio" and urlparse(alias.group(2)).port == minio_ports()[0]
    made = re.findall(r"mc mb --ignore-existing (\S+)/(\S+)", script)
    assert made and all(a == alias.group(1) for a, _ in made), "minio-init: `mc mb --ignore-existing` via the alias"
    buckets = {bucket for _, bucket in made}
    for service in WORKERS:
        assert interpolate(environment(service)["GENQ_S3__BUCKET"], {}) in buckets
    assert SERVICES["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert SERVICES["minio"].get("healthcheck"), "minio needs a healthcheck for minio-init to wait on"


def test_redis_persists_jobs_with_appendonly() -> None:
    redis = SERVICES["redis"]
    command = argv(redis.get("command"))
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "yes"
    assert any(str(v).endswith(":/data") for v in redis.get("volumes", [])), "appendonly needs a volume"
    assert "redis-cli" in argv(redis.get("healthcheck", {}).get("test")), "workers wait on this healthcheck"


@pytest.mark.parametrize("service", WORKERS)
def test_workers_start_after_redis_is_healthy_and_the_bucket_exists(service: str) -> None:
    depends_on = SERVICES[service].get("depends_on")
    assert isinstance(depends_on, dict), f"{service}: depends_on needs conditions, not a bare list"
    assert depends_on["redis"]["condition"] == "service_healthy"
    assert depends_on["minio-init"]["condition"] == "service_completed_successfully"
    assert interpolate(environment(service)["GENQ_REDIS__URL"], {}).startswith("redis://redis:")


def test_gpu_is_reserved_for_worker_and_not_for_worker_cpu() -> None:
    devices = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]} in devices
    assert "deploy" not in SERVICES["worker-cpu"], "worker-cpu must run without a GPU"
    assert SERVICES["worker-cpu"].get("profiles") == ["cpu"]
    assert SERVICES["worker"].get("profiles") == ["gpu"]


@pytest.mark.parametrize(
    ("profiles", "workers"),
    [
        ((), set()),  # Redis and MinIO alone
        (("cpu",), {"worker-cpu"}),
        (("gpu",), {"worker"}),
        (("train",), {"worker-train"}),
        (("monitoring",), set()),
    ],
)
def test_each_profile_starts_only_the_worker_it_names(profiles: tuple[str, ...], workers: set[str]) -> None:
    # `docker compose --profile cpu up` with no service name used to start the GPU worker too (it had no profile).
    started = started_by(*profiles)
    assert {name for name in started if argv(SERVICES[name].get("command"))[:1] == ["worker"]} == workers
    if "gpu" not in profiles and "train" not in profiles:
        assert not [name for name in started if reserves_gpu(name)], "a machine without a GPU must start it"
    for name in started:  # every dependency starts with it (compose refuses one in a profile not enabled)
        assert set(SERVICES[name].get("depends_on") or {}) <= started, f"{name} depends on a service not started"


def test_published_ports_stay_on_loopback_and_clear_of_a_local_redis() -> None:
    ports = [port for name in sorted(SERVICES) for port in published(name, {})]
    assert ports and all(address == "127.0.0.1" for address, _, _ in ports), "publish on loopback only"
    host_ports = [host for _, host, _ in ports]
    assert len(host_ports) == len(set(host_ports)), f"two services publish one host port: {host_ports}"
    # A Redis already on 6379 (the tests', .ci/run's, a developer's) would make `up` fail to bind.
    assert published("redis", {}) == [("127.0.0.1", 6380, 6379)]
    assert published("redis", {"REDIS_HOST_PORT": "16379"}) == [("127.0.0.1", 16379, 6379)]


@pytest.mark.parametrize("service", [*WORKERS, "worker-train"])
def test_workers_take_the_callback_allow_list_from_the_host(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    value = environment(service).get("GENQ_WEBHOOK__ALLOW_HOSTS")
    assert value is not None, f"{service}: GENQ_WEBHOOK__ALLOW_HOSTS is not passed through"
    for host_env, expected in [
        ({}, []),
        ({"GENQ_WEBHOOK__ALLOW_HOSTS": '["hooks.internal"]'}, ["hooks.internal"]),
    ]:
        monkeypatch.setenv("GENQ_WEBHOOK__ALLOW_HOSTS", interpolate(value, host_env))
        assert WorkerSettings().webhook.allow_hosts == expected


def test_training_worker_takes_only_the_train_queue_one_job_at_a_time_on_a_gpu() -> None:
    svc = SERVICES["worker-train"]
    command = argv(svc.get("command"))
    assert command[command.index("-Q") + 1] == constants.TRAIN_QUEUE
    assert command[command.index("-c") + 1] == "1"
    assert environment("worker-train")["GENQ_REDIS__URL"] == environment("worker")["GENQ_REDIS__URL"]
    assert environment("worker-train")["GENQ_S3__BUCKET"] == environment("worker")["GENQ_S3__BUCKET"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]} in devices


def test_flower_watches_the_workers_broker() -> None:
    flower = SERVICES["flower"]
    assert flower.get("profiles") == ["monitoring"]
    broker = environment("flower").get("CELERY_BROKER_URL") or environment("flower").get("GENQ_REDIS__URL")
    assert broker == environment("worker")["GENQ_REDIS__URL"]
    assert "--port=5555" in argv(flower.get("command"))
