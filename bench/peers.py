"""Other proxies and gateways, measured beside ours against the same mock upstream.

Each `start_<peer>(procs, workdir, mock_port)` starts one and returns its `Target`, or raises `Skipped`
saying why it cannot run here (not installed, cannot be installed offline, failed to start). A skipped
peer is reported as such; it never fails the run.

- `nginx`: Debian's nginx as a plain reverse proxy, buffering off (what people put in front of a gateway). Its
  helpers also run `systemd/nginx-gateway-instances.conf` in front of three gateways (bench/run.py,
  `gateway-pg-x3`).
- `litellm`: LiteLLM's proxy (PyPI), one worker, no database, configured for the mock.
- `portkey`: Portkey's gateway (npm), defaults, routed to the mock by its headers.

LiteLLM and Portkey are never installed by a run: `install(peer)` (`python -m bench --install-peers`) puts
pinned versions in a cache outside the repository, `peers_dir()`: `$BENCH_PEERS_DIR`, by default
`~/.cache/stats-gateway-bench`. LiteLLM gets a virtualenv of its own there, so the project's is untouched.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import yaml

from bench.loads import BenchError, Target
from bench.procs import REPO, Processes, free_port, tcp_open, wait_ready

MOCK_KEY = "sk-bench"
MOCK_MODEL = "gpt-4o-mini"
CHAT_PATH = "/v1/chat/completions"
NOT_INSTALLED = "not installed: python -m bench --install-peers"

LITELLM_VERSION = "1.108.7"  # PyPI: litellm[proxy]; 1.108.8+ pin litellm-enterprise etc. releases PyPI lacks here
PORTKEY_VERSION = "1.15.2"  # npm: @portkey-ai/gateway
# Portkey's package takes the newest @hono/node-server its range allows (1.19.19 here). With it (and with 1.14.2) a
# streamed answer keeps the upstream's immutable fetch headers, Portkey's header update throws and every stream is
# answered 500 ("TypeError: immutable"). 1.14.0, with the @hono/node-ws its peer range allows, streams.
PORTKEY_OVERRIDES = {"@hono/node-server": "1.14.0", "@hono/node-ws": "1.2.0"}
PORTKEY_ENTRY = "build/start-server.js"  # the package's `bin`
LITELLM_MASTER_KEY = "sk-bench-litellm"  # what clients send the LiteLLM proxy; it sends MOCK_KEY upstream
PEER_READY_TIMEOUT_S = 120.0  # LiteLLM imports for a long while before it listens
INSTALL_TIMEOUT_S = 1800.0
# LiteLLM fetches catalogues (model costs, Anthropic beta headers, ...) from the internet unless told not to:
# LITELLM_OFFLINE_MODE turns them all off in newer releases, the LITELLM_LOCAL_* one each in the pinned one.
LITELLM_OFFLINE_ENV = {
    "LITELLM_OFFLINE_MODE": "true",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "LITELLM_TELEMETRY_DISABLED": "true",  # off by default; this vetoes it whatever else the environment says
    "LITELLM_MODE": "PRODUCTION",  # loads no .env file
    "LITELLM_LOG": "ERROR",
}
# Production: no log-viewer UI and no log streaming; custom hosts on 127.0.0.1 allowed (its default, made explicit).
PORTKEY_ENV = {"NODE_ENV": "production", "TRUSTED_CUSTOM_HOSTS": "localhost,127.0.0.1"}
# Requests to the peers stay on 127.0.0.1, whatever proxy the environment names.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Skipped(Exception):
    """A peer that cannot be measured on this machine; the message says why."""


# nginx's main file for one instance run by the bench: no daemon, everything in the run's folder; `http` is the
# http-context configuration (upstreams and servers).
NGINX_MAIN = """daemon off;
worker_processes 1;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/{name}-body;
    proxy_temp_path {workdir}/{name}-proxy;
    fastcgi_temp_path {workdir}/{name}-fastcgi;
    uwsgi_temp_path {workdir}/{name}-uwsgi;
    scgi_temp_path {workdir}/{name}-scgi;
{http}
}}
"""

NGINX_MOCK = """    upstream mock {{
        server 127.0.0.1:{mock_port};
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_cache off;
            proxy_read_timeout 300s;
        }}
    }}"""

# The deployment's nginx configuration for three gateways behind one port, run by the bench as it is, but for
# its ports (`gateway-pg-x3`).
INSTANCES_CONF = REPO / "systemd" / "nginx-gateway-instances.conf"
INSTANCES_LISTEN = "listen 127.0.0.1:8080;"
INSTANCES_PORTS = (8081, 8082, 8083)


def find_nginx() -> str:
    """nginx's path; `Skipped` when it is not installed."""
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if nginx is None:
        raise Skipped("nginx is not installed (Debian: apt-get install nginx-light)")
    return nginx


def nginx_conf(workdir: Path, name: str, http: str) -> Path:
    """Write the main file of an nginx named `name` serving `http` (http-context text); its path."""
    conf = workdir / f"{name}.conf"
    conf.write_text(NGINX_MAIN.format(workdir=workdir, name=name, http=http))
    return conf


