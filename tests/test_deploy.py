"""Deployment files: the systemd units (one gateway, and one instance of several per port), their environment file,
the nginx configuration in front of several instances, and the sidecar container's entrypoint and compose file."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench import peers
from proxy.config import load_config
from tests.conftest import DEFAULT_CONFIG, ROOT

UNIT = ROOT / "systemd" / "stats-gateway.service"
INSTANCE_UNIT = ROOT / "systemd" / "stats-gateway@.service"
ENV_EXAMPLE = ROOT / "systemd" / "gateway.env.example"
ENTRYPOINT = ROOT / "systemd" / "sidecar" / "docker-entrypoint.sh"
COMPOSE = ROOT / "systemd" / "sidecar" / "compose.yaml"
INSTALLED_SCRIPT = "/opt/stats-gateway/.venv/bin/stats-gateway"
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}


def unit_settings(unit: Path = UNIT) -> dict[str, dict[str, list[str]]]:
    """The unit file as {section: {key: [values in order]}} (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a setting: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service(key: str, unit: Path = UNIT) -> str:
    values = unit_settings(unit)["Service"].get(key)
    assert values, f"{key}= is not set in {unit.name}"
    return values[-1]


def seconds(span: str) -> float:
    """A systemd time span ("75", "75s", "1min 15s") or a compose duration ("1m15s") in seconds."""
    if re.fullmatch(r"\d+(\.\d+)?", span.strip()):
        return float(span)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", span)
    assert parts and "".join(n + u for n, u in parts) == re.sub(r"\s+", "", span), f"cannot parse {span!r}"
    return sum(float(n) * _UNITS[u] for n, u in parts)


def drain_timeout() -> float:
    return load_config(DEFAULT_CONFIG, env={}).server.drain_timeout_s


def stop_budget(drain: float) -> float:
    """The longest a clean stop takes: the drain, then the usage-record flush (proxy/app.py, `_resources`)."""
    return drain + max(drain, 10.0)


def systemd_analyze() -> str | None:
    found = shutil.which("systemd-analyze")
    if found is None and os.access("/usr/bin/systemd-analyze", os.X_OK):
        found = "/usr/bin/systemd-analyze"
    return found


@pytest.mark.parametrize("unit_file", [UNIT, INSTANCE_UNIT], ids=["single", "instance"])
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, unit_file: Path):
    analyze = systemd_analyze()
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set and systemd-analyze is missing: install the `systemd` package (see .ci/run)")
        pytest.skip("systemd-analyze is not installed (CI installs it)")
    # verify refuses an ExecStart= binary that does not exist: point it at this environment's script.
    script = Path(sys.prefix) / "bin" / "stats-gateway"
    if not script.exists():
        script = Path(shutil.which("stats-gateway") or script)
    assert script.exists(), "the stats-gateway console script is not installed: pip install -e ."
    original = unit_file.read_bytes()
    assert original.count(INSTALLED_SCRIPT.encode()) == 1
    # A template is verified as one of its instances (the instance name is the port).
    unit = tmp_path / unit_file.name.replace("@.", "@8081.")
    unit.write_bytes(original.replace(INSTALLED_SCRIPT.encode(), os.fsencode(script)))

    result = subprocess.run(
        [analyze, "verify", str(unit)], cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False
    )
    output = result.stdout + result.stderr
    ours = [line for line in output.splitlines() if unit.name in line or str(tmp_path) in line]
    assert result.returncode == 0, output
    assert not ours, "\n".join(ours)


def test_unit_stops_after_the_drain_and_reloads_with_sighup():
    drain = drain_timeout()
    budget = stop_budget(drain)
    timeout = seconds(service("TimeoutStopSec"))
    assert timeout > drain
    assert timeout > budget, f"TimeoutStopSec={timeout:g}s leaves no margin over drain + flush ({budget:g}s)"
    assert service("KillSignal") in ("SIGTERM", "TERM", "15")
    assert service("ExecReload").split() == ["/bin/kill", "-HUP", "$MAINPID"]
    assert service("ExecStart").split()[:2] == [INSTALLED_SCRIPT, "serve"]
    state = service("StateDirectory")
    assert service("Environment").startswith(f"GATEWAY_STORE=sqlite:////var/lib/{state}/")


