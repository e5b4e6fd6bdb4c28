#!/usr/bin/env bash
# A RabbitMQ 4.0 node for `make test` where no Docker engine runs. Debian 13 (trixie) ships
# rabbitmq-server 4.0, so this debootstraps a minimal trixie into a cache directory once and
# runs the node from it in a chroot, beside whatever other RabbitMQ the machine runs (its own
# node name, port and distribution port).
#
#   bash scripts/rabbitmq4.sh start     # start it (first time: a few minutes); prints its URL
#   bash scripts/rabbitmq4.sh url       # print its URL (no start)
#   bash scripts/rabbitmq4.sh ctl ARGS  # rabbitmqctl against it, e.g. `ctl list_queues name`
#   bash scripts/rabbitmq4.sh stop      # stop it and unmount what start mounted
#
# Only `start` and `url` print to stdout (the URL); everything else goes to stderr.
# Env: RMQ4_ROOT     the chroot (default /var/cache/rabbitmq4-root)
#      RMQ4_PORT     AMQP port (5673); RMQ4_DIST_PORT: Erlang distribution port (25673)
#      RMQ4_NODE     Erlang node name (rabbit4@localhost)
#      RMQ4_MIRROR   Debian mirror (default: the one apt uses here if it is Debian's, else
#                    http://deb.debian.org/debian)
#      RMQ4_NOFILE   the node's open-file limit (1024, as Debian's own service runs it)
#      RMQ4_WAIT     seconds to wait for the node to boot (120)
# Needs root (or sudo without a password) for debootstrap, chroot and mounts, and
# debootstrap (installed with apt-get when missing).
set -euo pipefail

ROOT="${RMQ4_ROOT:-/var/cache/rabbitmq4-root}"
PORT="${RMQ4_PORT:-5673}"
DIST_PORT="${RMQ4_DIST_PORT:-25673}"
NOFILE="${RMQ4_NOFILE:-1024}"
WAIT_SECONDS="${RMQ4_WAIT:-120}"
NODE="${RMQ4_NODE:-rabbit4@localhost}"
URL="amqp://guest:guest@127.0.0.1:$PORT/"
SUITE="trixie" # Debian 13: rabbitmq-server 4.0

say() { printf 'rabbitmq4: %s\n' "$*" >&2; }

# Stop with what went wrong and the ways forward.
give_up() {
    local line
    for line in "$@"; do
        say "$line"
    done
    say "Other ways to test against RabbitMQ 4:"
    say "  - where a Docker engine runs: docker run -d -p 5673:5672 rabbitmq:4.0, then"
    say "    MQKIT_TEST_URL4=amqp://guest:guest@127.0.0.1:5673/ \\"
    say "    MQKIT_TEST_CTL4='docker exec CONTAINER rabbitmqctl' make test"
    say "  - any RabbitMQ 4 broker you run: set MQKIT_TEST_URL4 (and MQKIT_TEST_CTL4 to a"
    say "    command that runs rabbitmqctl against it) before make test"
    exit 1
}

as_root() {
    if ((EUID == 0)); then
        "$@"
    else
        sudo -n "$@"
    fi
}
# as_root with stdout and stderr into a log file that only root may be able to write.
as_root_logged() {
    local log="$1"
    shift
    as_root sh -c 'log="$1"; shift; exec "$@" >"$log" 2>&1' sh "$log" "$@"
}
can_be_root() { ((EUID == 0)) || { command -v sudo >/dev/null && sudo -n true 2>/dev/null; }; }

