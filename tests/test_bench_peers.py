"""bench/peers.py without installing anything: skips, the LiteLLM config, Portkey's routing, install commands.

Fake installs in a temporary BENCH_PEERS_DIR stand in for LiteLLM and Portkey; nothing here reaches a registry.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from bench import peers
from bench.loads import BenchError
from bench.procs import Processes


@pytest.fixture
def peers_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "peers"
    monkeypatch.setenv("BENCH_PEERS_DIR", str(root))
    return root


@pytest.fixture
def procs(tmp_path: Path):
    logs = tmp_path / "logs"
    logs.mkdir()
    with Processes(logs) as running:
        yield running


def fake_litellm(root: Path, script: str, version: str = peers.LITELLM_VERSION) -> None:
    """A LiteLLM 'install': its console script and the metadata `installed_version` reads."""
    site = root / "litellm" / "lib" / "python3.11" / "site-packages"
    info = site / f"litellm-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: litellm\nVersion: {version}\n")
    binary = root / "litellm" / "bin" / "litellm"
    binary.parent.mkdir(parents=True)
    binary.write_text(script)
    binary.chmod(0o755)


# A stand-in for `litellm --config C --host H --port P --num_workers 1`: live, but every chat request fails.
BROKEN_PROXY = f"""#!{sys.executable}
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health/liveliness" else 404)
        self.end_headers()

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = b'{{"error": "no such model"}}'
        self.send_response(500)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(sys.argv[sys.argv.index("--port") + 1])), Handler).serve_forever()
"""


def test_peers_dir_follows_the_environment(peers_dir: Path):
    assert peers.peers_dir() == peers_dir


@pytest.mark.parametrize("peer", ["litellm", "portkey"])
def test_a_peer_that_is_not_installed_is_skipped(peer: str, peers_dir: Path, procs: Processes, tmp_path: Path):
    with pytest.raises(peers.Skipped, match=re.escape(peers.NOT_INSTALLED)):
        peers.PEERS[peer](procs, tmp_path, 1)
    assert peers.installed_version(peer) is None
    assert not peers_dir.exists()  # starting never installs


def test_litellm_at_another_version_is_skipped(peers_dir: Path, procs: Processes, tmp_path: Path):
    fake_litellm(peers_dir, "#!/bin/sh\nexit 0\n", version="1.0.0")
    with pytest.raises(peers.Skipped, match=rf"litellm 1\.0\.0 is installed but {peers.LITELLM_VERSION} is pinned"):
        peers.start_litellm(procs, tmp_path, 1)


def test_litellm_config_is_yaml_naming_the_mock():
    config = yaml.safe_load(peers.litellm_config(4321))
    [model] = config["model_list"]
    assert model["model_name"] == peers.MOCK_MODEL
    assert model["litellm_params"] == {
        "model": f"openai/{peers.MOCK_MODEL}",
        "api_base": "http://127.0.0.1:4321/v1",
        "api_key": peers.MOCK_KEY,
    }
    assert config["general_settings"] == {"master_key": peers.LITELLM_MASTER_KEY}
    assert "database_url" not in json.dumps(config).lower()


def test_litellm_runs_offline_without_a_database(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://somewhere/db")
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "False")
    env = peers.litellm_env()
    assert "DATABASE_URL" not in env
    assert env["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"
    assert env["LITELLM_OFFLINE_MODE"] == "true"
    assert env["LITELLM_TELEMETRY_DISABLED"] == "true"


def test_litellm_that_fails_to_start_is_skipped_with_its_log(peers_dir: Path, procs: Processes, tmp_path: Path):
    fake_litellm(peers_dir, "#!/bin/sh\necho 'config: no such provider' >&2\nexit 3\n")
    with pytest.raises(peers.Skipped, match=r"(?s)exited with status 3.*config: no such provider"):
        peers.start_litellm(procs, tmp_path, 1)
    assert yaml.safe_load((tmp_path / "litellm.yaml").read_text())["model_list"]


def test_litellm_that_fails_its_first_request_is_skipped_and_stopped(
    peers_dir: Path, procs: Processes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    fake_litellm(peers_dir, BROKEN_PROXY)
    stopped = []
    stop = peers._stop
    monkeypatch.setattr(peers, "_stop", lambda child: stopped.append(child) or stop(child))
    with pytest.raises(peers.Skipped, match=r"litellm started but answered a plain chat request 500: .*no such model"):
        peers.start_litellm(procs, tmp_path, 1)
    [child] = stopped
    assert child.returncode is not None  # not left running beside the other targets until the run ends


def test_portkey_is_routed_to_the_mock_by_its_headers():
    headers = dict(peers.portkey_headers(4321))
    assert headers == {"x-portkey-provider": "openai", "x-portkey-custom-host": "http://127.0.0.1:4321/v1"}


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_portkey_target_carries_key_and_routing(peers_dir: Path, procs: Processes, tmp_path: Path):
    """A fake Portkey (a few lines of node) that answers like the mock, to see what start_portkey sends it."""
    modules = peers_dir / "portkey" / "node_modules"
    for name, version in {"@portkey-ai/gateway": peers.PORTKEY_VERSION, **peers.PORTKEY_OVERRIDES}.items():
        (modules / name).mkdir(parents=True)
        (modules / name / "package.json").write_text(json.dumps({"name": name, "version": version}))
    entry = modules / "@portkey-ai" / "gateway" / peers.PORTKEY_ENTRY
    entry.parent.mkdir(parents=True)
    entry.write_text(
        """const port = Number(process.argv.find((a) => a.startsWith("--port=")).split("=")[1]);
