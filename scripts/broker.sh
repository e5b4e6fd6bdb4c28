#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers at one URL, so `make demo` / `make test` work on a
# fresh machine:
#   1. reuse a broker that already answers there;
#   2. else, where a Docker engine runs: `docker compose up -d rabbitmq`;
#   3. else, where rabbitmq-server is installed: `rabbitmq-server -detached`;
#   4. else, where apt-get can run as root: install rabbitmq-server, then 3;
#   5. else exit 1 saying exactly what to do.
#
# Usage: bash scripts/broker.sh [URL]     (default: $MQKIT_URL, else the local default)
# MQKIT_BROKER_WAIT: seconds to wait for a broker that was just started (default 90).
set -euo pipefail

DEFAULT_URL="amqp://guest:guest@localhost:5672/"
URL="${1:-${MQKIT_URL:-$DEFAULT_URL}}"
WAIT_SECONDS="${MQKIT_BROKER_WAIT:-90}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Where distributions put rabbitmq-server when it is not on a non-root user's PATH.
SBIN_DIRS="${MQKIT_BROKER_SBIN_DIRS:-/usr/local/sbin /usr/sbin /sbin}"
TRIED=()

say() { printf 'broker: %s\n' "$*"; }
err() { printf 'broker: %s\n' "$*" >&2; }

# The URL with its password replaced by ***, for every message.
masked() { printf '%s' "$1" | sed -E 's#(://[^:/@]*):[^@/]*@#\1:***@#'; }
SHOWN_URL="$(masked "$URL")"

# A real AMQP check. The venv's pika opens a connection with the URL's credentials; without
# it, Python's stdlib sends the AMQP protocol header and expects Connection.Start back
# (a method frame, type 1). The URL travels in the environment, never on a command line.
# Exit status: 0 answers, 1 nothing answers, 2 a broker answers but refuses the URL.
PROBE_PIKA='
import logging, os, sys
logging.disable(logging.CRITICAL)  # pika logs every failed attempt; the status says enough
import pika
from pika import exceptions as ex
params = pika.URLParameters(os.environ["MQKIT_PROBE_URL"].split(",")[0].strip())
params.connection_attempts = 1
params.socket_timeout = 3
params.blocked_connection_timeout = 3
try:
    connection = pika.BlockingConnection(params)
except (ex.AuthenticationError, ex.ProbableAuthenticationError, ex.ProbableAccessDeniedError) as exc:
    print(type(exc).__name__, file=sys.stderr)
    sys.exit(2)
except Exception:
    sys.exit(1)
props = getattr(connection._impl, "server_properties", None) or {}  # for the version only
def text(value):
    return value.decode() if isinstance(value, bytes) else str(value)
print(text(props.get("product", "an AMQP broker")), text(props.get("version", "")).strip())
connection.close()
'
PROBE_STDLIB='
import os, socket, sys
from urllib.parse import urlsplit
url = urlsplit(os.environ["MQKIT_PROBE_URL"].split(",")[0].strip())
tls = url.scheme == "amqps"
host, port = url.hostname or "localhost", url.port or (5671 if tls else 5672)
try:
    with socket.create_connection((host, port), timeout=3) as sock:
        if tls:  # the port is open; the TLS handshake is left to the client
            print("a TLS listener")
            sys.exit(0)
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        frame_type = sock.recv(1)
except OSError:
    sys.exit(1)
if frame_type != b"\x01":
    sys.exit(1)
print("an AMQP 0-9-1 broker")
'

probe() {
    local py="$ROOT/.venv/bin/python"
    if [[ -x "$py" ]] && "$py" -c 'import pika' 2>/dev/null; then
        MQKIT_PROBE_URL="$URL" "$py" -c "$PROBE_PIKA"
    else
        MQKIT_PROBE_URL="$URL" python3 -c "$PROBE_STDLIB"
    fi
}

# Status of probe() without tripping `set -e`; prints what answered on success.
answers() {
    local status=0
    ANSWERED="$(probe 2>/dev/null)" || status=$?
    return "$status"
}

