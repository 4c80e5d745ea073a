"""The command line: `stats-gateway` and `python -m proxy`.

serve (default)   run the gateway
reload            validate the config, then have the running gateway apply it (SIGHUP)
check-config      validate the config and print a summary (--online: ask each provider for its models)
keys              create, list and revoke API keys
credits           add credit to a team's wallet, or show it
migrate           create or upgrade the store's schema, print its version
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.config import ConfigError, GatewayConfig, load_config

DEFAULT_CONFIG = "config/gateway.yaml"
COMMANDS = ("serve", "reload", "check-config", "keys", "credits", "admin-token", "migrate")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _usd(text: str) -> int:
    from proxy.credit import parse_usd

    try:
        return parse_usd(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number such as 60, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 (no limit) or more, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stats-gateway", description="A lean, self-hosted AI gateway.")
    log_help = "DEBUG, INFO, WARNING or ERROR (default: $GATEWAY_LOG_LEVEL or INFO)"
    parser.add_argument("--log-level", default=os.environ.get("GATEWAY_LOG_LEVEL", "INFO"), help=log_help)
    sub = parser.add_subparsers(dest="command")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        # Also after the command (`serve --log-level DEBUG`); SUPPRESS keeps the top level's value otherwise.
        p.add_argument("--log-level", default=argparse.SUPPRESS, help=log_help)
        p.add_argument(
            "--config",
            default=os.environ.get("GATEWAY_CONFIG", DEFAULT_CONFIG),
            help=f"the gateway's YAML config (default: $GATEWAY_CONFIG or {DEFAULT_CONFIG})",
        )
        return p

    serve = with_config(sub.add_parser("serve", help="run the gateway (the default command)"))
    serve.add_argument("--host", help="address to listen on (default: server.host)")
    serve.add_argument("--port", type=int, help="port to listen on (default: server.port)")
    serve.add_argument("--workers", type=int, help="worker processes (default: server.workers)")

    checking = with_config(sub.add_parser("check-config", help="validate the config and print a summary"))
    checking.add_argument(
        "--online",
        action="store_true",
        help="also ask each provider (with its key) for its model list: key accepted, routed models it no longer "
        "lists, latency; exits 1 on a problem",
    )
    reload = with_config(
        sub.add_parser("reload", help="validate the config, then signal the running gateway to apply it (SIGHUP)")
    )
    reload.add_argument("--pid", type=int, help="the gateway's process id (default: read from server.pid_file)")

    with_config(sub.add_parser("migrate", help="create or upgrade the store's schema (serve does it too)"))

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    create = with_config(keys.add_parser("create", help="create a key (and its team if new); prints the key last"))
    create.add_argument("--team", required=True)
    create.add_argument("--name", default="", help="a label for the key")
    create.add_argument("--management", action="store_true", help="may call the management APIs")
    create.add_argument("--credit", type=_usd, metavar="USD", help="add this much credit to the team's wallet")
    create.add_argument("--models", default="", help="comma-separated model ids this key may use (default: all)")
    create.add_argument("--daily-limit", type=_usd, metavar="USD", help="most this key may spend per UTC day")
    create.add_argument("--monthly-limit", type=_usd, metavar="USD", help="most this key may spend per UTC month")
    create.add_argument("--rpm", type=_count, help="requests a minute this key may make (0: none; default: config)")
    create.add_argument("--tpm", type=_count, help="tokens a minute this key may use (0: none; default: config)")
    create.add_argument(
        "--concurrency", type=_count, help="requests this key may have in flight (0: none; default: config)"
    )
    create.add_argument(
        "--guardrails", default="", help="comma-separated guardrail policies (of guardrails.policies) for this key"
    )
    create.add_argument(
        "--cache", choices=("on", "off"), help="the response cache for this key's requests (default: config)"
    )
    listing = with_config(keys.add_parser("list", help="list keys (never their secrets)"))
    listing.add_argument("--team")
    revoke = with_config(keys.add_parser("revoke", help="revoke a key by its id"))
    revoke.add_argument("kid")

    credits = sub.add_parser("credits", help="team wallets").add_subparsers(dest="action", required=True)
    add = with_config(credits.add_parser("add", help="add credit to a team's wallet"))
    add.add_argument("--team", required=True)
    add.add_argument("--usd", "--amount", dest="usd", type=_usd, required=True, metavar="USD")
    show = with_config(credits.add_parser("show", help="show a team's balance"))
    show.add_argument("--team", required=True)

    tokens = sub.add_parser("admin-token", help="the dashboard's operator tokens").add_subparsers(
        dest="action", required=True
    )
    made = with_config(tokens.add_parser("create", help="create an operator token (every team); prints it last"))
    made.add_argument("--name", default="operator", help="who or what it is for")
    with_config(tokens.add_parser("list", help="list operator tokens (never their secrets)"))
    dropped = with_config(tokens.add_parser("revoke", help="revoke an operator token by its id"))
    dropped.add_argument("id")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    named = any(arg in COMMANDS for arg in argv if not arg.startswith("-"))
    if not named and not any(a in ("-h", "--help") for a in argv[:1]):
        argv.insert(0, "serve")  # `serve` is the default command (its options may come first)
    args = _parser().parse_args(argv)
    level = args.log_level.upper()
    if level not in LOG_LEVELS:
        choices = ", ".join(LOG_LEVELS)
        print(f"unknown log level {args.log_level!r} (--log-level, $GATEWAY_LOG_LEVEL): use {choices}", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        config = load_config(args.config)
        if args.command == "serve":
            return _serve(config, args)
        if args.command == "check-config":
            return _check(config, args.online)
        if args.command == "reload":
            return _reload(config, args.pid)
        if args.command == "migrate":
            return asyncio.run(_migrate(config))
        return asyncio.run(_admin(config, args))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _serve(config: GatewayConfig, args: argparse.Namespace) -> int:
    host = args.host or config.server.host
    port = config.server.port if args.port is None else args.port
    workers = args.workers or config.server.workers
    if workers < 1:
        print("--workers must be at least 1", file=sys.stderr)
        return 2
    own_dir = None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # prometheus-client picks its multiprocess mode from this variable when first imported.
        own_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="stats-gateway-metrics-")
    from proxy.app import run  # after the variable is set
    from proxy.routing import RouteTable

    RouteTable(config)  # route-table errors are config errors: report them before binding anything
    try:
        return run(config, host, port, workers)
    except OSError as e:
        print(f"cannot serve on {host}:{port}: {e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)


def _reload(config: GatewayConfig, pid: int | None) -> int:
    """The config is valid (it loaded): check its routes too, then SIGHUP the running gateway."""
    import signal

    from proxy.routing import RouteTable

    RouteTable(config)
    if pid is None:
        path = config.server.pid_file
        if not path:
            print("server.pid_file is empty: pass --pid", file=sys.stderr)
            return 2
        try:
            with open(path, encoding="ascii") as f:
                pid = int(f.read().strip())
        except (OSError, ValueError) as e:
            print(f"cannot read the gateway's pid from {path} ({e}): is it running? pass --pid", file=sys.stderr)
            return 1
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"no process {pid} (a stale pid file?)", file=sys.stderr)
        return 1
    except PermissionError:
        print(f"not allowed to signal process {pid}: run as the gateway's user", file=sys.stderr)
        return 1
    print(f"config {config.source}: OK; asked gateway process {pid} to reload (its log says when it has)")
    return 0


def _check(config: GatewayConfig, online: bool = False) -> int:
    from proxy.routing import RouteTable

    table = RouteTable(config)
    print(f"config {config.source}: OK")
    from proxy.store.base import redact_url

    print(f"store: {redact_url(config.store.url)}")
    print(f"providers ({len(config.providers)}):")
    for name, p in config.providers.items():
        key = "api key set" if p.api_key else "no api key"
        print(f"  {name:<14} kind={p.kind:<18} {p.base_url}  ({key})")
    print(f"models ({len(config.models)}):")
    for model_id, m in config.models.items():
        targets = ", ".join(f"{t.provider}/{t.model}" for t in m.targets)
        print(f"  {model_id:<40} {','.join(m.endpoints):<20} -> {targets}")
    if config.prices is None:
        print("pricing: none (no pricing file): requests are not priced")
    else:
        unpriced = [m for m in config.models if m not in config.prices.models]
        print(
            f"pricing: {len(config.prices.models)} models in {config.prices.currency}, "
            f"effective {config.prices.effective}" + (f"; unpriced: {', '.join(unpriced)}" if unpriced else "")
        )
    print(f"routes ({len(table.routes)}):")
    for route, surface in table.routes:
        print(f"  {route.method:<6} {route.path:<28} {surface.name}")
    if not online:
        return 0
    from proxy import online as remote

    reports = asyncio.run(remote.check(config))
    print(remote.render(reports))
    return 1 if any(r.problem for r in reports) else 0


async def _migrate(config: GatewayConfig) -> int:
    """Open the store, which applies the migrations it lacks, and say which schema version it now has."""
    from proxy.store import StoreError, open_store, redact_url

    try:
        store = await open_store(config.store.url, pool_min=0, pool_max=1)
        try:
            version = await store.schema_version()
        finally:
            await store.close()
    except StoreError as e:
        print(f"store error: {e}", file=sys.stderr)
        return 1
    print(f"store {redact_url(config.store.url)} ({store.backend}): schema version {version}")
    return 0


async def _admin(config: GatewayConfig, args: argparse.Namespace) -> int:
    from proxy.store import StoreError, open_store

    try:
        store = await open_store(config.store.url, pool_min=config.store.pool_min, pool_max=config.store.pool_max)
    except StoreError as e:
        print(f"store error: {e}", file=sys.stderr)
        return 1
    args.cache_ttl = config.auth.cache_ttl_s
    try:
        handler: Callable[[Any, argparse.Namespace, GatewayConfig], Awaitable[int]] = _ACTIONS[
            (args.command, args.action)
        ]
        return await handler(store, args, config)
    finally:
        await store.close()


async def _keys_create(store: Any, args: argparse.Namespace, config: GatewayConfig) -> int:
    from proxy.auth import generate_key, hash_secret, split_key
    from proxy.credit import usd
    from proxy.store.base import SCOPE_INFERENCE, SCOPE_MANAGEMENT

    guardrails = tuple(dict.fromkeys(g.strip() for g in args.guardrails.split(",") if g.strip()))
    unknown = [g for g in guardrails if g not in config.guardrails.policies]
    if unknown:
        known = ", ".join(config.guardrails.policies) or f"none defined in {config.source}"
        print(f"unknown policies in --guardrails: {', '.join(unknown)} (guardrails.policies: {known})", file=sys.stderr)
        return 2
    team = await store.ensure_team(args.team)
    kid, key = generate_key()
    parts = split_key(key)
    assert parts is not None
    scopes = (SCOPE_INFERENCE, SCOPE_MANAGEMENT) if args.management else (SCOPE_INFERENCE,)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    unknown = [m for m in models if m not in config.models]
    if unknown:
        print(f"unknown models in --models: {', '.join(unknown)}", file=sys.stderr)
        return 2
    await store.create_key(team_id=team.id, kid=kid, secret_hash=hash_secret(parts[1]), name=args.name, scopes=scopes)
    if models or args.daily_limit is not None or args.monthly_limit is not None:
        await store.set_key_limits(
            kid, allowed_models=models, daily_nanos=args.daily_limit, monthly_nanos=args.monthly_limit
        )
    if args.rpm is not None or args.tpm is not None or args.concurrency is not None:
        await store.set_key_rate_limits(kid, rpm=args.rpm, tpm=args.tpm, concurrency=args.concurrency)
    if guardrails:
        await store.set_key_guardrails(kid, guardrails=guardrails)
    if args.cache is not None:
        await store.set_key_cache(kid, cache=args.cache == "on")
    balance = team.balance_nanos
    if args.credit:
        balance = await store.add_credit(team.id, args.credit, note=f"keys create {kid}")
    print(f"created key {kid} for team {team.name!r} ({team.id}), scopes: {', '.join(scopes)}")
    print(f"team wallet: {usd(balance)}")
    print("the key is shown once; store it now:")
    print(key)
    return 0


async def _keys_list(store: Any, args: argparse.Namespace, config: GatewayConfig) -> int:
    from datetime import UTC, datetime

    team_id = None
    if args.team:
        team = await store.get_team(args.team)
        if team is None:
            print(f"no team named {args.team!r}", file=sys.stderr)
            return 1
        team_id = team.id
    rows = await store.list_keys(team_id)
    print(f"{'kid':<14} {'team':<20} {'status':<9} {'scopes':<22} {'created (UTC)':<20} name")
    for k in rows:
        created = datetime.fromtimestamp(k.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{k.kid:<14} {k.team_name:<20} {k.status:<9} {','.join(k.scopes):<22} {created:<20} {k.name}")
    return 0


async def _keys_revoke(store: Any, args: argparse.Namespace, config: GatewayConfig) -> int:
    from proxy.store.base import REVOKED

    if not await store.set_key_status(args.kid, REVOKED):
        print(f"no active key {args.kid!r}", file=sys.stderr)
        return 1
    print(f"revoked key {args.kid} (running gateways refuse it within auth.cache_ttl_s = {args.cache_ttl:g} s)")
    return 0


async def _credits_add(store: Any, args: argparse.Namespace, config: GatewayConfig) -> int:
    from proxy.credit import usd

    team = await store.ensure_team(args.team)
    balance = await store.add_credit(team.id, args.usd, note="credits add")
    print(f"team {team.name!r} wallet: {usd(balance)}")
    return 0


async def _credits_show(store: Any, args: argparse.Namespace, config: GatewayConfig) -> int:
    from proxy.credit import usd

    team = await store.get_team(args.team)
    if team is None:
        print(f"no team named {args.team!r}", file=sys.stderr)
        return 1
    print(f"team {team.name!r} ({team.id}) wallet: {usd(team.balance_nanos)}")
    return 0


async def _admin_token_create(store: Any, args: argparse.Namespace, config: GatewayConfig) -> int:
    import secrets

    from proxy.auth import hash_secret
    from proxy.dashboard.views import ADMIN_PREFIX

    token_id = secrets.token_hex(6)
    token = f"{ADMIN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
    await store.create_admin_token(token_id, hash_secret(token), args.name)
    print(f"created operator token {token_id} ({args.name!r}): it signs in to /dashboard as the operator")
    print("the token is shown once; store it now:")
    print(token)
    return 0


async def _admin_token_list(store: Any, args: argparse.Namespace, config: GatewayConfig) -> int:
    from datetime import UTC, datetime

    print(f"{'id':<14} {'created (UTC)':<20} name")
    for token in await store.list_admin_tokens():
        created = datetime.fromtimestamp(token.created_at / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{token.id:<14} {created:<20} {token.name}")
    return 0


async def _admin_token_revoke(store: Any, args: argparse.Namespace, config: GatewayConfig) -> int:
    if not await store.revoke_admin_token(args.id):
        print(f"no operator token {args.id!r}", file=sys.stderr)
        return 1
    print(f"revoked operator token {args.id}; its sessions end now")
    return 0


_ACTIONS = {
    ("keys", "create"): _keys_create,
    ("keys", "list"): _keys_list,
    ("keys", "revoke"): _keys_revoke,
    ("credits", "add"): _credits_add,
    ("credits", "show"): _credits_show,
    ("admin-token", "create"): _admin_token_create,
    ("admin-token", "list"): _admin_token_list,
    ("admin-token", "revoke"): _admin_token_revoke,
}

if __name__ == "__main__":
    sys.exit(main())
