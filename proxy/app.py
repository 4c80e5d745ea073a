"""Build the aiohttp application from a config, and run it: one process, or a supervisor and N workers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from proxy import access
from proxy.access import AccessLog
from proxy.accounting import Accountant, Writes
from proxy.auth import KeyCache
from proxy.config import ConfigError, GatewayConfig, load_config
from proxy.credit import KeyBudgets, WalletCache
from proxy.edge import Edge, EdgeSite, raise_fd_limit
from proxy.gateway import GATEWAY, Gateway
from proxy.journal import Journal, folder_for
from proxy.metrics import Metrics
from proxy.recorder import Recorder
from proxy.routing import RouteTable
from proxy.store import open_store
from proxy.store.sqlite_usage import in_memory
from proxy.surfaces import ops
from proxy.surfaces.batches import HANDLERS as BATCH_HANDLERS
from proxy.surfaces.catalogue import HANDLERS as CATALOGUE_HANDLERS
from proxy.surfaces.files import HANDLERS as FILE_HANDLERS
from proxy.surfaces.inference import inference_handler, models_handler
from proxy.surfaces.media import upload_handler
from proxy.surfaces.music import HANDLERS as MUSIC_HANDLERS
from proxy.surfaces.platform import HANDLERS as PLATFORM_HANDLERS
from proxy.surfaces.tokens import count_tokens
from proxy.surfaces.videos import HANDLERS as VIDEO_HANDLERS
from proxy.upstream import Upstream

log = logging.getLogger("proxy")


def build_app(config: GatewayConfig) -> web.Application:
    """The gateway as an aiohttp Application: routes from the config; store and clients opened on startup."""
    routes = RouteTable(config)
    gw = Gateway(config, routes, Metrics())
    middlewares = []
    if config.server.access_log:
        gw.access = AccessLog()
        middlewares.append(access.middleware(gw.access))
    app = web.Application(client_max_size=config.server.max_body_bytes + 1, middlewares=middlewares)
    app[GATEWAY] = gw
    app.cleanup_ctx.append(_resources)
    app.on_shutdown.append(_drain)

    known: dict[str, set[str]] = {}
    platform = {
        "openai.models": models_handler,
        "anthropic.count_tokens": count_tokens,
        **PLATFORM_HANDLERS,
        **CATALOGUE_HANDLERS,
        **VIDEO_HANDLERS,
        **MUSIC_HANDLERS,
        **FILE_HANDLERS,
        **BATCH_HANDLERS,
    }
    for route, surface in routes.routes:
        make = upload_handler if surface.multipart else inference_handler
        handler = platform.get(surface.name) or make(surface, route.default_model, gw.metrics)
        app.router.add_route(route.method, route.path, handler)
        known.setdefault(route.path, set()).add(route.method)
    ops_routes = [("/healthz", ops.healthz), ("/readyz", ops.readyz)]
    if config.metrics.enabled:
        ops_routes.append(("/metrics", ops.metrics))
    for path, handler in ops_routes:
        app.router.add_get(path, handler)
        known.setdefault(path, set()).add("GET")
    if config.dashboard.enabled:
        from proxy.dashboard import add_routes

        add_routes(app)
    app.router.add_route("*", r"/{tail:[\s\S]*}", ops.not_found(known))  # any path, newlines included
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    config = gw.config
    gw.store = await open_store(config.store.url, pool_min=config.store.pool_min, pool_max=config.store.pool_max)
    gw.keys = KeyCache(gw.store, config.auth.cache_ttl_s, config.auth.stale_s)
    gw.wallets = WalletCache(gw.store, config.auth.cache_ttl_s, config.auth.min_balance_nanos, config.auth.stale_s)
    gw.budgets = KeyBudgets(gw.store, config.auth.cache_ttl_s, config.auth.stale_s)
    if config.rate_limits.url:
        from proxy.shared_limits import SharedLimits

        gw.limiter.shared = gw.wallets.shared = SharedLimits(config.rate_limits, gw.limiter, gw.metrics.redis_errors)
    recorder: Recorder | None = None
    if config.accounting.enabled:
        accounting = config.accounting
        journal = Journal(folder_for(accounting.journal_dir, config.store.url))
        writes: Writes = gw.store
        if accounting.writer == "process" and not in_memory(config.store.url):
            recorder = writes = Recorder(config.store.url)
            await recorder.start()  # a child process that cannot open the store fails the start
        backlog = gw.metrics.backlog.labels("process" if recorder is not None else "thread")
        gw.accountant = Accountant(
            writes, gw.wallets, gw.budgets, journal, accounting.max_backlog, accounting.journal_fsync_s, backlog
        )
        await gw.accountant.start()  # replays what dead workers left in the journal, before serving
    gw.upstreams = {name: Upstream(name, provider) for name, provider in config.providers.items()}
    if config.telemetry.traces.enabled:
        from proxy.telemetry import Tracer

        gw.tracer = Tracer(config.telemetry.traces, gw.metrics.trace_dropped)
        await gw.tracer.open()
    try:
        yield
    finally:  # after the server has drained: every request that ran has been submitted
        if gw.accountant is not None:
            await gw.accountant.close(timeout=max(config.server.drain_timeout_s, 10.0))
        if recorder is not None:
            await recorder.close()
        for upstream in (*gw.upstreams.values(), *gw.retired):
            await upstream.close()
        if gw.limiter.shared is not None:
            await gw.limiter.shared.close()
        await gw.guardrails.close()
        await gw.cache.close()
        if gw.tracer is not None:
            await gw.tracer.close()
        await gw.store.close()
        if gw.access is not None:
            await asyncio.to_thread(gw.access.close)


async def _drain(app: web.Application) -> None:
    app[GATEWAY].draining = True


class _MalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse (a header over the limit, an unknown method, …) at ERROR with
    a traceback, before any handler runs: any client could fill the log. One INFO line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "a malformed request was refused: %s", (exc.message,)
            record.exc_info, record.exc_text = None, None
        return True


def quiet_malformed_requests() -> None:
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _MalformedRequests) for f in server_log.filters):
        server_log.addFilter(_MalformedRequests())


def warn_about(config: GatewayConfig) -> None:
    """Log what will surely fail at request time but is not a config error (e.g. a missing API key)."""
    used = {t.provider for m in config.models.values() for t in m.targets}
    for name in sorted(used):
        provider = config.providers[name]
        if not provider.api_key and not provider.base_url.startswith(("http://127.", "http://localhost")):
            log.warning("provider %r has no api_key: requests to its models will be refused upstream", name)


# ---------------------------------------------------------------------------------------------------------
# running


async def serve(
    config: GatewayConfig,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting, drain in-flight requests and close."""
    quiet_malformed_requests()
    app = build_app(config)
    log.debug(
        "config %s: %d routes, %d models, %d providers",
        config.source,
        len(config.routes),
        len(config.models),
        len(config.providers),
    )
    server = config.server
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,  # the gateway writes its own (server.access_log), with what aiohttp's cannot know
        handler_cancellation=True,  # a client that goes away cancels its request: the upstream is closed
        shutdown_timeout=server.drain_timeout_s,
        max_line_size=server.max_header_bytes,
        max_field_size=server.max_header_bytes,
        max_headers=server.max_headers,
        keepalive_timeout=server.header_timeout_s,  # armed at the connection's start and after each answer
    )
    await runner.setup()
    try:
        raise_fd_limit(server.max_connections)
        edge = Edge(runner.server, server.header_timeout_s, server.max_connections)  # type: ignore[arg-type]
        site = EdgeSite(runner, edge, host, port, reuse_port=reuse_port, backlog=2048)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        reloads: set[asyncio.Task[bool]] = set()

        def on_hup() -> None:
            task = loop.create_task(reload(app))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        # Objects alive after start-up live until exit: keep the cyclic GC from re-scanning them, and
        # let it run less often (per-request garbage is freed by reference counting).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        bound = site._server.sockets[0].getsockname()[:2] if site._server else (host, port)  # type: ignore[union-attr]
        if announce:
            announce(f"http://{_host(bound[0])}:{bound[1]}")
        await stop.wait()
        log.info("stopping: draining in-flight requests (up to %g s)", config.server.drain_timeout_s)
    finally:
        await runner.cleanup()


