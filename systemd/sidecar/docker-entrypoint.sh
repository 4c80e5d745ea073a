#!/usr/bin/env bash
# The stats-gateway container's entrypoint.
#
#   (no arguments), serve [options]   run the gateway; options of `stats-gateway serve` (--port, --workers, ...)
#   keys ..., credits ..., check-config   run that admin command and exit
#
# Environment (see also systemd/gateway.env.example; the log level is GATEWAY_LOG_LEVEL):
#   GATEWAY_HOST              address to listen on (default 127.0.0.1: only containers sharing this network
#                             namespace reach it). 0.0.0.0 when the gateway runs in a namespace of its own.
#   GATEWAY_BOOTSTRAP_TEAM    if set and the team does not exist yet, create it and a first key before
#                             serving. The key is printed once, on the container's log.
#   GATEWAY_BOOTSTRAP_CREDIT  USD to put in that team's wallet (default: none)
set -euo pipefail

if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    set -- serve "$@" # no command, or options only: serve
fi
if [ "$1" != serve ]; then
    exec stats-gateway "$@"
fi
shift

if [ -n "${GATEWAY_BOOTSTRAP_TEAM:-}" ]; then
    if stats-gateway credits show --team "$GATEWAY_BOOTSTRAP_TEAM" >/dev/null 2>&1; then
        echo "bootstrap: team '$GATEWAY_BOOTSTRAP_TEAM' exists, no key created" >&2
    else
        create=(keys create --team "$GATEWAY_BOOTSTRAP_TEAM" --name bootstrap)
        if [ -n "${GATEWAY_BOOTSTRAP_CREDIT:-}" ]; then
            create+=(--credit "$GATEWAY_BOOTSTRAP_CREDIT")
        fi
        stats-gateway "${create[@]}"
    fi
fi

# exec: the gateway replaces this shell, so `docker stop`'s SIGTERM reaches it and starts the drain.
exec stats-gateway serve --host "${GATEWAY_HOST:-127.0.0.1}" "$@"
