"""Throw-away RabbitMQ nodes for fault tests.

:class:`RabbitNode` starts a RabbitMQ node of its own — own node name, own loopback ports,
own data and log directories, own Erlang cookie, no plugins — so a test can stop, restart or
``kill -9`` it without touching the broker everything else uses. A cluster of such nodes is
:class:`mqkit.testing.cluster.RabbitCluster`::

    from mqkit.testing import RabbitNode

    with RabbitNode("orders-it") as node:          # ~7 s to boot on a small machine
        with mqkit.Client(url=node.url) as client:
            ...
            node.restart()                         # the client reconnects on its own

It needs a local RabbitMQ installation (``rabbitmq-server``, ``rabbitmqctl`` and
``rabbitmq-queues``; set ``MQKIT_RABBITMQ_SBIN`` to their directory if they are not found)
and uses only the standard library.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path
from types import TracebackType

__all__ = ["CliError", "RabbitNode", "find_free_ports"]

_SBIN_ENV = "MQKIT_RABBITMQ_SBIN"
# Debian/Ubuntu packages put `su rabbitmq` wrappers in /usr/sbin; those reset HOME (and so
# the Erlang cookie) and need the data dirs to belong to `rabbitmq`. The real scripts, which
# run as the calling user with the environment given, live here.
_DEBIAN_SBIN = Path("/usr/lib/rabbitmq/bin")
_CLI_TIMEOUT = 120.0
_LOG_TAIL = 40
_EX_USAGE = 64  # what the CLI exits with for a command it does not know

_allocated: set[int] = set()
_allocated_lock = threading.Lock()
_live_nodes: weakref.WeakSet[RabbitNode] = weakref.WeakSet()


def _sbin() -> Path:
    explicit = os.environ.get(_SBIN_ENV)
    if explicit:
        return Path(explicit)
    if (_DEBIAN_SBIN / "rabbitmq-server").exists():
        return _DEBIAN_SBIN
    found = shutil.which("rabbitmq-server")
    if found is None:
        raise RuntimeError(
            "rabbitmq-server was not found: install RabbitMQ, or set "
            f"{_SBIN_ENV} to the directory holding rabbitmq-server and rabbitmqctl"
        )
    return Path(found).resolve().parent


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def find_free_ports(first: int = 5700, last: int = 5999, *, dist_offset: int = 20000) -> int:
    """A free loopback port ``p`` in ``[first, last]`` whose ``p + dist_offset`` is free too.

    ``p`` serves AMQP and ``p + dist_offset`` Erlang distribution (RabbitMQ's own convention:
    5672 and 25672). Ports handed out in this process are not handed out again.
    """
    candidates = list(range(first, last + 1))
    random.shuffle(candidates)  # so concurrent test sessions rarely race for one port
    with _allocated_lock:
        for port in candidates:
            if port in _allocated or port + dist_offset in _allocated:
                continue
            if _port_free(port) and _port_free(port + dist_offset):
                _allocated.update((port, port + dist_offset))
                return port
    raise RuntimeError(f"no free port pair in {first}..{last} (+{dist_offset})")


class CliError(RuntimeError):
    """A RabbitMQ CLI tool exited non-zero; ``returncode`` is its exit code."""

    def __init__(self, returncode: int, message: str) -> None:
        super().__init__(message)
        self.returncode = returncode


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed daemon that nobody reaps stays a zombie: it holds no port and no file, so it
    # counts as gone.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


class RabbitNode:
    """One RabbitMQ node of the test's own, on loopback ports, in a directory of its own.

    ``name`` is the node name (``"t1"`` becomes ``"t1@localhost"``); ``port`` (AMQP) and
    ``dist_port`` (Erlang distribution) default to a free pair in 5700-5999 / 25700-25999;
    ``base_dir`` defaults to a fresh temporary directory, removed by :meth:`cleanup`.
    Plugins are off (no management or Prometheus listener binds a port); ``guest`` may log in
    from loopback. The node uses its own Erlang cookie (a fresh random one unless ``cookie`` is
    given; nodes of one cluster share one), never the system broker's.

    Example::

        node = RabbitNode("mqkit-t1")
        try:
            node.start()                  # returns once the node accepts connections
            pika.BlockingConnection(pika.URLParameters(node.url)).close()
            node.kill()                   # SIGKILL, as a crash would
            node.start()                  # same data directory: durable queues are back
        finally:
            node.cleanup()                # kill if running, remove base_dir if ours
    """

    def __init__(
        self,
        name: str = "mqkit-node",
        port: int | None = None,
        dist_port: int | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        cookie: str | None = None,
        startup_timeout: float = 120.0,
    ) -> None:
        self.name = name if "@" in name else f"{name}@localhost"
        if port is None:
            port = find_free_ports()
            dist_port = port + 20000 if dist_port is None else dist_port
        self.port = port
        self.dist_port = dist_port if dist_port is not None else port + 20000
        self._owns_dir = base_dir is None
        short = self.name.partition("@")[0]
        self.base_dir = Path(
            tempfile.mkdtemp(prefix=f"mqkit-{short}-") if base_dir is None else base_dir
        )
        self.cookie = cookie or secrets.token_hex(20).upper()
        self.startup_timeout = startup_timeout
        self._sbin = _sbin()
        _live_nodes.add(self)

    # -- paths and environment ------------------------------------------------------------

    @property
    def url(self) -> str:
        """``amqp://guest:guest@127.0.0.1:<port>/`` (the default vhost)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def pid_file(self) -> Path:
        """Where the node writes its OS pid once it boots."""
        return self.base_dir / f"{self.name}.pid"

    @property
    def log_dir(self) -> Path:
        """The node's log directory (``<name>.log`` in it is the main log)."""
        return self.base_dir / "log"

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_")) and k != "HOME"
        }
        env.update(
            HOME=str(self.base_dir / "home"),  # where Erlang finds the node's own cookie
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.base_dir / "data"),
            RABBITMQ_LOG_BASE=str(self.log_dir),
            RABBITMQ_PID_FILE=str(self.pid_file),
            RABBITMQ_CONFIG_FILE=str(self.base_dir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.base_dir / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base_dir / "enabled_plugins"),
            # Our own (empty) env file: the system one may set NODENAME to the main broker's.
            RABBITMQ_CONF_ENV_FILE=str(self.base_dir / "rabbitmq-env.conf"),
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def _write_files(self) -> None:
        home = self.base_dir / "home"
        home.mkdir(parents=True, exist_ok=True)
        for sub in ("data", "log"):
            (self.base_dir / sub).mkdir(exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(self.cookie)
            cookie.chmod(0o400)  # Erlang refuses a cookie file others can read
        (self.base_dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = true\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )
        (self.base_dir / "advanced.config").write_text("[].\n")
        (self.base_dir / "enabled_plugins").write_text("[].\n")
        (self.base_dir / "rabbitmq-env.conf").write_text("")

    # -- CLI -------------------------------------------------------------------------------

    def ctl(self, *args: str, tool: str = "rabbitmqctl", timeout: float = _CLI_TIMEOUT) -> str:
        """Run a RabbitMQ CLI ``tool`` against this node; returns stdout, raises on failure.

        Example: ``node.ctl("list_queues", "name", "messages")``.
        """
        command = [str(self._sbin / tool), "-n", self.name, *args]
        try:
            result = subprocess.run(
                command,
                env=self._env(),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(
                f"{tool} {' '.join(args)} on {self.name}: no answer in {timeout}s"
            ) from exc
        if result.returncode != 0:
            raise CliError(
                result.returncode,
                f"{tool} {' '.join(args)} on {self.name} failed (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}",
            )
        return result.stdout

    def eval(self, expression: str) -> str:
        """Evaluate an Erlang ``expression`` on the node; returns what it printed."""
        return self.ctl("eval", expression).strip()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The node's OS pid while it runs, else None."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    @property
    def running(self) -> bool:
        """Whether the node's Erlang VM is running (booted or not)."""
        return self.pid is not None

    def os_pid(self) -> int:
        """Ask the running node for its OS pid (``os:getpid()``)."""
        return int(self.eval("os:getpid().").strip('"'))

    def start(self) -> RabbitNode:
        """Boot the node (``rabbitmq-server -detached``) and return once it is fully up.

        Raises RuntimeError, with the end of the node's log, if it does not come up within
        ``startup_timeout``; nothing is left running then.
        """
        if self.running:
            return self
        self._write_files()
        self.pid_file.unlink(missing_ok=True)  # a stale pid would fool `rabbitmqctl wait`
        with open(self.base_dir / "startup.log", "ab") as out:
            # Output to a file, never a pipe: the detached VM inherits it and would hold a
            # pipe open forever.
            launched = subprocess.run(
                [str(self._sbin / "rabbitmq-server"), "-detached"],
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                timeout=60,
                check=False,
            )
        try:
            if launched.returncode != 0:
                raise RuntimeError(f"rabbitmq-server -detached exited {launched.returncode}")
            self._await_boot()
        except RuntimeError as exc:
            self.kill()
            raise RuntimeError(
                f"RabbitMQ node {self.name} (port {self.port}) did not start: {exc}\n"
                f"--- last lines of its log ({self.log_dir}) ---\n{self.log_tail()}"
            ) from exc
        return self

    def _await_boot(self) -> None:
        try:
            # `wait` follows the pid file, then the VM, then the rabbit app: one CLI call.
            self.ctl(
                "wait",
                str(self.pid_file),
                "--timeout",
                str(int(self.startup_timeout)),
                timeout=self.startup_timeout + 30,
            )
            return
        except CliError as exc:
            if exc.returncode != _EX_USAGE:
                raise
        # A CLI without `wait`: poll await_startup, which fails at once while the node has
        # not even registered with epmd yet.
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                self.ctl("await_startup", "--timeout", "30", timeout=60)
                return
            except CliError:
                if time.monotonic() > deadline or (self.pid_file.exists() and not self.running):
                    raise
                time.sleep(1.0)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the node gracefully (``rabbitmqctl stop``); SIGKILL if it does not stop."""
        if not self.running:
            return
        # A node that will not stop politely is killed below; the CLI's complaint adds nothing.
        with contextlib.suppress(RuntimeError):
            self.ctl("stop", str(self.pid_file), timeout=timeout)
        if self.running:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM, as a crash would, and wait until it is gone."""
        pid = self.pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self) -> None:
        """Stop gracefully, then start again on the same data directory."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Kill the node if it runs and remove ``base_dir`` if this node created it."""
        self.kill()
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        with _allocated_lock:
            _allocated.difference_update((self.port, self.dist_port))
        _live_nodes.discard(self)

    def log_tail(self, lines: int = _LOG_TAIL) -> str:
        """The last ``lines`` lines of the node's log and startup output."""
        chunks = []
        for path in (self.log_dir / f"{self.name}.log", self.base_dir / "startup.log"):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                chunks.append(f"[{path.name}]\n" + "\n".join(text))
        return "\n".join(chunks) or "(no log written)"

    def __enter__(self) -> RabbitNode:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"RabbitNode({self.name!r}, port={self.port}, {state})"


@atexit.register
def _kill_leftovers() -> None:
    # A test run that dies before its fixtures clean up must not leave nodes running.
    for node in list(_live_nodes):
        with contextlib.suppress(Exception):
            node.cleanup()