async def reload(app: web.Application) -> bool:
    """Re-read the config file and apply it to new requests (SIGHUP). An invalid file changes nothing."""
    gw = app[GATEWAY]
    source = gw.config.source
    try:
        config = await asyncio.to_thread(load_config, source)
        routes = RouteTable(config)
    except ConfigError as e:
        log.error("reload: keeping the running config, the new one is invalid: %s", e)
        return False
    for part in gw.apply(config, routes):
        log.warning("reload: %s changed; it takes effect at the next restart", part)
    log.info(
        "reload: config %s applied to new requests (%d models, %d providers)",
        source,
        len(config.models),
        len(config.providers),
    )
    return True


def write_pid_file(path: str) -> Callable[[], None]:
    """Write this process's id to `path` (for `stats-gateway reload`); the returned call removes it."""
    if not path:
        return lambda: None
    pid = str(os.getpid())
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="ascii") as f:
            f.write(pid + "\n")
    except OSError as e:
        log.warning("cannot write the pid file %s (`stats-gateway reload` will not find this process): %s", path, e)
        return lambda: None

    def remove() -> None:
        with contextlib.suppress(OSError):
            with open(path, encoding="ascii") as f:
                mine = f.read().strip() == pid
            if mine:
                os.unlink(path)

    return remove


