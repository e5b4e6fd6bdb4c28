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
and uses only the standard library, except ``RabbitNode(tls=True)``, which makes its
certificates with `trustme <https://trustme.readthedocs.io>`_ (in mqkit's ``test`` extra)::

    with RabbitNode("tls-it", tls=True) as node:   # an amqps listener on node.tls_port
        settings = mqkit.Settings(url=node.amqps_url, ca_file=node.ca_file)
        external = mqkit.Settings(                   # log in with the client certificate
            url=node.external_url, ca_file=node.ca_file,
            cert_file=node.cert_file, key_file=node.key_file, auth="external",
        )
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
from urllib.parse import quote

__all__ = ["CliError", "RabbitNode", "find_free_ports"]

_SBIN_ENV = "MQKIT_RABBITMQ_SBIN"
# Debian/Ubuntu packages put `su rabbitmq` wrappers in /usr/sbin; those reset HOME (and so
# the Erlang cookie) and need the data dirs to belong to `rabbitmq`. The real scripts, which
# run as the calling user with the environment given, live here.
_DEBIAN_SBIN = Path("/usr/lib/rabbitmq/bin")
_CLI_TIMEOUT = 120.0
_LOG_TAIL = 40
_EX_USAGE = 64  # what the CLI exits with for a command it does not know
# The user name in the TLS node's client certificate (its common name), which EXTERNAL
# authentication logs in as.
CLIENT_CERT_USER = "mqkit-client"

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

    ``tls=True`` adds an ``amqps`` listener on :attr:`tls_port` (a free port unless given),
    with a throwaway CA (:attr:`ca_file`) and a client certificate and key (:attr:`cert_file`,
    :attr:`key_file`) whose common name is :attr:`client_user`. The listener verifies a client
    certificate when one is sent, but does not require one (``guest`` still logs in with a
    password over TLS); EXTERNAL authentication (the ``rabbitmq_auth_mechanism_ssl`` plugin,
    user name from the certificate's common name) is on, and :attr:`client_user` exists with
    full permissions on ``/`` and no password.

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
        tls: bool = False,
        tls_port: int | None = None,
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
        self.tls = tls
        if tls and tls_port is None:
            tls_port = find_free_ports(dist_offset=0)
        self._tls_port = tls_port
        self._sbin = _sbin()
        _live_nodes.add(self)

    # -- paths and environment ------------------------------------------------------------

    @property
    def url(self) -> str:
        """``amqp://guest:guest@127.0.0.1:<port>/`` (the default vhost)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def tls_port(self) -> int:
        """The ``amqps`` listener's port (``tls=True`` only)."""
        if self._tls_port is None:
            raise RuntimeError(f"{self.name} has no TLS listener: make it with tls=True")
        return self._tls_port

    @property
    def amqps_url(self) -> str:
        """``amqps://guest:guest@127.0.0.1:<tls_port>/``: TLS, password login."""
        return f"amqps://guest:guest@127.0.0.1:{self.tls_port}/"

    @property
    def external_url(self) -> str:
        """``amqps://127.0.0.1:<tls_port>/``: TLS without user, for EXTERNAL authentication."""
        return f"amqps://127.0.0.1:{self.tls_port}/"

    @property
    def tls_dir(self) -> Path:
        """Where the CA, server and client certificates and keys are (``tls=True``)."""
        return self.base_dir / "tls"

    @property
    def ca_file(self) -> str:
        """The CA certificate that signed the node's and the client's certificates."""
        return str(self.tls_dir / "ca.pem")

    @property
    def cert_file(self) -> str:
        """The client certificate (common name :attr:`client_user`), PEM."""
        return str(self.tls_dir / "client-cert.pem")

    @property
    def key_file(self) -> str:
        """The client certificate's private key, PEM, not encrypted."""
        return str(self.tls_dir / "client-key.pem")

    @property
    def client_user(self) -> str:
        """The user EXTERNAL authentication logs in as with :attr:`cert_file`."""
        return CLIENT_CERT_USER

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
        config = (
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = true\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )
        plugins = "[]"
        if self.tls:
            self._write_certificates()
            tls = self.tls_dir
            config += (
                f"listeners.ssl.1 = 127.0.0.1:{self.tls_port}\n"
                f"ssl_options.cacertfile = {tls / 'ca.pem'}\n"
                f"ssl_options.certfile = {tls / 'server-cert.pem'}\n"
                f"ssl_options.keyfile = {tls / 'server-key.pem'}\n"
                "ssl_options.verify = verify_peer\n"
                "ssl_options.fail_if_no_peer_cert = false\n"
                "auth_mechanisms.1 = PLAIN\n"
                "auth_mechanisms.2 = AMQPLAIN\n"
                "auth_mechanisms.3 = EXTERNAL\n"
                "ssl_cert_login_from = common_name\n"
            )
            plugins = "[rabbitmq_auth_mechanism_ssl]"
        (self.base_dir / "rabbitmq.conf").write_text(config)
        (self.base_dir / "advanced.config").write_text("[].\n")
        (self.base_dir / "enabled_plugins").write_text(f"{plugins}.\n")
        (self.base_dir / "rabbitmq-env.conf").write_text("")

    def _write_certificates(self) -> None:
        """A CA, the node's certificate (127.0.0.1, localhost) and a client certificate, once."""
        if (self.tls_dir / "ca.pem").exists():
            return  # a restart keeps the certificates a test may hold already
        try:
            import trustme
        except ImportError as exc:  # pragma: no cover - trustme is in the test extra
            raise RuntimeError(
                "RabbitNode(tls=True) makes its certificates with trustme: "
                "pip install trustme (or mqkit[test])"
            ) from exc
        self.tls_dir.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA(organization_name="mqkit test CA")
        server = ca.issue_cert("127.0.0.1", "localhost", common_name="localhost")
        client = ca.issue_cert(f"{CLIENT_CERT_USER}@example.invalid", common_name=CLIENT_CERT_USER)
        ca.cert_pem.write_to_path(str(self.tls_dir / "ca.pem"))
        ca.private_key_pem.write_to_path(str(self.tls_dir / "ca-key.pem"))
        server.cert_chain_pems[0].write_to_path(str(self.tls_dir / "server-cert.pem"))
        server.private_key_pem.write_to_path(str(self.tls_dir / "server-key.pem"))
        client.cert_chain_pems[0].write_to_path(str(self.tls_dir / "client-cert.pem"))
        client.private_key_pem.write_to_path(str(self.tls_dir / "client-key.pem"))
        for path in self.tls_dir.iterdir():
            path.chmod(0o600)

    def issue_client_cert(self, common_name: str) -> tuple[str, str]:
        """A new client certificate signed by the node's CA, for user ``common_name`` (with
        EXTERNAL, the broker logs it in as that user, if it exists): ``(cert_file,
        key_file)``, in :attr:`tls_dir`. The node must have been started once."""
        import trustme

        ca = trustme.CA.from_pem(
            (self.tls_dir / "ca.pem").read_bytes(), (self.tls_dir / "ca-key.pem").read_bytes()
        )
        leaf = ca.issue_cert(f"{common_name}@example.invalid", common_name=common_name)
        stem = secrets.token_hex(4)
        cert, key = self.tls_dir / f"{stem}-cert.pem", self.tls_dir / f"{stem}-key.pem"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        key.chmod(0o600)
        return str(cert), str(key)

    # -- users -----------------------------------------------------------------------------

    def add_user(
        self,
        name: str,
        password: str | None,
        *,
        configure: str = ".*",
        write: str = ".*",
        read: str = ".*",
        vhost: str = "/",
        tags: tuple[str, ...] = (),
    ) -> str:
        """Create user ``name`` with permissions on ``vhost`` (regular expressions over entity
        names, as ``rabbitmqctl set_permissions`` takes them: ``""`` allows nothing) and
        return its ``amqp://`` URL (credentials percent-encoded). ``password=None``: no
        password at all (the user can only log in with EXTERNAL). Running node only.

        Example, a user that may use but not declare queues whose names start with
        ``orders``: ``url = node.add_user("svc", "pw", configure="", write="^orders",
        read="^orders")``.
        """
        self.ctl("add_user", name, password if password is not None else secrets.token_hex(16))
        if password is None:
            self.ctl("clear_password", name)
        self.ctl("set_permissions", "-p", vhost, name, configure, write, read)
        if tags:
            self.ctl("set_user_tags", name, *tags)
        path = "" if vhost == "/" else quote(vhost, safe="")
        secret = "" if password is None else ":" + quote(password, safe="")
        return f"amqp://{quote(name, safe='')}{secret}@127.0.0.1:{self.port}/{path}"

    def delete_user(self, name: str) -> None:
        """Delete user ``name`` (its connections are closed by the broker)."""
        self.ctl("delete_user", name)

    def _ensure_client_user(self) -> None:
        users = self.ctl("list_users", "--quiet", "--no-table-headers")
        if not any(line.split()[:1] == [CLIENT_CERT_USER] for line in users.splitlines()):
            self.add_user(CLIENT_CERT_USER, None)

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
            if self.tls:
                self._ensure_client_user()
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
            if self._tls_port is not None:
                _allocated.discard(self._tls_port)
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
        tls = f", tls_port={self._tls_port}" if self._tls_port is not None else ""
        return f"RabbitNode({self.name!r}, port={self.port}{tls}, {state})"


@atexit.register
def _kill_leftovers() -> None:
    # A test run that dies before its fixtures clean up must not leave nodes running.
    for node in list(_live_nodes):
        with contextlib.suppress(Exception):
            node.cleanup()