def instances_http(port: int, gateway_ports: list[int]) -> str:
    """systemd/nginx-gateway-instances.conf listening on `port` in front of gateways on `gateway_ports`."""
    text = INSTANCES_CONF.read_text()
    swaps = [(INSTANCES_LISTEN, f"listen 127.0.0.1:{port};")]
    for old, new in zip(INSTANCES_PORTS, gateway_ports, strict=True):
        swaps.append((f"server 127.0.0.1:{old} ", f"server 127.0.0.1:{new} "))
    for old, new in swaps:
        if text.count(old) != 1:
            raise BenchError(f"{INSTANCES_CONF.name} no longer holds {old!r} exactly once: update bench/peers.py")
        text = text.replace(old, new)
    return text


def start_nginx(procs: Processes, workdir: Path, mock_port: int) -> Target:
    nginx = find_nginx()
    port = free_port()
    conf = nginx_conf(workdir, "nginx", NGINX_MOCK.format(mock_port=mock_port, port=port))
    child = procs.start("nginx", [nginx, "-c", str(conf), "-p", str(workdir)])
    wait_ready("nginx", child, lambda: tcp_open(port), procs.log("nginx"))
    return Target("nginx", f"http://127.0.0.1:{port}{CHAT_PATH}", MOCK_KEY, MOCK_MODEL, pid=child.pid)


def peers_dir() -> Path:
    """Where `install` puts LiteLLM and Portkey: `$BENCH_PEERS_DIR`, else ~/.cache/stats-gateway-bench."""
    return Path(os.environ.get("BENCH_PEERS_DIR", Path.home() / ".cache" / "stats-gateway-bench"))


# --- installing (only by `python -m bench --install-peers`, never during a run) -----------------------------

INSTALLABLE = ("litellm", "portkey")


def install(peer: str) -> None:
    """Install `peer` ("litellm" or "portkey") at its pinned version into `peers_dir()`, printing progress.

    Reinstalling over an existing install upgrades or downgrades it to the pin. Raises `BenchError` on failure.
    """
    installers = {"litellm": _install_litellm, "portkey": _install_portkey}
    if peer not in installers:
        hint = " (nginx comes from Debian: apt-get install nginx-light)" if peer == "nginx" else ""
        raise BenchError(f"the bench installs only {', '.join(INSTALLABLE)}, not {peer!r}{hint}")
    installers[peer]()
    print(f"{peer} {installed_version(peer)} installed in {peers_dir() / peer}", flush=True)