def _accepting(host: str, port: int, timeout: float) -> bool:
    """Whether a worker accepts connections on the port within `timeout` seconds."""
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((target, port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.02)
    return False


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def run(config: GatewayConfig, host: str, port: int, workers: int) -> int:
    """The `serve` command: one process, or a supervisor forking `workers` processes on one port."""
    import uvloop

    warn_about(config)
    remove_pid_file = write_pid_file(config.server.pid_file)
    try:
        if workers == 1:

            def announce(url: str) -> None:
                log.info("stats-gateway listening on %s (1 worker, config %s)", url, config.source)

            uvloop.run(serve(config, host, port, announce=announce))
            return 0
        return _supervise(config, host, port, workers)
    finally:
        remove_pid_file()


def _supervise(config: GatewayConfig, host: str, port: int, workers: int) -> int:
    """Fork `workers` processes, each with its own SO_REUSEPORT socket; restart one that dies."""
    import uvloop

    from proxy.store import open_store as _open

    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not metrics_dir:
        raise RuntimeError("PROMETHEUS_MULTIPROC_DIR must be set before proxy.app is imported for workers > 1")
    for name in os.listdir(metrics_dir):  # values of a previous run are not ours
        if name.endswith(".db"):
            os.unlink(os.path.join(metrics_dir, name))

    async def migrate() -> None:  # once, before the workers race to do it
        store = await _open(config.store.url, pool_min=0, pool_max=1)  # one connection, closed before the fork
        await store.close()

    asyncio.run(migrate())
    # Reserve the port (and learn it when 0 was asked) with a bound, non-listening SO_REUSEPORT socket.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reserve = socket.socket(family, socket.SOCK_STREAM)
    reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserve.bind((host, port))
    port = reserve.getsockname()[1]

    def spawn() -> int:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                reserve.close()
                uvloop.run(serve(config, host, port, reuse_port=True))
            except BaseException:
                log.exception("worker %d failed", os.getpid())
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        return pid

    from prometheus_client import multiprocess

    children: dict[int, float] = {}
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def on_hup(signum: int, _frame: object) -> None:
        # Each worker reloads itself; the supervisor keeps the new config for workers it starts later.
        nonlocal config
        try:
            config = load_config(config.source)
            RouteTable(config)
        except ConfigError as e:
            log.error("reload: keeping the running config, the new one is invalid: %s", e)
            return
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    for _ in range(workers):
        children[spawn()] = time.monotonic()
    if not _accepting(host, port, timeout=30):
        log.error("no worker is accepting connections on port %d after 30 s", port)
    log.info(
        "stats-gateway listening on http://%s:%d (%d workers, config %s)", _host(host), port, workers, config.source
    )
    quick_deaths = 0
    exit_code = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        started = children.pop(pid, None)
        if started is None:
            continue
        multiprocess.mark_process_dead(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            exit_code = exit_code or (code if code > 0 else 0)
            continue
        quick_deaths = quick_deaths + 1 if time.monotonic() - started < 5 else 0
        if quick_deaths >= 5:
            log.error("workers keep dying at start (last exit %s): stopping", code)
            on_signal(signal.SIGTERM, None)
            exit_code = 1
            continue
        log.error("worker %d exited (%s): starting another", pid, code)
        time.sleep(min(0.2 * quick_deaths, 2.0))
        children[spawn()] = time.monotonic()
    reserve.close()
    log.info("stopped")
    sys.stdout.flush()
    return exit_code
