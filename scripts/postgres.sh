#!/usr/bin/env bash
# Make sure PostgreSQL answers for the outbox tests (tests/outbox), the way scripts/broker.sh
# does for RabbitMQ:
#   1. reuse a server that already answers at $MQKIT_TEST_DB (a SQLAlchemy URL), else at
#      postgresql+psycopg://postgres@127.0.0.1:5432/test (creating database "test" if the
#      server answers but has none);
#   2. else, when MQKIT_TEST_DB is not set and a cluster is installed (pg_lsclusters): start it;
#   3. else, where apt-get can run as root: install postgresql, let the postgres user in over
#      127.0.0.1 without a password (a test machine's cluster), create "test", start it;
#   4. else exit 1 saying exactly what to do.
#
# Usage: bash scripts/postgres.sh        (prints the URL that answers on its last line)
# MQKIT_POSTGRES_WAIT: seconds to wait for a server that was just started (default 60).
set -euo pipefail

DEFAULT_URL="postgresql+psycopg://postgres@127.0.0.1:5432/test"
URL="${MQKIT_TEST_DB:-$DEFAULT_URL}"
WAIT_SECONDS="${MQKIT_POSTGRES_WAIT:-60}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"

say() { printf 'postgres: %s\n' "$*"; }
err() { printf 'postgres: %s\n' "$*" >&2; }
masked() { printf '%s' "$1" | sed -E 's#(://[^:/@]*):[^@/]*@#\1:***@#'; }
SHOWN_URL="$(masked "$URL")"

# Exit status: 0 answers (prints the server version), 1 nothing answers, 2 the server answers
# but refuses (prints why: "missing-database" or the server's words), 3 cannot probe.
PROBE='
import os, sys
try:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
except ImportError:
    sys.exit(3)
url = make_url(os.environ["MQKIT_PROBE_URL"])
engine = create_engine(url, connect_args={"connect_timeout": 3})
try:
    with engine.connect() as conn:
        print(conn.execute(text("SHOW server_version")).scalar())
    sys.exit(0)
except Exception as exc:
    words = str(getattr(exc, "orig", exc) or exc).strip().splitlines()
    first = words[0] if words else type(exc).__name__
    if "does not exist" in first and "database" in first:
        print("missing-database")
        sys.exit(2)
    if "Connection refused" in first or "timeout" in first.lower() or "No such file" in first:
        sys.exit(1)
    print(first)
    sys.exit(2)
finally:
    engine.dispose()
'

probe() {
    if [[ ! -x "$PY" ]]; then
        return 3
    fi
    MQKIT_PROBE_URL="$URL" "$PY" -c "$PROBE"
}

# Run a command as the postgres system user (root can; the postgres user itself can).
as_postgres() {
    if [[ "$(id -un)" == "postgres" ]]; then
        "$@"
    elif [[ "$(id -u)" == "0" ]]; then
        runuser -u postgres -- "$@"
    else
        return 1
    fi
}

create_database() {
    local name
    name="$(MQKIT_PROBE_URL="$URL" "$PY" -c 'import os; from sqlalchemy.engine import make_url; print(make_url(os.environ["MQKIT_PROBE_URL"]).database or "test")')"
    say "creating database \"$name\""
    as_postgres createdb "$name" 2>/dev/null || as_postgres psql -qc "CREATE DATABASE \"$name\""
}

wait_until_up() {
    local deadline=$((SECONDS + WAIT_SECONDS)) status
    while ((SECONDS < deadline)); do
        status=0
        probe >/dev/null 2>&1 || status=$?
        if [[ "$status" != 1 ]]; then
            return 0
        fi
        sleep 1
    done
    return 1
}

trust_local_postgres() {
    # A test machine's cluster: the postgres user may connect over 127.0.0.1 without a
    # password, as the default MQKIT_TEST_DB expects. Only done to a cluster this script
    # installed.
    local hba
    for hba in /etc/postgresql/*/main/pg_hba.conf; do
        [[ -f "$hba" ]] || continue
        if ! grep -q '^host[[:space:]]\+all[[:space:]]\+postgres[[:space:]]\+127.0.0.1/32[[:space:]]\+trust' "$hba"; then
            sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
        fi
    done
}

start_clusters() {
    local started=1 version cluster status
    while read -r version cluster _port status _rest; do
        [[ -n "$version" ]] || continue
        if [[ "$status" != online* ]]; then
            say "starting cluster $version/$cluster"
            if pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" start 2>/dev/null \
                || as_postgres pg_ctlcluster "$version" "$cluster" start; then
                started=0
            fi
        else
            started=0
        fi
    done < <(pg_lsclusters --no-header 2>/dev/null || true)
    return "$started"
}

answers() {
    local status=0 out
    out="$(probe 2>/dev/null)" || status=$?
    case "$status" in
        0)
            say "PostgreSQL $out answers at $SHOWN_URL"
            printf '%s\n' "$SHOWN_URL"
            return 0
            ;;
        2)
            if [[ "$out" == "missing-database" ]] && create_database; then
                answers
                return $?
            fi
            err "a server answers at $SHOWN_URL but refuses: $out"
            err "fix its access (pg_hba.conf, the user, the database), or point MQKIT_TEST_DB at one that lets the tests in"
            exit 1
            ;;
        3)
            err "cannot probe: $PY with SQLAlchemy is missing; run \`make install\` (or: .venv/bin/pip install -e '.[test,outbox]') first"
            exit 1
            ;;
    esac
    return 1
}

if answers; then
    exit 0
fi
if [[ -n "${MQKIT_TEST_DB:-}" ]]; then
    err "nothing answers at MQKIT_TEST_DB=$SHOWN_URL; start that server, or unset MQKIT_TEST_DB to use a local one"
    exit 1
fi

if command -v pg_lsclusters >/dev/null 2>&1 && start_clusters; then
    if wait_until_up && answers; then
        exit 0
    fi
    err "a local cluster was started but nothing answers at $SHOWN_URL within ${WAIT_SECONDS}s"
    err "see its log: pg_lsclusters; /var/log/postgresql/"
    exit 1
fi

if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == "0" ]]; then
    say "installing PostgreSQL with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
    trust_local_postgres
    start_clusters || true
    for cluster in /etc/postgresql/*/main; do
        version="$(basename "$(dirname "$cluster")")"
        pg_ctlcluster --skip-systemctl-redirect "$version" main reload 2>/dev/null || true
    done
    if wait_until_up && answers; then
        exit 0
    fi
    err "PostgreSQL was installed and started, but nothing answers at $SHOWN_URL"
    exit 1
fi

err "no PostgreSQL answers at $SHOWN_URL, none is installed here, and apt-get cannot run as root."
err "Do one of:"
err "  - start PostgreSQL and export MQKIT_TEST_DB=postgresql+psycopg://USER[:PASSWORD]@HOST:PORT/DB"
err "  - install it (e.g. sudo apt-get install postgresql), then run this script again"
err "  - docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust -e POSTGRES_DB=test postgres:16"
exit 1
