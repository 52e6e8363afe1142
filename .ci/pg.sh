#!/usr/bin/env bash
# A throwaway PostgreSQL server for the integration tests (tests/postgres_store.rs).
#
# Sourced (what .ci/run does):
#     source .ci/pg.sh
#     pg_start               # installs PostgreSQL if needed, starts it, exports the variables below
#     trap pg_stop EXIT
#     cargo test --all-features
#
# Executed (by hand):
#     eval "$(bash .ci/pg.sh start)"   # prints export lines
#     ... run tests ...
#     bash .ci/pg.sh stop              # uses WRITEBEHIND_PG_DIR from the environment
#
# Exports:
#     WRITEBEHIND_PG_URL  libpq key/value connection string, unix socket in a temp dir:
#                         host=/tmp/wbpg.XXXX/sock port=NNNN user=postgres dbname=writebehind
#     WRITEBEHIND_PG_CTL  command prefix for pg_ctl on this server (run as user postgres), so a
#                         test can take the server down and up: "$WRITEBEHIND_PG_CTL stop -m fast",
#                         "$WRITEBEHIND_PG_CTL start"
#     WRITEBEHIND_PG_DIR  the temp dir (data, socket, log); pg_stop removes it
#
# The server listens on 127.0.0.1 at a random free port and on a socket in the temp dir,
# with trust authentication; it is for tests only.

pg_bindir() {
    local d best=""
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] && best="$d"
    done
    if [ -z "$best" ] && command -v initdb >/dev/null 2>&1; then
        best="$(dirname "$(readlink -f "$(command -v initdb)")")"
    fi
    echo "$best"
}

pg_free_port() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
        return
    fi
    local port
    for _ in $(seq 1 50); do
        port=$((20000 + RANDOM % 30000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
    echo "pg.sh: no free port found" >&2
    return 1
}

# Runs a command as the postgres user when we are root (initdb refuses to run as root).
pg_as_postgres_prefix() {
    if [ "$(id -u)" = 0 ]; then
        echo "runuser -u postgres --"
    fi
}

pg_start() {
    local bin port dir as
    bin="$(pg_bindir)"
    if [ -z "$bin" ]; then
        echo "pg.sh: installing PostgreSQL (apt-get install postgresql)" >&2
        apt-get update -qq >&2 || return 1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2 || return 1
        bin="$(pg_bindir)"
        [ -n "$bin" ] || { echo "pg.sh: initdb not found after install" >&2; return 1; }
    fi
    if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
        useradd --system --no-create-home --shell /usr/sbin/nologin postgres || return 1
    fi
    as="$(pg_as_postgres_prefix)"
    port="$(pg_free_port)" || return 1
    dir="$(mktemp -d /tmp/wbpg.XXXXXX)" || return 1
    mkdir -p "$dir/sock"
    [ "$(id -u)" = 0 ] && chown -R postgres: "$dir"
    chmod 700 "$dir"

    $as "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 \
        --no-sync >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; return 1; }
    cat >>"$dir/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir/sock'
max_connections = 50
CONF
    export WRITEBEHIND_PG_DIR="$dir"
    export WRITEBEHIND_PG_CTL="$as $bin/pg_ctl -D $dir/data -l $dir/server.log -w -t 60"
    $WRITEBEHIND_PG_CTL start >&2 || { cat "$dir/server.log" >&2; return 1; }
    $as "$bin/createdb" -h "$dir/sock" -p "$port" -U postgres writebehind >&2 || return 1
    export WRITEBEHIND_PG_URL="host=$dir/sock port=$port user=postgres dbname=writebehind"
    echo "pg.sh: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') up: $WRITEBEHIND_PG_URL" >&2
}

pg_stop() {
    [ -n "${WRITEBEHIND_PG_DIR:-}" ] || return 0
    if [ -d "$WRITEBEHIND_PG_DIR/data" ]; then
        $WRITEBEHIND_PG_CTL stop -m immediate >/dev/null 2>&1 || true
    fi
    rm -rf "$WRITEBEHIND_PG_DIR"
    unset WRITEBEHIND_PG_DIR WRITEBEHIND_PG_URL WRITEBEHIND_PG_CTL
}

# Executed rather than sourced.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    case "${1:-}" in
        start)
            pg_start
            printf 'export WRITEBEHIND_PG_DIR=%q\n' "$WRITEBEHIND_PG_DIR"
            printf 'export WRITEBEHIND_PG_CTL=%q\n' "$WRITEBEHIND_PG_CTL"
            printf 'export WRITEBEHIND_PG_URL=%q\n' "$WRITEBEHIND_PG_URL"
            ;;
        stop)
            if [ -z "${WRITEBEHIND_PG_CTL:-}" ] && [ -n "${WRITEBEHIND_PG_DIR:-}" ]; then
                WRITEBEHIND_PG_CTL="$(pg_as_postgres_prefix) $(pg_bindir)/pg_ctl -D $WRITEBEHIND_PG_DIR/data -w"
            fi
            pg_stop
            ;;
        *)
            echo "usage: source .ci/pg.sh; pg_start; pg_stop   or   bash .ci/pg.sh start|stop" >&2
            exit 2
            ;;
    esac
fi
