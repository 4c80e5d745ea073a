"""The gateway's calls to a provider over HTTPS, end to end: a mock upstream behind TLS with its own CA (SNI and the
host name checked), behind an HTTPS_PROXY that tunnels with CONNECT, and one that requires a client certificate."""

from __future__ import annotations

import ssl
from pathlib import Path

import orjson
import pytest
import trustme

from proxy.app import build_app
from proxy.config import TlsConfig, load_config
from tests.conftest import DEFAULT_CONFIG, auth, env_for
from tests.mock_proxy import MockProxy
from tests.mock_upstream import MockControl, build_mock

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


class Pki:
    def __init__(self, folder: Path):
        self.ca = trustme.CA()
        self.ca_file = str(folder / "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        client = self.ca.issue_cert("gateway-client.example", common_name="gateway-client")
        self.cert_file, self.key_file = str(folder / "client.pem"), str(folder / "client.key")
        client.cert_chain_pems[0].write_to_path(self.cert_file)
        client.private_key_pem.write_to_path(self.key_file)

    def server(self, client_certificate: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
        if client_certificate:
            self.ca.configure_trust(ctx)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


async def _https_mock(aiohttp_server, pki: Pki, client_certificate: bool = False) -> tuple[str, MockControl]:
    control = MockControl()
    server = await aiohttp_server(build_mock(control), host="127.0.0.1", ssl=pki.server(client_certificate))
    return f"https://localhost:{server.port}/v1", control  # by name: SNI and the host-name check


async def _gateway(aiohttp_client, store_url: str, base_url: str, control: MockControl, **tls: str):
    env = env_for(type("M", (), {"url": base_url, "control": control})(), store_url)  # type: ignore[arg-type]
    config = load_config(DEFAULT_CONFIG, env=env)
    config.providers["openai"].tls = TlsConfig(**tls)
    config.models["openai/gpt-4o-mini"].retries = 0
    return await aiohttp_client(build_app(config))


async def test_https_provider_verified_with_its_ca_file(aiohttp_client, aiohttp_server, store_url, make_key, pki):
    url, control = await _https_mock(aiohttp_server, pki)
    client = await _gateway(aiohttp_client, store_url, url, control, ca_file=pki.ca_file)
    key = await make_key()
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert r.status == 200, await r.text()
    assert (await r.json())["choices"][0]["message"]["content"]
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(key))
    body = await r.read()
    assert r.status == 200 and body.endswith(b"data: [DONE]\n\n")
    assert len(control.received) == 2
    assert control.received[0].headers["Authorization"] == "Bearer sk-upstream-secret"


async def test_https_provider_with_an_unknown_ca_is_refused_clearly(
    aiohttp_client, aiohttp_server, store_url, make_key, pki
):
    url, control = await _https_mock(aiohttp_server, pki)
    client = await _gateway(aiohttp_client, store_url, url, control)  # the system store: our CA is not in it
    key = await make_key()
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert r.status == 502
    error = (await r.json())["error"]
    assert error["code"] == "upstream_unreachable" and "CERTIFICATE_VERIFY_FAILED" in error["message"]
    assert "sk-upstream-secret" not in error["message"] and control.received == []


async def test_https_provider_through_a_connect_proxy_from_the_environment(
    aiohttp_client, aiohttp_server, store_url, make_key, pki, monkeypatch
):
    url, control = await _https_mock(aiohttp_server, pki)
    async with MockProxy(credentials="gw:s3cret") as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://gw:s3cret@127.0.0.1:{proxy.port}")
        client = await _gateway(aiohttp_client, store_url, url, control, ca_file=pki.ca_file)
        key = await make_key()
        for stream in (False, True):
            r = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream}, headers=auth(key))
            assert r.status == 200, await r.text()
            await r.read()
        port = url.split(":")[2].split("/")[0]
        assert [(h.method, h.target) for h in proxy.seen] == [("CONNECT", f"localhost:{port}")]  # one, kept alive
        assert proxy.seen[0].headers["proxy-authorization"].startswith("Basic ")
    assert len(control.received) == 2


async def test_a_proxy_that_refuses_is_a_502_without_its_password(
    aiohttp_client, aiohttp_server, store_url, make_key, pki, monkeypatch
):
    url, control = await _https_mock(aiohttp_server, pki)
    async with MockProxy(credentials="gw:right") as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"http://gw:Xq7pw0rd@127.0.0.1:{proxy.port}")
        client = await _gateway(aiohttp_client, store_url, url, control, ca_file=pki.ca_file)
        key = await make_key()
        r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
        error = orjson.loads(await r.read())["error"]
    assert r.status == 502 and "407" in error["message"] and "via proxy" in error["message"]
    assert "Xq7pw0rd" not in error["message"]


async def test_mtls_provider_gets_the_client_certificate(aiohttp_client, aiohttp_server, store_url, make_key, pki):
    url, control = await _https_mock(aiohttp_server, pki, client_certificate=True)
    client = await _gateway(
        aiohttp_client, store_url, url, control, ca_file=pki.ca_file, cert_file=pki.cert_file, key_file=pki.key_file
    )
    key = await make_key()
    r = await client.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert r.status == 200, await r.text()

    without = await _gateway(aiohttp_client, store_url, url, control, ca_file=pki.ca_file)
    r = await without.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert r.status == 502  # refused during or right after the handshake
    assert len(control.received) == 1