def test_instance_unit_is_the_single_unit_on_a_port_and_postgres():
    """The same user, files, hardening and stop budget as stats-gateway.service; only what makes it an instance
    (its port, its pid file, a PostgreSQL store) differs."""
    single, instance = unit_settings(UNIT), unit_settings(INSTANCE_UNIT)
    differ = {"Description", "After", "ExecStart", "Environment", "RuntimeDirectory", "RuntimeDirectoryMode"}
    for section in ("Unit", "Service", "Install"):
        same = {k: v for k, v in single[section].items() if k not in differ}
        assert same == {k: v for k, v in instance[section].items() if k not in differ}, section
    assert service("ExecStart", INSTANCE_UNIT) == service("ExecStart") + " --port %i"
    environment = unit_settings(INSTANCE_UNIT)["Service"]["Environment"]
    assert any(e.startswith("GATEWAY_STORE=postgresql://") for e in environment)
    assert "GATEWAY_PID_FILE=/run/stats-gateway-%i/gateway.pid" in environment
    assert service("RuntimeDirectory", INSTANCE_UNIT) == "stats-gateway-%i"
    assert "postgresql.service" in unit_settings(INSTANCE_UNIT)["Unit"]["After"][-1].split()


def test_nginx_instances_conf_passes_nginx_t(tmp_path: Path):
    """systemd/nginx-gateway-instances.conf, in the main file the bench runs it in, is valid nginx; its
    upstream is the three instance ports, kept alive, unbuffered for streams."""
    try:
        nginx = peers.find_nginx()
    except peers.Skipped as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and {e} (see .ci/run)")
        pytest.skip(str(e))
    text = peers.INSTANCES_CONF.read_text()
    for port in (8081, 8082, 8083):
        assert f"server 127.0.0.1:{port} " in text
    for directive in ("keepalive 256;", "proxy_http_version 1.1;", 'proxy_set_header Connection "";'):
        assert directive in text
    assert "proxy_buffering off;" in text and "proxy_read_timeout 310s;" in text
    conf = peers.nginx_conf(tmp_path, "instances", peers.instances_http(18080, [18081, 18082, 18083]))
    result = subprocess.run(
        [nginx, "-t", "-c", str(conf), "-p", str(tmp_path)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr


def test_compose_waits_for_the_drain_too():
    compose = yaml.safe_load(COMPOSE.read_text())
    gateway = compose["services"]["gateway"]
    assert seconds(str(gateway["stop_grace_period"])) > stop_budget(drain_timeout())
    app = compose["services"]["app"]
    assert app["network_mode"] == "service:gateway"
    assert gateway["environment"]["GATEWAY_HOST"] == "127.0.0.1"


def test_entrypoint_is_valid_bash_and_execs_the_gateway():
    result = subprocess.run(["bash", "-n", str(ENTRYPOINT)], capture_output=True, text=True, timeout=10, check=False)
    assert result.returncode == 0, result.stderr
    code = [line.strip() for line in ENTRYPOINT.read_text().splitlines() if not line.lstrip().startswith("#")]
    assert any(re.match(r"exec stats-gateway serve\b", line) for line in code), "serve must be exec'd (signals)"
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR


def test_env_example_names_every_provider_variable():
    active: dict[str, str] = {}
    named: set[str] = set()
    for raw in ENV_EXAMPLE.read_text().splitlines():
        m = re.fullmatch(r"(#?)\s*([A-Z][A-Z0-9_]*)=(.*)", raw.strip())
        if m:
            named.add(m[2])
            if not m[1]:
                active[m[2]] = m[3]
    providers = yaml.safe_load(DEFAULT_CONFIG.read_text())["providers"]
    keys: set[str] = set()
    others: set[str] = set()
    for provider in providers.values():
        keys.update(VAR_RE.findall(str(provider.get("api_key", ""))))
        others.update(VAR_RE.findall(str({k: v for k, v in provider.items() if k != "api_key"})))
    assert keys, "config/gateway.yaml reads no provider key variables?"
    assert sorted(keys - active.keys()) == [], "provider keys missing from gateway.env.example"
    assert sorted(others - named) == [], "provider variables not named in gateway.env.example"
    assert all(active[k] == "" for k in keys), "the example must not carry key values"
