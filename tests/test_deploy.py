"""The files in deploy/ parse, and name the image, commands, probes, paths and settings postcall really has.

Linters run when they are installed: hadolint (a dev dependency), shellcheck (installed by .ci/run from Debian),
kubectl's built-in kustomize, and systemd-analyze. A missing one skips only its own test, saying which.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import pytest
import typer.main
import yaml

from service.cli import app
from service.config import Settings, env_name
from service.storage.s3_location import S3Location

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DATA_DIR = "/var/lib/postcall/data"
ALL_INTERFACES = "0.0.0.0"  # noqa: S104  (what a container must listen on)
POSTCALL = typer.main.get_command(app)
SETTINGS_VARIABLES = {env_name(field) for field in Settings.model_fields}

# Every file in deploy/, so a new one cannot slip in untested.
CHECKED_FILES = {
    "Dockerfile",
    "Dockerfile.dockerignore",
    "compose.yaml",
    ".env.example",
    "systemd/postcall.service",
    "systemd/postcall-reconcile.service",
    "systemd/postcall-reconcile.timer",
    "k8s/kustomization.yaml",
    "k8s/deployment.yaml",
    "k8s/service.yaml",
    "k8s/cronjob.yaml",
    "k8s/pvc.yaml",
    "k8s/secret.template.yaml",
    "k8s-bucket/kustomization.yaml",
    "k8s-bucket/no-shared-claim.yaml",
    "k8s-bucket/deployment.yaml",
    "k8s-bucket/cronjob.yaml",
    "k8s-bucket/s3-secret.template.yaml",
    "nginx/postcall.conf",  # checked in tests/test_deploy_nginx.py
}


def tool(name: str) -> str:
    """The path of a command-line tool (the virtualenv's bin first), or skip the calling test saying what is missing."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed here, so this check cannot run")
    return found


def assert_real_command(argv: list[str]) -> None:
    """`argv` (after `postcall`) parses as a postcall command with valid options; nothing runs."""
    name, *args = argv
    command = POSTCALL.commands.get(name)  # type: ignore[attr-defined]
    assert command is not None, f"postcall has no command {name!r}"
    try:
        command.make_context(name, list(args))
    except click.ClickException as exc:
        raise AssertionError(f"postcall {shlex.join(argv)}: {exc.format_message()}") from exc


def load_yaml(relpath: str) -> Any:
    return yaml.safe_load((DEPLOY / relpath).read_text())


def test_every_file_in_deploy_is_checked() -> None:
    present = {str(path.relative_to(DEPLOY)) for path in DEPLOY.rglob("*") if path.is_file()}
    assert present == CHECKED_FILES


def test_every_yaml_file_loads() -> None:
    for path in DEPLOY.rglob("*.yaml"):
        documents = list(yaml.safe_load_all(path.read_text()))
        assert documents and all(isinstance(doc, dict) for doc in documents), path


# --- Dockerfile ------------------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def test_dockerfile_is_multi_stage_and_runs_unprivileged() -> None:
    stages = [args for name, args in dockerfile_instructions() if name == "FROM"]
    assert len(stages) >= 2
    assert any(
        args.startswith("--from=ghcr.io/astral-sh/uv:") for name, args in dockerfile_instructions() if name == "COPY"
    )
    users = [args for name, args in final_stage() if name == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert users[-1].split(":")[0].isdigit()  # numeric, so Kubernetes' runAsNonRoot can verify it


def test_dockerfile_entry_point_is_postcall_serve_on_all_interfaces() -> None:
    stage = dict(final_stage())
    entrypoint, cmd = json.loads(stage["ENTRYPOINT"]), json.loads(stage["CMD"])
    assert entrypoint == ["postcall"]
    assert cmd[:3] == ["serve", "--host", ALL_INTERFACES]
    assert_real_command(cmd)
    port = cmd[cmd.index("--port") + 1]
    assert stage["EXPOSE"] == port
    assert f"http://127.0.0.1:{port}/healthz" in stage["HEALTHCHECK"]


def test_image_carries_the_migrations_beside_the_package() -> None:
    # service/migrations.py looks for <source root>/alembic: both must be copied into the same directory.
    copies = [args.split() for name, args in dockerfile_instructions() if name == "COPY" and "--from" not in args]
    assert ["service", "./service"] in copies
    assert ["alembic", "./alembic"] in copies


def test_dockerignore_lets_in_everything_the_dockerfile_copies() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore
    sources = []
    for name, args in dockerfile_instructions():
        if name == "COPY" and "--from" not in args:
            sources += args.split()[:-1]
    assert set(sources) <= allowed


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(DEPLOY / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- compose ---------------------------------------------------------------------------------------------------------


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = load_yaml("compose.yaml")["services"]
    return services


def reconciler_script() -> str:
    reconciler = compose_services()["reconciler"]
    assert reconciler["entrypoint"] == ["/bin/sh", "-c"]
    # Compose turns `$$` into `$` before the shell sees the script.
    return str(reconciler["command"][0]).replace("$$", "$")


def test_compose_runs_postgres_postcall_and_a_reconciler_on_one_image() -> None:
    services = compose_services()
    assert set(services) == {"db", "minio", "minio-bucket", "nats", "postcall", "reconciler"}
    assert services["db"]["image"].startswith("postgres:")
    assert services["postcall"]["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert services["postcall"]["image"] == services["reconciler"]["image"]
    assert_real_command(services["postcall"]["command"])
    assert services["postcall"]["depends_on"]["db"]["condition"] == "service_healthy"
    assert services["reconciler"]["depends_on"]["postcall"]["condition"] == "service_healthy"


def test_compose_services_share_the_database_the_data_volume_and_the_env_file() -> None:
    services = compose_services()
    volumes = load_yaml("compose.yaml")["volumes"]
    for name in ("postcall", "reconciler"):
        service = services[name]
        assert service["env_file"] == ".env"
        assert service["environment"]["POSTCALL_DATABASE_URL"].startswith("postgresql+psycopg://postcall:")
        assert service["environment"]["POSTCALL_DATABASE_URL"].endswith("@db:5432/postcall")
        assert service["environment"]["POSTCALL_DATA_DIR"] == DATA_DIR
        assert service["volumes"] == [f"postcall-data:{DATA_DIR}"]
    assert set(volumes) == {"postgres-data", "postcall-data", "minio-data", "nats-data"}


def test_compose_reconciler_loops_postcall_reconcile_with_a_sleep() -> None:
    script = reconciler_script()
    assert "while :; do" in script
    assert "postcall reconcile " in script
    assert 'sleep "${RECONCILE_INTERVAL_SECONDS:-900}"' in script
    assert_real_command(["reconcile"])


def test_shellcheck_finds_nothing_in_the_reconciler_loop(tmp_path: Path) -> None:
    script = tmp_path / "reconciler.sh"
    script.write_text("#!/bin/sh\n" + reconciler_script())
    result = subprocess.run(
        [tool("shellcheck"), "--shell=sh", str(script)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout


def test_shellcheck_finds_no_warnings_in_the_ci_script() -> None:
    result = subprocess.run(
        [tool("shellcheck"), "--severity=warning", str(ROOT / ".ci" / "run")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout


def minio_bucket_script() -> str:
    init = compose_services()["minio-bucket"]
    assert init["entrypoint"] == ["/bin/sh", "-c"]
    return str(init["command"][0]).replace("$$", "$")


def test_compose_keeps_the_audio_in_the_minio_bucket_its_init_step_creates() -> None:
    services = compose_services()
    assert services["minio"]["image"].startswith("minio/minio:")
    assert services["minio"]["command"][:2] == ["server", "/data"]  # the API on MinIO's port 9000
    assert services["minio"]["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    script = minio_bucket_script()
    (made,) = re.findall(r"^mc mb --ignore-existing local/(\S+)$", script, flags=re.MULTILINE)
    assert services["minio-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["postcall"]["depends_on"]["minio-bucket"]["condition"] == "service_completed_successfully"
    for name in ("postcall", "reconciler"):
        environment = services[name]["environment"]
        store = S3Location.parse(environment["POSTCALL_AUDIO_STORE"])
        assert store.bucket == made
        assert environment["POSTCALL_S3_ENDPOINT_URL"] == "http://minio:9000"
        # postcall signs in as the user the init step creates, never as MinIO's root.
        assert environment["AWS_ACCESS_KEY_ID"].startswith("${S3_ACCESS_KEY_ID:?")
        assert environment["AWS_SECRET_ACCESS_KEY"].startswith("${S3_SECRET_ACCESS_KEY:?")
        Settings(  # the settings postcall starts with there are valid
            webhook_secrets="x",
            audio_store=environment["POSTCALL_AUDIO_STORE"],
            s3_endpoint_url=environment["POSTCALL_S3_ENDPOINT_URL"],
            _env_file=None,  # type: ignore[call-arg]
        )
    assert 'mc admin user add local "$S3_ACCESS_KEY_ID" "$S3_SECRET_ACCESS_KEY"' in script
    assert re.search(r'^mc admin policy attach local readwrite --user "\$S3_ACCESS_KEY_ID"', script, re.MULTILINE)
    assert "minio-data" in load_yaml("compose.yaml")["volumes"]


def test_shellcheck_finds_nothing_in_the_bucket_set_up(tmp_path: Path) -> None:
    script = tmp_path / "minio-bucket.sh"
    script.write_text("#!/bin/sh\n" + minio_bucket_script())
    result = subprocess.run(
        [tool("shellcheck"), "--shell=sh", str(script)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout


def test_compose_runs_nats_with_jetstream_on_a_volume() -> None:
    nats = compose_services()["nats"]
    assert nats["image"].startswith("nats:2")
    assert "-js" in nats["command"]
    store_dir = nats["command"][nats["command"].index("-sd") + 1]
    assert nats["volumes"] == [f"nats-data:{store_dir}"]


def test_env_example_sets_every_variable_compose_requires() -> None:
    text = (DEPLOY / ".env.example").read_text()
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", (DEPLOY / "compose.yaml").read_text()))
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "S3_SECRET_ACCESS_KEY"} <= required
    assert {name for name in required if re.search(rf"^{name}=\S", text, flags=re.MULTILINE)} == required


def test_env_example_lists_every_setting() -> None:
    text = (DEPLOY / ".env.example").read_text()
    listed = set(re.findall(r"^#? ?(POSTCALL_[A-Z0-9_]+)=", text, flags=re.MULTILINE))
    assert listed == SETTINGS_VARIABLES
    assert "POSTGRES_PASSWORD=" in text  # compose interpolates it


# --- systemd ---------------------------------------------------------------------------------------------------------


def unit(name: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value), …]}: keys may repeat (Environment=, SystemCallFilter=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in (DEPLOY / "systemd" / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert current is not None and sep, f"{name}: cannot parse {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [value for name, value in section if name == key]


def one(section: list[tuple[str, str]], key: str) -> str:
    found = values(section, key)
    assert len(found) == 1, f"{key}= appears {len(found)} times"
    return found[0]


@pytest.mark.parametrize(
    ("name", "command"),
    [("postcall.service", "serve"), ("postcall-reconcile.service", "reconcile")],
)
def test_systemd_services_run_a_real_postcall_command_hardened(name: str, command: str) -> None:
    sections = unit(name)
    assert {"Unit", "Service"} <= set(sections)
    service = sections["Service"]
    executable, *argv = shlex.split(one(service, "ExecStart"))
    assert executable == "/opt/postcall/.venv/bin/postcall"
    assert argv[0] == command
    assert_real_command(argv)
    assert one(service, "User") == "postcall"
    assert one(service, "ProtectSystem") == "strict"
    assert one(service, "NoNewPrivileges") == "yes"
    assert one(service, "CapabilityBoundingSet") == ""
    assert one(service, "EnvironmentFile") == "/etc/postcall/postcall.env"
    environment = dict(value.split("=", 1) for value in values(service, "Environment"))
    writable = one(service, "ReadWritePaths").split()
    assert environment["POSTCALL_DATA_DIR"] == DATA_DIR
    assert any(DATA_DIR.startswith(path) for path in writable)
    assert environment["POSTCALL_DATABASE_URL"].removeprefix("sqlite:///").startswith(tuple(writable))


def test_systemd_server_listens_on_loopback_and_restarts() -> None:
    sections = unit("postcall.service")
    assert "--host 127.0.0.1" in one(sections["Service"], "ExecStart")
    assert one(sections["Service"], "Restart") == "on-failure"
    assert one(sections["Install"], "WantedBy") == "multi-user.target"


def test_systemd_reconcile_is_a_oneshot_that_treats_a_held_lease_as_success() -> None:
    service = unit("postcall-reconcile.service")["Service"]
    assert one(service, "Type") == "oneshot"
    assert one(service, "SuccessExitStatus") == "3"


def test_systemd_timer_starts_reconcile_every_15_minutes() -> None:
    sections = unit("postcall-reconcile.timer")
    timer = sections["Timer"]
    assert one(timer, "OnCalendar") == "*:0/15"
    assert one(timer, "Unit") == "postcall-reconcile.service"
    assert one(timer, "Persistent") == "true"
    assert one(sections["Install"], "WantedBy") == "timers.target"


def test_systemd_agrees_the_timer_fires_every_15_minutes() -> None:
    result = subprocess.run(
        [
            tool("systemd-analyze"),
            "calendar",
            "--iterations=3",
            one(unit("postcall-reconcile.timer")["Timer"], "OnCalendar"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    stamps = re.findall(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", result.stdout)
    times = [datetime.fromisoformat(stamp) for stamp in stamps]
    assert len(times) == 3
    assert [(b - a).total_seconds() for a, b in itertools.pairwise(times)] == [900, 900]


@pytest.fixture
def installable_units(tmp_path: Path) -> Path:
    """The units as systemd would load them, with ExecStart pointing at a binary that exists on this machine."""
    for path in (DEPLOY / "systemd").iterdir():
        text = path.read_text().replace("/opt/postcall/.venv/bin/postcall", shutil.which("true") or "/bin/true")
        (tmp_path / path.name).write_text(text)
    return tmp_path


def test_systemd_analyze_verify_knows_every_directive(installable_units: Path) -> None:
    units = sorted(str(path) for path in installable_units.iterdir())
    result = subprocess.run([tool("systemd-analyze"), "verify", *units], capture_output=True, text=True, check=False)
    problems = [line for line in result.stderr.splitlines() if str(installable_units) in line]
    assert result.returncode == 0 and not problems, result.stderr


@pytest.mark.parametrize("name", ["postcall.service", "postcall-reconcile.service"])
def test_systemd_security_exposure_is_low(installable_units: Path, name: str) -> None:
    result = subprocess.run(
        [tool("systemd-analyze"), "security", "--offline=yes", "--no-pager", str(installable_units / name)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    if match is None:
        pytest.skip(f"this systemd-analyze cannot rate units offline: {result.stderr.strip()[:200]}")
    assert float(match.group(1)) <= 2.0, result.stdout  # systemd calls 0-2 "OK", the best band


# --- Kubernetes ------------------------------------------------------------------------------------------------------


def k8s(name: str) -> dict[str, Any]:
    document: dict[str, Any] = load_yaml(f"k8s/{name}")
    return document


def pod_spec(kind: str) -> dict[str, Any]:
    if kind == "Deployment":
        spec: dict[str, Any] = k8s("deployment.yaml")["spec"]["template"]["spec"]
    else:
        spec = k8s("cronjob.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return spec


def test_k8s_files_hold_the_expected_kinds() -> None:
    kinds = {path.name: k8s(path.name)["kind"] for path in (DEPLOY / "k8s").glob("*.yaml")}
    assert kinds == {
        "kustomization.yaml": "Kustomization",
        "deployment.yaml": "Deployment",
        "service.yaml": "Service",
        "cronjob.yaml": "CronJob",
        "pvc.yaml": "PersistentVolumeClaim",
        "secret.template.yaml": "Secret",
    }


def test_kustomization_applies_everything_but_the_secret_template_and_sets_the_image() -> None:
    kustomization = k8s("kustomization.yaml")
    files = {path.name for path in (DEPLOY / "k8s").glob("*.yaml")}
    assert set(kustomization["resources"]) == files - {"kustomization.yaml", "secret.template.yaml"}
    images = {container["image"] for kind in ("Deployment", "CronJob") for container in containers(kind)}
    assert images == {image["name"] for image in kustomization["images"]} == {"postcall"}


def containers(kind: str) -> list[dict[str, Any]]:
    spec = pod_spec(kind)
    found: list[dict[str, Any]] = spec.get("initContainers", []) + spec["containers"]
    return found


def test_deployment_serves_two_replicas_with_readiness_and_liveness_probes() -> None:
    deployment = k8s("deployment.yaml")
    assert deployment["spec"]["replicas"] == 2
    (server,) = pod_spec("Deployment")["containers"]
    assert_real_command(server["args"])
    assert server["args"][:3] == ["serve", "--host", ALL_INTERFACES]
    (port,) = server["ports"]
    assert port == {"name": "http", "containerPort": int(server["args"][server["args"].index("--port") + 1])}
    assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}


def test_deployment_migrates_before_serving() -> None:
    (migrate,) = pod_spec("Deployment")["initContainers"]
    assert migrate["args"] == ["migrate"]
    assert_real_command(migrate["args"])
    assert "--no-migrate" in pod_spec("Deployment")["containers"][0]["args"]


def test_cronjob_reconciles_every_15_minutes_one_at_a_time() -> None:
    cronjob = k8s("cronjob.yaml")["spec"]
    assert cronjob["schedule"] == "*/15 * * * *"
    assert cronjob["concurrencyPolicy"] == "Forbid"
    (container,) = pod_spec("CronJob")["containers"]
    assert container["args"] == ["reconcile"]
    assert_real_command(container["args"])
    assert pod_spec("CronJob")["restartPolicy"] == "Never"


@pytest.mark.parametrize("kind", ["Deployment", "CronJob"])
def test_pods_run_unprivileged_with_the_secret_and_the_shared_audio_claim(kind: str) -> None:
    spec = pod_spec(kind)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    claim = k8s("pvc.yaml")
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    for container in containers(kind):
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["envFrom"] == [{"secretRef": {"name": k8s("secret.template.yaml")["metadata"]["name"]}}]
    for container in spec["containers"]:
        mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
        assert mounts["data"] == DATA_DIR
        assert {"name": "POSTCALL_DATA_DIR", "value": DATA_DIR} in container["env"]


def test_audio_claim_is_shared_read_write_by_many_pods() -> None:
    assert k8s("pvc.yaml")["spec"]["accessModes"] == ["ReadWriteMany"]


def test_service_routes_to_the_server_pods_named_port() -> None:
    service = k8s("service.yaml")["spec"]
    pod_labels = k8s("deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= pod_labels.items()
    assert service["ports"][0]["targetPort"] == "http"


def test_secret_template_holds_only_real_settings() -> None:
    secret = k8s("secret.template.yaml")
    assert set(secret["stringData"]) <= SETTINGS_VARIABLES
    assert {"POSTCALL_DATABASE_URL", "POSTCALL_WEBHOOK_SECRETS", "POSTCALL_ELEVENLABS_API_KEY"} <= set(
        secret["stringData"]
    )
    assert secret["stringData"]["POSTCALL_DATABASE_URL"].startswith("postgresql+psycopg://")


def test_kubectl_kustomize_builds_the_manifests_with_the_image_set() -> None:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    documents = list(yaml.safe_load_all(result.stdout))
    assert sorted(doc["kind"] for doc in documents) == ["CronJob", "Deployment", "PersistentVolumeClaim", "Service"]
    image = "{newName}:{newTag}".format(**k8s("kustomization.yaml")["images"][0])
    assert result.stdout.count(f"image: {image}") == 3  # migrate, serve, reconcile


# --- Kubernetes with the audio in a bucket (deploy/k8s-bucket: an overlay of deploy/k8s) ------------------------------


def bucket_overlay(name: str) -> dict[str, Any]:
    document: dict[str, Any] = load_yaml(f"k8s-bucket/{name}")
    return document


def test_bucket_overlay_patches_resources_the_base_has() -> None:
    overlay = bucket_overlay("kustomization.yaml")
    assert overlay["resources"] == ["../k8s"]
    base = {(k8s(name)["kind"], k8s(name)["metadata"]["name"]) for name in k8s("kustomization.yaml")["resources"]}
    patched = {
        (bucket_overlay(patch["path"])["kind"], bucket_overlay(patch["path"])["metadata"]["name"])
        for patch in overlay["patches"]
    }
    assert patched <= base
    assert bucket_overlay("no-shared-claim.yaml")["$patch"] == "delete"
    assert bucket_overlay("no-shared-claim.yaml")["metadata"]["name"] == k8s("pvc.yaml")["metadata"]["name"]


def test_bucket_secret_template_holds_the_standard_aws_variables() -> None:
    secret = bucket_overlay("s3-secret.template.yaml")
    assert secret["kind"] == "Secret"
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"}
    assert "s3-secret.template.yaml" not in [patch["path"] for patch in bucket_overlay("kustomization.yaml")["patches"]]


def test_kubectl_kustomize_builds_the_bucket_variant_without_a_shared_claim() -> None:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(DEPLOY / "k8s-bucket")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    documents = {doc["kind"]: doc for doc in yaml.safe_load_all(result.stdout)}
    assert sorted(documents) == ["CronJob", "Deployment", "Service"]  # no PersistentVolumeClaim
    assert "persistentVolumeClaim" not in result.stdout
    secret = bucket_overlay("s3-secret.template.yaml")["metadata"]["name"]
    pods = {
        "Deployment": documents["Deployment"]["spec"]["template"]["spec"],
        "CronJob": documents["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"],
    }
    for spec in pods.values():
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        assert set(volumes["data"]) == {"name", "emptyDir"}  # each pod's own: only spills wait there
        for container in spec["containers"]:
            env = {item["name"]: item["value"] for item in container["env"]}
            S3Location.parse(env["POSTCALL_AUDIO_STORE"])
            assert env["POSTCALL_DATA_DIR"] == DATA_DIR
            assert {"secretRef": {"name": secret}} in container["envFrom"]
            assert {"secretRef": {"name": "postcall"}} in container["envFrom"]
    image = "{newName}:{newTag}".format(**k8s("kustomization.yaml")["images"][0])
    assert result.stdout.count(f"image: {image}") == 3
