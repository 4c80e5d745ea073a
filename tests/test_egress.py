"""proxy.egress: TLS with a provider's own CA and client certificate, HTTP proxies (CONNECT tunnels, absolute-form),
the environment's HTTPS_PROXY/HTTP_PROXY/NO_PROXY, and their config errors. Everything on 127.0.0.1, with
certificates made by `trustme`; each connection test runs on the asyncio loop and on uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import textwrap
import time
import warnings
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import uvloop

from proxy.config import ConfigError, ProviderConfig, TlsConfig, load_config
from proxy.egress import Egress, ProxyRefused, parse_proxy
from tests.mock_proxy import MockProxy, Origin

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "no_proxy")

Run = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Run:
    """Run a coroutine to its end on a fresh loop of each kind, within 10 s."""

    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            return runner.run(asyncio.wait_for(coro, 10))

    return run


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests see only the proxy variables they set."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    yield


@dataclass
class Pki:
    ca_file: str
    server: ssl.SSLContext  # certified for 127.0.0.1 and localhost by the CA
    wrong_name: ssl.SSLContext  # certified for other.example only
    mtls_server: ssl.SSLContext  # like `server`, and requires a client certificate from the CA
    cert_file: str  # the client's certificate (CN gateway-client)
    key_file: str
    cert_and_key_file: str


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    def server_context(*names: str, client_ca: trustme.CA | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.set_alpn_protocols(["http/1.1"])
        ca.issue_cert(*names).configure_cert(ctx)
        if client_ca is not None:
            client_ca.configure_trust(ctx)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    client = ca.issue_cert("gateway-client.example", common_name="gateway-client")
    cert_file, key_file, both = tmp_path / "client.pem", tmp_path / "client.key", tmp_path / "client-both.pem"
    client.cert_chain_pems[0].write_to_path(str(cert_file))
    client.private_key_pem.write_to_path(str(key_file))
    client.private_key_and_cert_chain_pem.write_to_path(str(both))
    return Pki(
        ca_file=str(ca_file),
        server=server_context("127.0.0.1", "localhost"),
        wrong_name=server_context("other.example"),
        mtls_server=server_context("127.0.0.1", "localhost", client_ca=ca),
        cert_file=str(cert_file),
        key_file=str(key_file),
        cert_and_key_file=str(both),
    )


def provider(base_url: str, proxy: str = "", **tls: str) -> ProviderConfig:
    return ProviderConfig(kind="openai", base_url=base_url, proxy=proxy, tls=TlsConfig(**tls))


class Reader(asyncio.Protocol):
    """Collects a whole answer (the origin closes after it)."""

    def __init__(self) -> None:
        self.made: list[asyncio.BaseTransport] = []
        self.data = bytearray()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.append(transport)

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self.closed.set_result(None)
        else:
            self.closed.set_exception(exc)


async def fetch(egress: Egress, path: str = "/v1/models", timeout: float = 5.0) -> tuple[int, str]:
    """GET `path` over one `egress.connect()` connection: the status and body."""
    transport, reader = await egress.connect(Reader, timeout)
    try:
        assert reader.made == [transport]  # connection_made called once, with the transport returned
        headers = {"Host": egress.authority, "Connection": "close", **egress.extra_headers}
        head = f"GET {egress.target_prefix}{path} HTTP/1.1\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        transport.write((head + "\r\n").encode())
        await asyncio.wait_for(reader.closed, timeout)
    finally:
        transport.close()
    head_bytes, _, body = bytes(reader.data).partition(b"\r\n\r\n")
    return int(head_bytes.split()[1]), body.decode()


async def fetch_aiohttp(egress: Egress, url: str) -> tuple[int, str]:
    """GET `url` with an aiohttp session made from `egress.aiohttp_options()`."""
    connector_options, session_options = egress.aiohttp_options()
    connector = aiohttp.TCPConnector(**connector_options)
    with warnings.catch_warnings():  # aiohttp >= 3.14: "The 'proxy_auth' parameter is deprecated"
        warnings.simplefilter("ignore", DeprecationWarning)
        session = aiohttp.ClientSession(connector=connector, **session_options)
    async with session, session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
        return resp.status, await resp.text()


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------
# TLS


def test_tls_verified_with_the_providers_ca_file(run: Run, pki: Pki) -> None:
    async def main() -> None:
        async with Origin(pki.server) as origin:
            egress = Egress(origin.url + "/v1", provider(origin.url, ca_file=pki.ca_file))
            assert (egress.host, egress.port, egress.tls, egress.via) == ("127.0.0.1", origin.port, True, "")
            assert (egress.target_prefix, egress.extra_headers) == ("", {})
            assert await fetch(egress) == (200, "GET /v1/models|-|http/1.1")  # ALPN offered http/1.1
            assert await fetch_aiohttp(egress, origin.url + "/v1/models") == (200, "GET /v1/models|-|http/1.1")

    run(main())


def test_tls_refused_without_the_ca_file(run: Run, pki: Pki) -> None:
    async def main() -> None:
        async with Origin(pki.server) as origin:
            egress = Egress(origin.url, provider(origin.url))  # the system store does not know this CA
            with pytest.raises(ssl.SSLCertVerificationError) as info:
                await fetch(egress)
            message = str(info.value)
            assert "certificate verify failed" in message, message
            assert f"server 127.0.0.1:{origin.port}" in message and "trusting the system CA store" in message
            assert info.value.verify_code is not None
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await fetch_aiohttp(egress, origin.url + "/v1/models")

    run(main())


def test_tls_through_a_tunnel_is_verified_too(run: Run, pki: Pki) -> None:
    async def main() -> None:
        async with Origin(pki.server) as origin, MockProxy() as proxy:
            egress = Egress(origin.url, provider(origin.url, proxy=proxy.url))
            with pytest.raises(ssl.SSLCertVerificationError) as info:
                await fetch(egress)
            message = str(info.value)
            assert "certificate verify failed" in message, message
            assert f"server 127.0.0.1:{origin.port} via proxy {proxy.url}; trusting the system CA store" in message
            assert [h.method for h in proxy.seen] == ["CONNECT"]

    run(main())


def test_tls_refused_when_the_certificate_names_another_host(run: Run, pki: Pki) -> None:
    async def main() -> None:
        async with Origin(pki.wrong_name) as origin:
            egress = Egress(origin.url, provider(origin.url, ca_file=pki.ca_file))
            with pytest.raises(ssl.SSLCertVerificationError) as info:
                await fetch(egress)
            assert "mismatch" in str(info.value) and "127.0.0.1" in str(info.value), str(info.value)
            assert f"trusting only the CAs in {pki.ca_file}" in str(info.value)

    run(main())


def test_tls_checks_a_host_name_too(run: Run, pki: Pki) -> None:
    async def main() -> None:
        async with Origin(pki.server, host="localhost") as origin:
            egress = Egress(origin.url, provider(origin.url, ca_file=pki.ca_file))
            assert egress.authority == f"localhost:{origin.port}"
            assert await fetch(egress) == (200, "GET /v1/models|-|http/1.1")

    run(main())


@pytest.mark.parametrize("key_apart", [True, False], ids=["key_file", "key_in_cert_file"])
def test_mtls_presents_the_client_certificate(run: Run, pki: Pki, key_apart: bool) -> None:
    tls = {"cert_file": pki.cert_file, "key_file": pki.key_file} if key_apart else {"cert_file": pki.cert_and_key_file}

    async def main() -> None:
        async with Origin(pki.mtls_server) as origin:
            egress = Egress(origin.url, provider(origin.url, ca_file=pki.ca_file, **tls))
            assert await fetch(egress) == (200, "GET /v1/models|gateway-client|http/1.1")
            assert await fetch_aiohttp(egress, origin.url + "/x") == (200, "GET /x|gateway-client|http/1.1")

    run(main())


def test_mtls_refused_without_a_client_certificate(run: Run, pki: Pki) -> None:
    async def main() -> None:
        async with Origin(pki.mtls_server) as origin:
            egress = Egress(origin.url, provider(origin.url, ca_file=pki.ca_file))
            # TLS 1.3: the client's handshake ends before the server checks the client; the server then hangs up.
            transport, reader = await egress.connect(Reader, 5)
            transport.write(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            with contextlib.suppress(OSError):  # an alert (SSLError), a reset, or a bare close: all refusals
                await reader.closed
            transport.close()
            assert reader.data == b""  # no answer

    run(main())


# ---------------------------------------------------------------------------------------------------------
# proxies


def test_https_proxy_from_the_environment_tunnels_with_credentials(
    run: Run, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with Origin(pki.server) as origin, MockProxy(credentials="alice:p@ss word") as proxy:
            monkeypatch.setenv("HTTPS_PROXY", f"http://alice:p%40ss%20word@127.0.0.1:{proxy.port}")
            egress = Egress(origin.url, provider(origin.url, ca_file=pki.ca_file))
            assert egress.via == f" via proxy {proxy.url}"
            assert (egress.target_prefix, egress.extra_headers) == ("", {})  # the tunnel carries origin-form
            assert await fetch(egress) == (200, "GET /v1/models|-|http/1.1")
            [connect] = proxy.seen
            assert (connect.method, connect.target) == ("CONNECT", f"127.0.0.1:{origin.port}")
            assert connect.headers["host"] == f"127.0.0.1:{origin.port}"
            assert connect.headers["proxy-authorization"] == "Basic YWxpY2U6cEBzcyB3b3Jk"  # alice:p@ss word

            assert await fetch_aiohttp(egress, origin.url + "/x") == (200, "GET /x|-|http/1.1")
            assert [(h.method, h.headers["proxy-authorization"]) for h in proxy.seen[1:]] == [
                ("CONNECT", "Basic YWxpY2U6cEBzcyB3b3Jk")
            ]

    run(main())


def test_lower_case_variables_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://upper:3128")
    monkeypatch.setenv("https_proxy", "http://lower:3128")
    assert Egress("https://api.example", provider("https://api.example")).via == " via proxy http://lower:3128"
    monkeypatch.setenv("https_proxy", "")  # set but empty: no proxy, as urllib decides
    assert Egress("https://api.example", provider("https://api.example")).via == ""


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "localhost,127.0.0.1", "*", ".0.0.1"])
def test_no_proxy_bypasses_the_proxy(run: Run, pki: Pki, monkeypatch: pytest.MonkeyPatch, no_proxy: str) -> None:
    async def main() -> None:
        async with Origin(pki.server) as origin, MockProxy() as proxy:
            monkeypatch.setenv("HTTPS_PROXY", proxy.url)
            monkeypatch.setenv("NO_PROXY", no_proxy)
            egress = Egress(origin.url, provider(origin.url, ca_file=pki.ca_file))
            assert egress.via == ""
            assert await fetch(egress) == (200, "GET /v1/models|-|http/1.1")
            assert await fetch_aiohttp(egress, origin.url + "/x") == (200, "GET /x|-|http/1.1")
            assert proxy.seen == []

    run(main())


def test_no_proxy_for_other_hosts_keeps_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,.internal.corp")
    assert Egress("https://api.openai.com/v1", provider("https://x")).via == " via proxy http://proxy.corp:3128"
    assert Egress("https://llm.internal.corp/v1", provider("https://x")).via == ""


def test_the_providers_proxy_overrides_the_environment(run: Run, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with Origin(pki.server) as origin, MockProxy() as proxy:
            monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{closed_port()}")
            monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # an explicit proxy is used whatever NO_PROXY says
            egress = Egress(origin.url, provider(origin.url, proxy=proxy.url, ca_file=pki.ca_file))
            assert await fetch(egress) == (200, "GET /v1/models|-|http/1.1")
            assert [(h.method, h.target, "proxy-authorization" in h.headers) for h in proxy.seen] == [
                ("CONNECT", f"127.0.0.1:{origin.port}", False)
            ]

    run(main())


def test_proxy_direct_ignores_the_environment(run: Run, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with Origin(pki.server) as origin, MockProxy() as proxy:
            monkeypatch.setenv("HTTPS_PROXY", proxy.url)
            egress = Egress(origin.url, provider(origin.url, proxy="direct", ca_file=pki.ca_file))
            assert egress.via == "" and egress.aiohttp_options()[1] == {}
            assert await fetch(egress) == (200, "GET /v1/models|-|http/1.1")
            assert proxy.seen == []

    run(main())


def test_http_origin_through_http_proxy_in_absolute_form(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with Origin() as origin, MockProxy(credentials="bob:secret") as proxy:
            monkeypatch.setenv("HTTP_PROXY", f"http://bob:secret@127.0.0.1:{proxy.port}")
            monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{closed_port()}")  # not for http origins
            egress = Egress(origin.url + "/v1", provider(origin.url))
            assert egress.ssl is None
            assert egress.target_prefix == f"http://127.0.0.1:{origin.port}"
            assert egress.extra_headers == {"Proxy-Authorization": "Basic Ym9iOnNlY3JldA=="}
            assert await fetch(egress, "/v1/models?x=1") == (200, "GET /v1/models?x=1|-|-")
            [head] = proxy.seen
            assert (head.method, head.target) == ("GET", f"http://127.0.0.1:{origin.port}/v1/models?x=1")
            assert head.headers["proxy-authorization"] == "Basic Ym9iOnNlY3JldA=="

            assert await fetch_aiohttp(egress, origin.url + "/x") == (200, "GET /x|-|-")
            assert proxy.seen[1].target == f"http://127.0.0.1:{origin.port}/x"
            assert proxy.seen[1].headers["proxy-authorization"] == "Basic Ym9iOnNlY3JldA=="

    run(main())


def test_proxy_refusing_connect_raises_proxy_refused_without_the_password(run: Run, pki: Pki) -> None:
    async def main() -> None:
        async with Origin(pki.server) as origin, MockProxy(credentials="alice:right") as proxy:
            url = f"http://alice:hunter2@127.0.0.1:{proxy.port}"
            egress = Egress(origin.url, provider(origin.url, proxy=url, ca_file=pki.ca_file))
            with pytest.raises(ProxyRefused) as info:
                await fetch(egress)
            message = str(info.value)
            assert message == (
                f"proxy {proxy.url} refused CONNECT 127.0.0.1:{origin.port}: "
                "HTTP/1.1 407 Proxy Authentication Required (wrong proxy credentials?)"
            )
            assert "hunter2" not in message and "hunter2" not in egress.via
            anonymous = Egress(origin.url, provider(origin.url, proxy=proxy.url, ca_file=pki.ca_file))
            with pytest.raises(ProxyRefused, match=r"407 .* \(it wants credentials: user:password@\)"):
                await fetch(anonymous)

    run(main())


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"", "closed the connection before answering CONNECT"),
        (
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n",
            "refused CONNECT 127.0.0.1:1: HTTP/1.1 502 Bad Gateway",
        ),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "did not answer CONNECT in HTTP: 'SSH-2.0-OpenSSH_9.6'"),
        (b"HTTP/1.1 200 OK\r\n\r\nhello", "sent data after its answer to CONNECT"),
    ],
    ids=["hang-up", "502", "not-http", "extra-bytes"],
)
def test_proxy_answering_connect_badly_raises_proxy_refused(run: Run, answer: bytes, expected: str) -> None:
    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if answer:
            writer.write(answer)
            await reader.read()  # until the client closes
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(answer_once, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            egress = Egress("https://127.0.0.1:1", provider("https://x", proxy=f"http://u:pw@127.0.0.1:{port}"))
            with pytest.raises(ProxyRefused) as info:
                await fetch(egress)
            assert str(info.value) == f"proxy http://127.0.0.1:{port} {expected}"
        finally:
            server.close()
            await server.wait_closed()

    run(main())


@pytest.mark.parametrize("origin_scheme", ["https", "http"])
def test_proxy_unreachable_raises_oserror(run: Run, origin_scheme: str) -> None:
    async def main() -> None:
        url = f"{origin_scheme}://127.0.0.1:1"
        egress = Egress(url, provider(url, proxy=f"http://u:pw@127.0.0.1:{closed_port()}"))
        with pytest.raises(OSError) as info:
            await fetch(egress)
        assert isinstance(info.value, ConnectionRefusedError), repr(info.value)
        assert not isinstance(info.value, ProxyRefused)

    run(main())


@pytest.mark.parametrize("where", ["proxy", "origin behind the proxy", "origin"])
def test_silence_raises_timeout_within_the_timeout(run: Run, pki: Pki, where: str) -> None:
    async def main() -> None:
        async with MockProxy(silent=True) as silent, MockProxy() as proxy:
            if where == "proxy":  # TCP connects, CONNECT is never answered
                origin, via = "https://127.0.0.1:1", silent.url
            elif where == "origin behind the proxy":  # the tunnel opens, the TLS handshake is never answered
                origin, via = f"https://127.0.0.1:{silent.port}", proxy.url
            else:
                origin, via = f"https://127.0.0.1:{silent.port}", "direct"
            egress = Egress(origin, provider(origin, proxy=via, ca_file=pki.ca_file))
            started = time.monotonic()
            with pytest.raises(TimeoutError) as info:
                await egress.connect(Reader, 0.3)
            assert 0.25 < time.monotonic() - started < 2.0
            port = origin.rsplit(":", 1)[1]
            assert str(info.value) == f"no TLS connection to 127.0.0.1:{port}{egress.via} within 0.3 s"

    run(main())


def test_https_proxy_urls_are_refused() -> None:
    with pytest.raises(ValueError, match="https:// proxies are not supported"):
        parse_proxy("https://proxy.corp:3128")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://proxy.corp:3128", ("proxy.corp", 3128, "http://proxy.corp:3128", "", "")),
        ("http://proxy.corp", ("proxy.corp", 80, "http://proxy.corp:80", "", "")),
        ("proxy.corp:8080", ("proxy.corp", 8080, "http://proxy.corp:8080", "", "")),  # no scheme: http, as curl
        ("http://u%3Ax:p%40ss@10.0.0.1:3128/", ("10.0.0.1", 3128, "http://10.0.0.1:3128", "u:x", "p@ss")),
        ("http://[::1]:3128", ("::1", 3128, "http://[::1]:3128", "", "")),
    ],
)
def test_parse_proxy(url: str, expected: tuple[str, int, str, str, str]) -> None:
    assert tuple(parse_proxy(url)) == expected


# ---------------------------------------------------------------------------------------------------------
# config errors


def write_config(tmp_path: Path, provider_yaml: str) -> Path:
    path = tmp_path / "gateway.yaml"
    body = textwrap.indent(textwrap.dedent(provider_yaml).strip(), "    ")
    path.write_text(
        "providers:\n  internal:\n    kind: openai\n    base_url: https://llm.internal.corp/v1\n"
        f"{body}\nmodels: {{}}\nroutes: []\n",
        encoding="utf-8",
    )
    return path


def config_error(tmp_path: Path, provider_yaml: str, env: dict[str, str] | None = None) -> ConfigError:
    path = write_config(tmp_path, provider_yaml)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    assert info.value.file == str(path)
    return info.value


def test_config_accepts_tls_files_relative_to_its_folder(tmp_path: Path, pki: Pki) -> None:
    tls = "tls: {ca_file: ca.pem, cert_file: client.pem, key_file: client.key}"
    path = write_config(tmp_path, f"proxy: http://u:pw@proxy.corp:3128\n{tls}")
    internal = load_config(path, env={}).providers["internal"]
    assert internal.tls == TlsConfig(ca_file=pki.ca_file, cert_file=pki.cert_file, key_file=pki.key_file)
    assert Egress(internal.base_url, internal).via == " via proxy http://proxy.corp:3128"


@pytest.mark.parametrize(
    ("tls", "path", "fragments"),
    [
        ("{ca_file: nowhere.pem}", "tls.ca_file", ["expected a PEM file, but", "nowhere.pem does not exist"]),
        ("{ca_file: client.key}", "tls.ca_file", ["expected PEM CA certificates in", "none found"]),
        ("{ca_file: garbage.pem}", "tls.ca_file", ["expected PEM CA certificates in", "cannot be parsed"]),
        ("{ca_file: .}", "tls.ca_file", ["is not a file"]),
        ("{cert_file: garbage.pem}", "tls.cert_file", ["expected a PEM client certificate in", "garbage.pem"]),
        ("{cert_file: client.pem}", "tls.cert_file", ["expected a PEM private key in", "or name its file in key_file"]),
        ("{cert_file: client.pem, key_file: nokey.pem}", "tls.key_file", ["nokey.pem does not exist"]),
        ("{cert_file: client.pem, key_file: client.pem}", "tls.key_file", ["expected a PEM private key in"]),
        ("{cert_file: client.pem, key_file: badkey.pem}", "tls.key_file", ["badkey.pem: it cannot be parsed"]),
        ("{cert_file: client.pem, key_file: other.key}", "tls.key_file", ["other.key does not match the certificate"]),
        ("{cert_file: client.pem, key_file: locked.key}", "tls.key_file", ["is encrypted"]),
        ("{key_file: client.key}", "tls.key_file", ["a key_file needs a cert_file"]),
    ],
)
def test_config_tls_errors_name_the_file_and_path(
    tmp_path: Path, pki: Pki, tls: str, path: str, fragments: list[str]
) -> None:
    (tmp_path / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnonsense\n-----END CERTIFICATE-----\n")
    (tmp_path / "badkey.pem").write_text("-----BEGIN PRIVATE KEY-----\nnonsense\n-----END PRIVATE KEY-----\n")
    trustme.CA().issue_cert("x").private_key_pem.write_to_path(str(tmp_path / "other.key"))
    (tmp_path / "locked.key").write_text(
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nx\n-----END ENCRYPTED PRIVATE KEY-----\n"
    )
    err = config_error(tmp_path, f"tls: {tls}")
    assert err.path == f"$.providers.internal.{path}", str(err)
    assert err.line == 5
    for fragment in fragments:
        assert fragment in err.message, err.message


@pytest.mark.parametrize(
    ("proxy", "fragments"),
    [
        ("ftp://proxy.corp:21", ["expected http://[user:password@]host:port, got 'ftp://proxy.corp:21'"]),
        ("http://u:hunter2@proxy.corp:99999", ["got 'http://u:***@proxy.corp:99999'", "port is not a number"]),
        ("http://proxy.corp:3128/some/path", ["expected http://[user:password@]host:port"]),
        ("https://proxy.corp:3128", ["https:// proxies are not supported"]),
        ("http://", ["expected http://[user:password@]host:port"]),
    ],
)
def test_config_proxy_errors_name_the_path(tmp_path: Path, proxy: str, fragments: list[str]) -> None:
    err = config_error(tmp_path, f"proxy: '{proxy}'")
    assert err.path == "$.providers.internal.proxy" and err.line == 5, str(err)
    for fragment in fragments:
        assert fragment in err.message, err.message
    assert "hunter2" not in str(err)


def test_config_checks_the_environments_proxy(tmp_path: Path) -> None:
    err = config_error(tmp_path, "headers: {}", env={"https_proxy": "socks5://u:hunter2@proxy.corp:1080"})
    assert err.path == "$.providers.internal.proxy"
    assert err.message.startswith("https_proxy in the environment: expected http://[user:password@]host:port")
    assert "hunter2" not in str(err)
    # Not this provider's business when NO_PROXY exempts it, or when it says `direct`.
    env = {"HTTPS_PROXY": "socks5://proxy.corp:1080", "NO_PROXY": ".internal.corp"}
    assert load_config(write_config(tmp_path, "headers: {}"), env=env).providers["internal"].proxy == ""
    load_config(write_config(tmp_path, "proxy: direct"), env={"HTTPS_PROXY": "socks5://proxy.corp:1080"})