# Poll until the broker answers, up to WAIT_SECONDS.
wait_for_broker() {
    local what="$1" start=$SECONDS status
    say "waiting up to ${WAIT_SECONDS}s for $what to answer at $SHOWN_URL ..."
    while ((SECONDS - start < WAIT_SECONDS)); do
        status=0
        answers || status=$?
        if ((status == 0)); then
            say "ready after $((SECONDS - start))s: $ANSWERED at $SHOWN_URL"
            return 0
        fi
        if ((status == 2)); then
            err "a broker answers at $SHOWN_URL but refuses the URL's credentials or vhost"
            return 1
        fi
        sleep 2
    done
    return 1
}

# "scheme host port" of the URL (the first one of a fail-over list).
url_parts() {
    MQKIT_PROBE_URL="$URL" python3 -c '
import os
from urllib.parse import urlsplit
url = urlsplit(os.environ["MQKIT_PROBE_URL"].split(",")[0].strip())
print(url.scheme, url.hostname or "localhost", url.port or 5672)
'
}

# Run as root: directly when we are root, through sudo when it needs no password.
as_root() {
    if ((EUID == 0)); then
        "$@"
    else
        sudo -n "$@"
    fi
}
can_be_root() { ((EUID == 0)) || { command -v sudo >/dev/null && sudo -n true 2>/dev/null; }; }

find_rabbitmq_server() {
    local dir
    if command -v rabbitmq-server 2>/dev/null; then
        return 0
    fi
    for dir in $SBIN_DIRS; do
        if [[ -x "$dir/rabbitmq-server" ]]; then
            printf '%s\n' "$dir/rabbitmq-server"
            return 0
        fi
    done
    return 1
}

give_up() {
    local reason
    err "no RabbitMQ broker answers at $SHOWN_URL, and none could be started here."
    for reason in ${TRIED[@]+"${TRIED[@]}"}; do
        err "  - $reason"
    done
    err "Do one of these, then re-run the same command:"
    err "  1. install Docker (https://docs.docker.com/engine/install/) and start its engine"
    err "     (\`docker info\` must work): this script then runs \`docker compose up -d rabbitmq\`;"
    err "  2. install RabbitMQ: \`sudo apt-get install rabbitmq-server\` (Debian/Ubuntu),"
    err "     \`brew install rabbitmq\` (macOS), or see https://www.rabbitmq.com/docs/download;"
    err "  3. point mqkit at a broker you already run:"
    err "     export MQKIT_URL=amqp://USER:PASSWORD@HOST:5672/    (make demo, make bench)"
    err "     export MQKIT_TEST_URL=amqp://USER:PASSWORD@HOST:5672/  (make test)"
    exit 1
}

# 1. Reuse one that answers.
status=0
answers || status=$?
if ((status == 0)); then
    say "reusing $ANSWERED at $SHOWN_URL"
    exit 0
fi
if ((status == 2)); then
    err "a broker answers at $SHOWN_URL but refuses its credentials or virtual host."
    err "Fix the user, password or vhost in the URL (MQKIT_URL, or MQKIT_TEST_URL for"
    err "make test), or create them: rabbitmqctl add_user USER PASSWORD;"
    err "rabbitmqctl set_permissions -p VHOST USER '.*' '.*' '.*'"
    exit 1
fi
say "nothing answers at $SHOWN_URL"

# Only a broker on this machine can be started from here.
read -r SCHEME HOST PORT <<<"$(url_parts)"
case "$SCHEME:$HOST" in
amqp:localhost | amqp:127.0.0.1 | amqp:::1) ;;
*)
    err "$SHOWN_URL is not a plain amqp:// URL on this machine, so no broker can be"
    err "started for it here. Start that broker yourself, or point MQKIT_URL (MQKIT_TEST_URL"
    err "for make test) at one that runs, or unset them to use $DEFAULT_URL."
    exit 1
    ;;
esac
# The broker started below listens on the URL's port (docker-compose.yml reads this too).
export MQKIT_BROKER_PORT="$PORT"

# 2. Docker.
if ! command -v docker >/dev/null; then
    TRIED+=("docker: not installed")