require("http").createServer((req, res) => {
  if (req.method === "GET") return res.end("ok");
  const h = req.headers;
  const routed = h["x-portkey-provider"] === "openai" && h["authorization"] === "Bearer sk-bench";
  if (!routed || process.env.NODE_ENV !== "production") { res.statusCode = 400; return res.end("unrouted"); }
  let body = "";
  req.on("data", (d) => (body += d)).on("end", () => {
    res.end(JSON.parse(body).stream ? "data: {}\\n\\ndata: [DONE]\\n\\n" : '{"choices": []}');
  });
}).listen(port, "127.0.0.1");
"""
    )
    target = peers.start_portkey(procs, tmp_path, 4321)
    assert target.name == "portkey" and target.model == peers.MOCK_MODEL and target.pid > 0
    assert target.url.startswith("http://127.0.0.1:") and target.url.endswith(peers.CHAT_PATH)
    assert target.headers["Authorization"] == "Bearer sk-bench"
    assert target.headers["x-portkey-custom-host"] == "http://127.0.0.1:4321/v1"


def test_portkey_without_the_pinned_node_server_is_skipped(peers_dir: Path, procs: Processes, tmp_path: Path):
    gateway = peers_dir / "portkey" / "node_modules" / "@portkey-ai" / "gateway"
    (gateway / "build").mkdir(parents=True)
    (gateway / peers.PORTKEY_ENTRY).write_text("")
    (gateway / "package.json").write_text(json.dumps({"version": peers.PORTKEY_VERSION}))
    with pytest.raises(peers.Skipped, match=r"portkey has @hono/node-server None, not 1\.14\.0"):
        peers.start_portkey(procs, tmp_path, 1)


def test_install_writes_to_the_peers_dir_only(peers_dir: Path, monkeypatch: pytest.MonkeyPatch):
    commands: list[list[str]] = []
    monkeypatch.setattr(peers, "_run_install", lambda peer, argv: commands.append(argv))
    monkeypatch.setattr(peers.shutil, "which", lambda name: f"/usr/bin/{name}")
    peers.install("litellm")
    peers.install("portkey")
    venv = peers_dir / "litellm"
    assert commands[0] == ["/usr/bin/python3", "-m", "venv", str(venv)]  # the machine's python, not .venv's
    assert commands[1][0] == str(venv / "bin" / "python")
    assert commands[1][-1] == f"litellm[proxy]=={peers.LITELLM_VERSION}"
    assert commands[2][1:4] == ["install", "--prefix", str(peers_dir / "portkey")]
    manifest = json.loads((peers_dir / "portkey" / "package.json").read_text())
    assert manifest["dependencies"] == {"@portkey-ai/gateway": peers.PORTKEY_VERSION}
    assert manifest["overrides"] == peers.PORTKEY_OVERRIDES


def test_install_knows_only_its_peers():
    with pytest.raises(BenchError, match="apt-get install nginx-light"):
        peers.install("nginx")
    with pytest.raises(BenchError, match="not 'kong'"):
        peers.install("kong")


def test_litellm_that_cannot_be_executed_is_skipped(peers_dir: Path, procs: Processes, tmp_path: Path):
    fake_litellm(peers_dir, "not a program")
    (peers_dir / "litellm" / "bin" / "litellm").chmod(0o644)
    with pytest.raises(peers.Skipped, match="litellm could not be started"):
        peers.start_litellm(procs, tmp_path, 1)