def _install_litellm() -> None:
    venv = peers_dir() / "litellm"
    if not (venv / "bin" / "python").exists():
        python3 = shutil.which("python3") or sys.executable
        _run_install("litellm", [python3, "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    _run_install("litellm", [*pip, f"litellm[proxy]=={LITELLM_VERSION}"])


def _install_portkey() -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise BenchError("installing portkey needs npm (Debian: apt-get install npm)")
    prefix = peers_dir() / "portkey"
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "package-lock.json").unlink(missing_ok=True)  # resolve afresh under the pins below
    (prefix / "package.json").write_text(json.dumps(portkey_manifest(), indent=2) + "\n")
    _run_install("portkey", [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund"])


def portkey_manifest() -> dict[str, object]:
    """The package.json `install` writes for Portkey: the pinned gateway and the dependency overrides."""
    return {"private": True, "dependencies": {"@portkey-ai/gateway": PORTKEY_VERSION}, "overrides": PORTKEY_OVERRIDES}


def _run_install(peer: str, argv: list[str]) -> None:
    print(f"installing {peer}: {' '.join(argv)}", flush=True)
    try:
        subprocess.run(argv, check=True, timeout=INSTALL_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BenchError(f"installing {peer} failed: {exc}") from exc


def installed_version(peer: str) -> str | None:
    """The installed version of `peer` (litellm or portkey) in `peers_dir()`, or None when it is not there."""
    if peer == "litellm":
        if not litellm_bin().exists():
            return None
        sites = [str(site) for site in (peers_dir() / "litellm").glob("lib/python3*/site-packages")]
        return next((dist.version for dist in importlib.metadata.distributions(name="litellm", path=sites)), None)
    if peer == "portkey":
        if not (portkey_package() / PORTKEY_ENTRY).exists():
            return None
        return _package_version(portkey_package())
    return None


def _package_version(package: Path) -> str | None:
    try:
        return str(json.loads((package / "package.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


def _require(peer: str, pinned: str) -> None:
    version = installed_version(peer)
    if version is None:
        raise Skipped(NOT_INSTALLED)
    if version != pinned:
        raise Skipped(f"{peer} {version} is installed but {pinned} is pinned: python -m bench --install-peers")


# --- starting -----------------------------------------------------------------------------------------------


def litellm_bin() -> Path:
    return peers_dir() / "litellm" / "bin" / "litellm"


def litellm_config(mock_port: int) -> str:
    """LiteLLM's proxy config: the mock as its one model, our key to the mock, a master key for clients."""
    config = {
        "model_list": [
            {
                "model_name": MOCK_MODEL,
                "litellm_params": {
                    "model": f"openai/{MOCK_MODEL}",
                    "api_base": f"http://127.0.0.1:{mock_port}/v1",
                    "api_key": MOCK_KEY,
                },
            }
        ],
        "general_settings": {"master_key": LITELLM_MASTER_KEY},
    }
    return yaml.safe_dump(config, sort_keys=False)


def litellm_env() -> dict[str, str]:
    """Our environment with LiteLLM kept offline and away from any database or cache the shell may name."""
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "DIRECT_URL", "REDIS_URL", "REDIS_HOST"}}
    return env | LITELLM_OFFLINE_ENV


def start_litellm(procs: Processes, workdir: Path, mock_port: int) -> Target:
    _require("litellm", LITELLM_VERSION)
    port = free_port()
    config = workdir / "litellm.yaml"
    config.write_text(litellm_config(mock_port))
    argv = [str(litellm_bin()), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    child = _start(procs, "litellm", [*argv, "--num_workers", "1"], litellm_env())
    target = Target("litellm", f"http://127.0.0.1:{port}{CHAT_PATH}", LITELLM_MASTER_KEY, MOCK_MODEL, pid=child.pid)
    _ready("litellm", procs, child, lambda: _get_ok(f"http://127.0.0.1:{port}/health/liveliness"), target)
    return target


def portkey_package() -> Path:
    return peers_dir() / "portkey" / "node_modules" / "@portkey-ai" / "gateway"


def portkey_headers(mock_port: int) -> tuple[tuple[str, str], ...]:
    """What routes a Portkey request to the mock: the provider and its host (the key goes as usual)."""
    return (("x-portkey-provider", "openai"), ("x-portkey-custom-host", f"http://127.0.0.1:{mock_port}/v1"))


def start_portkey(procs: Processes, workdir: Path, mock_port: int) -> Target:
    _require("portkey", PORTKEY_VERSION)
    for name, pinned in PORTKEY_OVERRIDES.items():
        # Node resolves the gateway's dependencies from its own node_modules first, then the prefix's.
        found = (portkey_package() / "node_modules" / name, peers_dir() / "portkey" / "node_modules" / name)
        version = next((_package_version(path) for path in found if path.exists()), None)
        if version != pinned:
            raise Skipped(f"portkey has {name} {version}, not {pinned}: python -m bench --install-peers")
    node = shutil.which("node")
    if node is None:
        raise Skipped("node is not installed (Debian: apt-get install nodejs)")
    port = free_port()
    argv = [node, str(portkey_package() / PORTKEY_ENTRY), f"--port={port}"]
    child = _start(procs, "portkey", argv, os.environ | PORTKEY_ENV)
    url = f"http://127.0.0.1:{port}{CHAT_PATH}"
    target = Target("portkey", url, MOCK_KEY, MOCK_MODEL, extra_headers=portkey_headers(mock_port), pid=child.pid)
    _ready("portkey", procs, child, lambda: _get_ok(f"http://127.0.0.1:{port}/"), target)
    return target


def _start(procs: Processes, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    try:
        return procs.start(name, argv, env)
    except OSError as exc:
        raise Skipped(f"{name} could not be started: {exc}") from exc


def _ready(
    name: str, procs: Processes, child: subprocess.Popen[bytes], ready: Callable[[], bool], target: Target
) -> None:
    """Wait for `child` to be ready and answer one chat request; else stop it and raise `Skipped` saying why."""
    try:
        wait_ready(name, child, ready, procs.log(name), timeout_s=PEER_READY_TIMEOUT_S)
        _first_request(target)
    except (BenchError, Skipped) as exc:
        _stop(child)
        raise Skipped(str(exc)) from exc


def _get_ok(url: str) -> bool:
    try:
        with _LOCAL.open(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _first_request(target: Target) -> None:
    """One plain and one streaming chat request, as the bench's preflight sends them; `Skipped` if either fails."""
    for stream in (False, True):
        kind = "streaming" if stream else "plain"
        body = target.chat_body(stream=stream)
        request = urllib.request.Request(target.url, data=body, headers=target.headers, method="POST")
        try:
            with _LOCAL.open(request, timeout=30) as resp:
                text = resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise Skipped(f"{target.name} started but answered a {kind} chat request {exc.code}: {detail}") from exc
        except OSError as exc:
            raise Skipped(f"{target.name} started but a {kind} chat request failed: {exc}") from exc
        if stream and "data: [DONE]" not in text:
            raise Skipped(f"{target.name} started but its stream did not end with [DONE]: {text[-500:]}")
        if not stream and '"choices"' not in text:
            raise Skipped(f"{target.name} started but its chat answer has no choices: {text[:500]}")


def _stop(child: subprocess.Popen[bytes]) -> None:
    """End a peer that will not be measured now, not at the end of the run (it would take CPU from the rest)."""
    for signum, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with suppress(ProcessLookupError):
            os.killpg(child.pid, signum)
        try:
            child.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


PEERS = {"nginx": start_nginx, "litellm": start_litellm, "portkey": start_portkey}