elif ! docker info >/dev/null 2>&1; then
    TRIED+=("docker: installed, but no Docker engine answers (\`docker info\` fails)")
else
    compose=()
    if docker compose version >/dev/null 2>&1; then
        compose=(docker compose)
    elif command -v docker-compose >/dev/null; then
        compose=(docker-compose)
    fi
    if ((${#compose[@]} == 0)); then
        TRIED+=("docker: the engine runs, but neither \`docker compose\` nor docker-compose is installed")
    else
        say "starting RabbitMQ with: ${compose[*]} up -d rabbitmq (port $PORT)"
        if "${compose[@]}" -f "$ROOT/docker-compose.yml" up -d rabbitmq &&
            wait_for_broker "the rabbitmq container"; then
            exit 0
        fi
        TRIED+=("docker: \`${compose[*]} up -d rabbitmq\` did not give a broker that answers (see \`${compose[*]} logs rabbitmq\`)")
    fi
fi

# 3. A local rabbitmq-server (4. installing it first where apt-get can).
start_local() {
    local server="$1"
    # Installing the package may already have started it as a system service.
    if answers; then
        say "ready: $ANSWERED at $SHOWN_URL"
        exit 0
    fi
    # A distribution's package (Debian, RPM) puts a wrapper in /usr/sbin that runs the node
    # as the rabbitmq user, but only when started as root; a user's own install (Homebrew,
    # generic unix tarball) runs as that user.
    local run=(env)
    if ((EUID != 0)) && [[ "$server" == /usr/sbin/* || "$server" == /sbin/* ]]; then
        if ! can_be_root; then
            TRIED+=("rabbitmq-server: installed, but starting it needs root: run \`sudo $server -detached\` (or \`sudo systemctl start rabbitmq-server\`)")
            give_up
        fi
        run=(sudo -n env)
    fi
    say "starting RabbitMQ with: $server -detached (port $PORT)"
    # Only a URL on another port overrides the server's own configuration.
    if [[ "$PORT" != 5672 ]]; then
        run+=(RABBITMQ_NODE_PORT="$PORT")
    fi
    # Output to a file, never our stdout/stderr: the detached VM inherits them and would hold
    # a caller's pipe (a CI runner's log) open for as long as the broker runs.
    local started_log
    started_log="$(mktemp "${TMPDIR:-/tmp}/mqkit-rabbitmq-server.XXXXXX")"
    if "${run[@]}" "$server" -detached </dev/null >"$started_log" 2>&1 &&
        wait_for_broker "rabbitmq-server"; then
        exit 0
    fi
    TRIED+=("rabbitmq-server: \`$server -detached\` did not give a broker that answers (see $started_log and its log, e.g. /var/log/rabbitmq/)")
    give_up
}

if server="$(find_rabbitmq_server)"; then
    start_local "$server"
fi
TRIED+=("rabbitmq-server: not installed")

if ! command -v apt-get >/dev/null; then
    TRIED+=("apt-get: not available, so rabbitmq-server cannot be installed from here")
elif ! can_be_root; then
    TRIED+=("apt-get: needs root (run as root, or allow sudo without a password)")
else
    say "installing rabbitmq-server with apt-get ..."
    # Into a log, never our stdout/stderr: the package's postinst may start the server, which
    # would then hold a caller's pipe (a CI runner's log) open for as long as it runs.
    apt_log="$(mktemp "${TMPDIR:-/tmp}/mqkit-apt.XXXXXX")"
    if as_root apt-get update -q >"$apt_log" 2>&1 </dev/null &&
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q rabbitmq-server \
            >>"$apt_log" 2>&1 </dev/null; then
        if server="$(find_rabbitmq_server)"; then
            start_local "$server"
        fi
        TRIED+=("apt-get: installed rabbitmq-server, but it is not to be found on PATH or in $SBIN_DIRS")
    else
        tail -n 20 "$apt_log" >&2 || true
        TRIED+=("apt-get: \`apt-get install rabbitmq-server\` failed (above: the end of $apt_log)")
    fi
fi

give_up