need_root() {
    can_be_root || give_up \
        "'$1' needs root (debootstrap, chroot and mounts): run it as root, or allow sudo" \
        "without a password for this user."
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

installed() { [[ -x "$ROOT/usr/lib/rabbitmq/bin/rabbitmq-server" ]]; }

in_root() { as_root chroot "$ROOT" env HOME=/var/lib/rabbitmq RABBITMQ_NODENAME="$NODE" "$@"; }

ctl() { in_root rabbitmqctl -n "$NODE" "$@"; }

mirror() {
    local found
    if [[ -n "${RMQ4_MIRROR:-}" ]]; then
        echo "$RMQ4_MIRROR"
        return
    fi
    found="$(grep -hoE '^(URIs:|deb) +[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/* \
        2>/dev/null | awk '{print $2}' | grep -E '/debian/?$' | head -n 1 || true)"
    echo "${found:-http://deb.debian.org/debian}"
}

bootstrap() {
    local partial="$ROOT.partial" log="$ROOT.log" m
    if ! command -v debootstrap >/dev/null; then
        command -v apt-get >/dev/null || give_up \
            "debootstrap is not installed and there is no apt-get to install it:" \
            "install debootstrap (https://wiki.debian.org/Debootstrap), then run this again."
        say "installing debootstrap with apt-get ..."
        as_root apt-get update -qq >&2 &&
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2 ||
            give_up "\`apt-get install debootstrap\` failed (see above)."
    fi
    m="$(mirror)"
    say "debootstrap $SUITE (with rabbitmq-server) from $m into $ROOT: a few minutes, once;"
    say "log: $log"
    as_root rm -rf "$partial"
    as_root mkdir -p "$(dirname "$ROOT")"
    if ! as_root_logged "$log" \
        debootstrap --variant=minbase --include=rabbitmq-server "$SUITE" "$partial" "$m"; then
        tail -n 20 "$log" >&2 || true
        give_up "debootstrap failed (above: the end of $log). A mirror that carries Debian" \
            "$SUITE can be given as RMQ4_MIRROR=http://.../debian."
    fi
    as_root mv "$partial" "$ROOT"
}

mounts() {
    local d
    for d in proc sys dev; do
        mountpoint -q "$ROOT/$d" || as_root mount --bind "/$d" "$ROOT/$d"
    done
}

# The node looks up this machine's host name now and then while it accepts connections (about
# one in 64). A debootstrapped /etc/hosts does not know that name, so each such lookup went to
# DNS and a connection waited 5 s for its connection.start: give the chroot the host's names.
host_names() {
    local name
    name="$(hostname 2>/dev/null || true)"
    {
        cat /etc/hosts 2>/dev/null || printf '127.0.0.1\tlocalhost\n'
        if [[ -n "$name" ]] && ! getent hosts "$name" >/dev/null 2>&1; then
            printf '127.0.0.1\t%s\n' "$name"
        fi
    } | as_root tee "$ROOT/etc/hosts" >/dev/null
    as_root cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
}

unmounts() {
    local d
    for d in dev sys proc; do
        if mountpoint -q "$ROOT/$d"; then
            as_root umount -l "$ROOT/$d" || true
        fi
    done
}

# Whether this script's node is the one with an AMQP listener on PORT.
serves_port() {
    in_root rabbitmq-diagnostics -n "$NODE" -q listeners 2>/dev/null |
        grep -q "port: $PORT, protocol: amqp"
}

# The node's version once it answers, else nothing.
version() { in_root rabbitmq-diagnostics -n "$NODE" -q server_version 2>/dev/null || true; }

start() {
    local running
    if port_open; then
        running="$(installed && can_be_root && serves_port && version)" || true
        if [[ -n "$running" ]]; then
            say "reusing RabbitMQ $running ($NODE) at ${URL/guest@/***@}"
            host_names # a node started by an earlier version of this script may lack them
            echo "$URL"
            return
        fi
        give_up "something already listens on port $PORT, but not this script's node" \
            "($NODE in $ROOT, which needs root to be asked). Stop it, or choose another" \
            "port: RMQ4_PORT=5674 RMQ4_DIST_PORT=25674 (make test uses the URL printed)."
    fi
    need_root start
    installed || bootstrap
    mounts
    host_names
    as_root tee "$ROOT/start-rabbit4.sh" >/dev/null <<EOS
#!/bin/sh
# Written by mqkit's scripts/rabbitmq4.sh: the node it starts in this chroot.
export HOME=/var/lib/rabbitmq RABBITMQ_NODENAME=$NODE RABBITMQ_NODE_PORT=$PORT
export RABBITMQ_DIST_PORT=$DIST_PORT RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
ulimit -n $NOFILE
mkdir -p /var/lib/rabbitmq /var/log/rabbitmq
exec /usr/lib/rabbitmq/bin/rabbitmq-server
EOS
    as_root chmod +x "$ROOT/start-rabbit4.sh"
    say "starting RabbitMQ 4 ($NODE, port $PORT, open-file limit $NOFILE); log: $ROOT.server.log"
    # Its own session, so the node outlives this script (and a Ctrl-C of make). The job that
    # waits for it must not hold this script's stdout or stderr: a caller reading the URL with
    # $(...), or a CI runner reading the log, would wait for the node to exit, i.e. forever.
    as_root_logged "$ROOT.server.log" setsid nohup chroot "$ROOT" /start-rabbit4.sh \
        </dev/null >/dev/null 2>&1 &
    local start=$SECONDS
    until port_open && [[ -n "$(version)" ]]; do
        if ((SECONDS - start > WAIT_SECONDS)); then
            tail -n 30 "$ROOT.server.log" >&2 || true
            give_up "the node did not answer within ${WAIT_SECONDS}s (above: the end of" \
                "$ROOT.server.log; RMQ4_WAIT gives it longer)."
        fi
        sleep 2
    done
    ctl -q await_startup >/dev/null 2>&1 || true
    say "ready after $((SECONDS - start))s: RabbitMQ $(version) at ${URL/guest@/***@}"
    echo "$URL"
}

case "${1:-start}" in
start)
    start
    ;;
url)
    echo "$URL"
    ;;
ctl)
    shift
    installed || give_up "no RabbitMQ 4 in $ROOT: run \`bash scripts/rabbitmq4.sh start\` first."
    need_root ctl
    ctl "$@"
    ;;
stop)
    if installed && can_be_root; then
        ctl -q stop 2>/dev/null || true
        unmounts
    fi
    ;;
*)
    echo "usage: bash scripts/rabbitmq4.sh start|url|ctl ARGS...|stop" >&2
    exit 2
    ;;
esac
