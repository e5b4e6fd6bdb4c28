"""Fixtures every test may use: the broker URL (never skipped), unique names, a plain pika
client, ``rabbitmqctl`` for the test broker, and broker hygiene every test gets for free.

Broker hygiene: every test leaves the broker as it found it, checked after every test.

- ``names`` hands out names under a prefix of the test's own (``<session>-<test>-q1`` ...).
- Every :class:`mqkit.Client` and :class:`mqkit.AsyncClient` made while a test runs is
  remembered, and so is what it declared (``client.topology``: work queues, retry tiers,
  DLQs, bus queues, exchanges).
- A test that uses the broker runs with ``MQKIT_SERVICE`` set to a service of its own, so a
  client (or a child process) that names no service keeps its retry tiers
  (``<service>.retries.<n>ms``, shared by a service's consumers) in the test's names.
- When the test ends (after all its other fixtures), every queue and exchange of the suite's
  namespace that its clients declared or its ``names`` handed out (with the DLQ mqkit derives
  from such a queue name, and the default policy's retry tiers of such a service) and that
  still exists is deleted; then each is checked gone with a passive declare. Plain AMQP, so
  this works on any broker URL. A test whose entities cannot be deleted, or whose clients
  declared something outside the suite's namespace that is still there, fails.
- A sampler lists the broker's queues every few seconds (``rabbitmqctl``, see
  :class:`BrokerCtl`), and at the end of the session everything whose name starts with the
  session prefix is listed: what is there was left by a test the per-test cleanup could not
  see (a subprocess declared it under a name of its own making). The terminal summary names
  that test and the session fails; the leftovers are deleted. The summary also prints the
  peak number of the session's queues alive at once; reaching ``MQKIT_TEST_MAX_QUEUES``
  (default 40) fails the session too.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pika
import pika.exceptions
import pytest

from mqkit.testing.pytest_plugin import find_broker

SESSION_PREFIX = f"mqkit-test-{uuid.uuid4().hex[:8]}"
MAX_QUEUES = int(os.environ.get("MQKIT_TEST_MAX_QUEUES") or 40)
SAMPLE_SECONDS = float(os.environ.get("MQKIT_TEST_SAMPLE_SECONDS") or 5)


# MQKIT_TEST_URL=memory://NAME: the suite runs on mqkit's in-memory broker (make test's
# memory pass). Clients are given the memory URL; raw pika gets the broker's loopback URL.
MEMORY_URL = (
    os.environ["MQKIT_TEST_URL"].strip()
    if os.environ.get("MQKIT_TEST_URL", "").strip().lower().startswith("memory://")
    else None
)


def memory_broker() -> Any:
    """The in-memory broker of a memory pass (None on a RabbitMQ pass)."""
    if MEMORY_URL is None:
        return None
    from mqkit.testing.memory import memory_broker as get
    from mqkit.urls import memory_name

    return get(memory_name(MEMORY_URL) or "")


def _find_broker() -> Iterator[str]:
    """The memory broker on a memory pass; else MQKIT_TEST_URL, else localhost:5672, else
    testcontainers (failing, never skipping, when none answers)."""
    if MEMORY_URL is not None:
        yield memory_broker().amqp_url
        return
    yield from find_broker()  # mqkit's pytest plugin: the same search a user's tests get


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    """The URL of a real broker: MQKIT_TEST_URL, else localhost:5672, else testcontainers
    (the memory broker's loopback URL on a memory pass).

    Fails (never skips) when none can be had. While it is in use, :data:`HYGIENE` watches
    the broker for the session (the sampler, the end-of-session listing).
    """
    for url in _find_broker():
        _check_version(url)
        HYGIENE.attach(url)
        try:
            yield url
        finally:
            HYGIENE.detach()


def broker_version(url: str) -> str:
    """The broker's product and version, as it announces them (``RabbitMQ 4.0.5``)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        props = connection._impl.server_properties or {}  # type: ignore[attr-defined]
    finally:
        connection.close()

    def text(value: object) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    return f"{text(props.get('product', 'AMQP broker'))} {text(props.get('version', '?'))}"


def _check_version(url: str) -> None:
    """``MQKIT_TEST_EXPECT_VERSION`` (e.g. ``4.``): fail unless the broker's version starts
    with it, so a run meant for RabbitMQ 4 never passes on another broker unnoticed."""
    expected = os.environ.get("MQKIT_TEST_EXPECT_VERSION", "").strip()
    found = broker_version(url)
    HYGIENE.version = found
    if expected and not found.split()[-1].startswith(expected):
        pytest.fail(
            f"this run is meant for RabbitMQ {expected}x (MQKIT_TEST_EXPECT_VERSION={expected}),"
            f" but the test broker at {_masked(url)} is {found}: "
            "check MQKIT_TEST_URL (a URL that does not answer falls back to localhost:5672)",
            pytrace=False,
        )


def _masked(url: str) -> str:
    """``url`` with its password as ``***``."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


# -- names ---------------------------------------------------------------------------------


class Names:
    """Unique entity names for one test; every name starts with the test's :attr:`base`,
    which starts with the session prefix. What it hands out is deleted after the test."""

    def __init__(self) -> None:
        self.base = f"{SESSION_PREFIX}-{uuid.uuid4().hex[:6]}"
        self.queues: set[str] = set()
        self.exchanges: set[str] = set()
        self.services: set[str] = set()
        self._n = 0

    def _next(self, kind: str) -> str:
        self._n += 1
        return f"{self.base}-{kind}{self._n}"

    def queue(self) -> str:
        name = self._next("q")
        self.queues.add(name)
        return name

    def exchange(self) -> str:
        name = self._next("x")
        self.exchanges.add(name)
        return name

    def service(self) -> str:
        """A service name: the bus queues of its subscriptions (``<service>.<event>``) start
        with the test's prefix too."""
        name = self._next("svc")
        self.services.add(name)
        return name


@pytest.fixture
def names(broker_url: str) -> Names:
    """Unique names; after the test, everything under its prefix is deleted (see the module
    docstring), including retry queues, DLQs, bus queues and exchanges mqkit derived."""
    made = Names()
    HYGIENE.test_names(made)
    return made


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- rabbitmqctl for the test broker -------------------------------------------------------


class BrokerCtl:
    """``rabbitmqctl`` for the test broker: the command line in ``MQKIT_TEST_CTL`` (for the
    RabbitMQ 4 node of ``scripts/rabbitmq4.sh``: ``bash scripts/rabbitmq4.sh ctl``), else
    ``rabbitmqctl`` on PATH. It is used only once it has been seen listing the test broker's
    queues (a canary queue declared over AMQP must be in its listing): a ``rabbitmqctl`` that
    talks to another node on this machine would list, and close, the wrong things.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        if MEMORY_URL is not None:
            self.command = ["rabbitmqctl"]
            self.problem = None
            return
        configured = os.environ.get("MQKIT_TEST_CTL", "").strip()
        self.command = shlex.split(configured) if configured else ["rabbitmqctl"]
        self.problem: str | None = self._check(configured)

    def _check(self, configured: str) -> str | None:
        if shutil.which(self.command[0]) is None:
            return f"`{self.command[0]}` is not installed here"
        canary = f"{SESSION_PREFIX}-ctl-canary-{uuid.uuid4().hex[:4]}"
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            connection.channel().queue_declare(canary, exclusive=True)
            try:
                listed = self.list("queues", check=False)
            except (OSError, subprocess.SubprocessError) as exc:
                return f"`{shlex.join(self.command)} list_queues` failed: {exc}"
        finally:
            connection.close()
        if canary in listed:
            return None
        how = "MQKIT_TEST_CTL" if configured else "rabbitmqctl on PATH (MQKIT_TEST_CTL unset)"
        return f"{how} does not list the queues of the test broker (another node?)"

    @property
    def usable(self) -> bool:
        return self.problem is None

    def require(self) -> None:
        """Fail the test, saying what to set, when there is no rabbitmqctl for the broker."""
        if self.problem is not None:
            pytest.fail(
                f"this test needs rabbitmqctl for the broker at {_masked(self.url)}, but "
                f"{self.problem}. Set MQKIT_TEST_CTL (MQKIT_TEST_CTL4 for make test's RabbitMQ 4 "
                "pass) to a command that runs rabbitmqctl against that broker, e.g. "
                "'bash scripts/rabbitmq4.sh ctl' for the node that script starts, or "
                "'docker exec CONTAINER rabbitmqctl'.",
                pytrace=False,
            )

    def run(self, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        """Run ``rabbitmqctl ARGS`` against the test broker; its stdout."""
        if MEMORY_URL is not None:
            return _memory_ctl(*args)
        if check:
            self.require()
        result = subprocess.run(
            [*self.command, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"`{shlex.join([*self.command, *args])}` exited {result.returncode}: "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result.stdout

    def list(self, kind: str, *, check: bool = True) -> list[str]:
        """Names of every ``queues`` / ``exchanges`` of the default vhost."""
        out = self.run("-q", "--no-table-headers", f"list_{kind}", "name", check=check)
        return [line.strip() for line in out.splitlines() if line.strip()]


def _memory_ctl(*args: str) -> str:
    """The few ``rabbitmqctl`` commands the suite uses, answered by the memory broker."""
    command, *columns = [a for a in args if not a.startswith("-")]
    broker = memory_broker()
    if command == "list_queues":
        counts = broker.queues()
        arguments = dict(broker.iter_queues())

        def column(name: str, c: str) -> str:
            if c == "messages":
                return str(counts[name])
            if c == "arguments":  # as rabbitmqctl prints them: [{"k","v"},{"k",200},{"k",[]}]
                pairs = [
                    (k, str(v) if isinstance(v, int) else f'"{v}"' if v else "[]")
                    for k, v in arguments[name].items()
                ]
                return "[" + ",".join(f'{{"{k}",{v}}}' for k, v in pairs) + "]"
            return name if c == "name" else ""

        rows = [[column(name, c) for c in columns] for name in counts]
    elif command == "list_exchanges":
        rows = [[name] for name in broker.exchanges()]
    elif command == "list_connections":
        rows = [
            [str(i) if c == "pid" else name if c == "client_properties" else "" for c in columns]
            for i, name in broker.connections().items()
        ]
    elif command == "close_connection":
        broker.close_connection(int(columns[0]), columns[1] if len(columns) > 1 else "closed")
        rows = []
    else:
        raise AssertionError(f"rabbitmqctl {command} is not modelled by the memory broker")
    return "".join("\t".join(row) + "\n" for row in rows)


@pytest.fixture(scope="session")
def broker_ctl(broker_url: str) -> BrokerCtl:
    """``rabbitmqctl`` for the test broker (``broker_ctl.run("list_connections", ...)``);
    a test that uses it fails with what to set when there is none for that broker."""
    assert HYGIENE.ctl is not None
    return HYGIENE.ctl


# -- broker hygiene ------------------------------------------------------------------------


def _consumer_queue_names(queue: str) -> list[str]:
    """The queues mqkit derives from a work queue (its DLQ), and the queue itself."""
    from mqkit.retry import DEFAULT_POLICY
    from mqkit.topology import Queue, consumer_topology

    derived = consumer_topology(
        Queue(queue), DEFAULT_POLICY, default_type="quorum", delivery_limit=20
    )
    return [q.name for q in derived]


def _retry_tier_names(service: str) -> list[str]:
    """The retry tiers of ``service`` under the default policy (an exchange and a queue of
    each name): what a child process declares for a service a test handed it."""
    from mqkit.retry import DEFAULT_POLICY
    from mqkit.topology import retry_tier_name

    return [retry_tier_name(service, delay) for delay in DEFAULT_POLICY.tiers]


def _in_suite(name: str) -> bool:
    """A name of this session: made by ``names`` (or from a test's ``names.base``, like the
    demo's ``demo-<base>.*``)."""
    return SESSION_PREFIX in name


def _shared(name: str) -> bool:
    """Names no test owns: the default exchange and the broker's own ``amq.*``."""
    return name == "" or name.startswith("amq.")


@dataclass
class _Test:
    """What one test made: clients (whose topology is read afterwards) and names."""

    nodeid: str
    clients: list[Any] = field(default_factory=list)
    names: list[Names] = field(default_factory=list)


class Hygiene:
    """The session's broker bookkeeping (one instance: :data:`HYGIENE`)."""

    def __init__(self) -> None:
        self.url: str | None = None
        self.version = ""
        self.ctl: BrokerCtl | None = None
        self.current: _Test | None = None
        self.owners: dict[str, str] = {}  # a test's names.base -> its node id
        self.node_ports: set[int] = set()  # of RabbitNodes tests started of their own
        self.peak = 0  # most of the session's queues alive at once, and when
        self.peak_at = ""
        self.samples = 0
        self.tests_checked = 0
        self.seconds = 0.0  # spent cleaning up after tests
        self.leftovers: dict[str, list[str]] = {}  # test -> what it left, found by listing
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- session -------------------------------------------------------------------------

    def attach(self, url: str) -> None:
        self.url = url
        self.ctl = BrokerCtl(url)
        if self.ctl.usable and SAMPLE_SECONDS > 0:
            self._sampler = threading.Thread(target=self._sample, name="queue-sampler", daemon=True)
            self._sampler.start()

    def detach(self) -> None:
        """End of session: stop sampling; list, report and delete what is left."""
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join(60)
        if self.url is not None and self.ctl is not None and self.ctl.usable:
            queues = [n for n in self.ctl.list("queues") if _in_suite(n)]
            exchanges = [n for n in self.ctl.list("exchanges") if _in_suite(n)]
            for name in [*queues, *exchanges]:
                self.leftovers.setdefault(self._owner(name), []).append(name)
            _delete(self.url, queues, exchanges)
        self.url = None

    def _owner(self, name: str) -> str:
        for base, nodeid in self.owners.items():
            if base in name:
                return nodeid
        return "(no test's names: a name made from the session prefix by hand)"

    def _record(self, count: int, where: str) -> None:
        with self._lock:
            if count > self.peak:
                self.peak, self.peak_at = count, where

    def _sample(self) -> None:
        assert self.ctl is not None
        while not self._stop.wait(SAMPLE_SECONDS):
            try:
                count = sum(1 for n in self.ctl.list("queues", check=False) if _in_suite(n))
            except (OSError, subprocess.SubprocessError):
                continue
            self.samples += 1
            current = self.current
            self._record(count, f"sampled during {current.nodeid if current else 'a teardown'}")

    # -- one test ------------------------------------------------------------------------

    def begin(self, nodeid: str) -> None:
        self.current = _Test(nodeid)

    def client_made(self, client: Any) -> None:
        if self.current is not None:
            self.current.clients.append(client)

    def node_made(self, node: Any) -> None:
        self.node_ports.update(p for p in (node.port, getattr(node, "_tls_port", None)) if p)

    def _on_test_broker(self, client: Any) -> bool:
        """Whether ``client`` talks to the test broker (directly or through a FaultProxy),
        not to a node a test started of its own."""
        try:
            urls = list(client.settings.all_urls)
            ports = {urlsplit(url).port for url in urls}
        except Exception:
            return True
        if any(u.lower().startswith("memory://") for u in urls):
            return MEMORY_URL is not None and MEMORY_URL in urls  # a memory broker of its own
        return not ports <= self.node_ports

    def test_names(self, made: Names) -> None:
        if self.current is not None:
            self.current.names.append(made)
            self.owners[made.base] = self.current.nodeid

    def end(self) -> str | None:
        """Delete what the test that just ended declared; what is wrong, or None."""
        started = time.monotonic()
        try:
            return self._end()
        finally:
            self.seconds += time.monotonic() - started

    def _end(self) -> str | None:
        test, self.current = self.current, None
        if test is None or self.url is None or not (test.clients or test.names):
            return None
        queues: dict[str, None] = {}
        exchanges: dict[str, None] = {}
        for made in test.names:
            for queue in sorted(made.queues):
                queues.update(dict.fromkeys(_consumer_queue_names(queue)))
            exchanges.update(dict.fromkeys(sorted(made.exchanges)))
            for service in sorted(made.services):
                queues.update(dict.fromkeys(_retry_tier_names(service)))
                exchanges.update(dict.fromkeys(_retry_tier_names(service)))
        for client in test.clients:
            if not self._on_test_broker(client):
                continue
            for entity in _topology(client):
                kind = type(entity).__name__
                if kind == "Queue" and not entity.exclusive:
                    queues[entity.name] = None
                elif kind == "Exchange":
                    exchanges[entity.name] = None
        queues = {n: None for n in queues if not _shared(n)}
        exchanges = {n: None for n in exchanges if not _shared(n)}
        if not queues and not exchanges:
            return None
        self.tests_checked += 1
        problems = []
        with _Broker(self.url) as broker:
            alive_queues = [n for n in queues if broker.exists("queue", n)]
            alive_exchanges = [n for n in exchanges if broker.exists("exchange", n)]
            self._record(sum(1 for n in alive_queues if _in_suite(n)), f"end of {test.nodeid}")
            outside = [n for n in [*alive_queues, *alive_exchanges] if not _in_suite(n)]
            if outside:
                problems.append(
                    f"it declared {outside} outside the suite's names, and left them on the "
                    "broker: take names from the `names` fixture (names.queue(), "
                    "names.exchange(), names.service()) so they are deleted afterwards"
                )
            for name in alive_queues:
                if _in_suite(name):
                    broker.delete("queue", name)
            for name in alive_exchanges:
                if _in_suite(name):
                    broker.delete("exchange", name)
            kept = [n for n in alive_queues if _in_suite(n) and broker.exists("queue", n)]
            kept += [n for n in alive_exchanges if _in_suite(n) and broker.exists("exchange", n)]
        if kept:
            problems.append(f"these could not be deleted after it: {kept}")
        if not problems:
            return None
        message = f"{test.nodeid} does not leave the broker as it found it: " + "; ".join(problems)
        self.problems.append(message)
        return message

    # -- report --------------------------------------------------------------------------

    def failed(self) -> bool:
        return bool(self.leftovers or self.problems) or self.peak >= MAX_QUEUES

    def summary(self) -> list[str]:
        lines: list[str] = []
        if self.ctl is None:
            return lines
        lines.append(f"broker: {self.version}")
        sampled = (
            f"{self.samples} listing(s), one every {SAMPLE_SECONDS:g}s"
            if self.ctl.usable
            else f"no listing: {self.ctl.problem}; set MQKIT_TEST_CTL"
        )
        lines.append(
            f"peak queues of this session alive at once: {self.peak} (limit {MAX_QUEUES}; "
            f"{self.peak_at or 'none seen'}); from {self.tests_checked} test cleanup(s) "
            f"({self.seconds:.1f}s in all) and {sampled}"
        )
        if self.peak >= MAX_QUEUES:
            lines.append(
                f"FAILED: {self.peak} queues alive at once reaches MQKIT_TEST_MAX_QUEUES="
                f"{MAX_QUEUES}: a test (or its neighbours) keeps too many queues"
            )
        for problem in self.problems:
            lines.append(f"FAILED: {problem}")
        for owner, left in sorted(self.leftovers.items()):
            lines.append(
                f"FAILED: {owner} left {len(left)} queue(s)/exchange(s) the per-test cleanup "
                f"could not see (deleted now): {sorted(left)}"
            )
        if self.ctl.usable and not self.leftovers:
            lines.append(f"nothing of this session (*{SESSION_PREFIX}-*) is left on the broker")
        return lines


def _topology(client: Any) -> tuple[Any, ...]:
    try:
        return tuple(client.topology)
    except Exception:  # a client whose construction failed half-way
        return ()


class _NotFromThisThread(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread


class _Broker:
    """One plain AMQP connection for existence checks (passive declares) and deletes."""

    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        # A passive declare of a missing entity closes the channel, which pika logs as a
        # WARNING: not news here, and noise in a failing test's captured log.
        self._quiet = _NotFromThisThread()

    def __enter__(self) -> _Broker:
        logging.getLogger("pika.channel").addFilter(self._quiet)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.connection.is_open:
                self.connection.close()
        finally:
            logging.getLogger("pika.channel").removeFilter(self._quiet)

    def _call(self, action: Callable[[Any], object]) -> int:
        """0 when ``action(channel)`` succeeds, else the broker's reply code."""
        if not self.channel.is_open:
            self.channel = self.connection.channel()
        try:
            action(self.channel)
        except pika.exceptions.ChannelClosedByBroker as exc:
            return int(exc.reply_code)
        return 0

    def exists(self, kind: str, name: str) -> bool:
        if kind == "queue":
            code = self._call(lambda ch: ch.queue_declare(name, passive=True))
        else:
            code = self._call(lambda ch: ch.exchange_declare(name, passive=True))
        return code != 404  # 405: an exclusive queue of a connection still open

    def delete(self, kind: str, name: str) -> None:
        if kind == "queue":
            self._call(lambda ch: ch.queue_delete(name))
        else:
            self._call(lambda ch: ch.exchange_delete(name))


def _delete(url: str, queues: Iterable[str], exchanges: Iterable[str]) -> None:
    queues, exchanges = list(queues), list(exchanges)
    if not queues and not exchanges:
        return
    with _Broker(url) as broker:
        for name in queues:
            broker.delete("queue", name)
        for name in exchanges:
            broker.delete("exchange", name)


def delete_entities(url: str, queues: list[str], exchanges: list[str]) -> None:
    """Delete these queues and exchanges (missing ones are fine)."""
    _delete(url, queues, exchanges)


HYGIENE = Hygiene()


@pytest.fixture(scope="session", autouse=True)
def _track_clients() -> Iterator[None]:
    """Remember every mqkit client made during a test (its topology is read afterwards),
    and the ports of RabbitMQ nodes tests start of their own (their clients are not ours)."""
    import mqkit
    from mqkit.testing import RabbitNode

    def tracking(original: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(original)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            HYGIENE.client_made(self)

        return __init__

    def tracking_nodes(original: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(original)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            HYGIENE.node_made(self)

        return __init__

    with pytest.MonkeyPatch.context() as patch:
        for cls in (mqkit.Client, mqkit.AsyncClient):
            patch.setattr(cls, "__init__", tracking(cls.__init__))
        patch.setattr(RabbitNode, "__init__", tracking_nodes(RabbitNode.__init__))
        yield


@pytest.fixture(autouse=True)
def _leave_the_broker_clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test (and all its other fixtures): delete what it declared, check it is
    gone, and fail the test when something stays."""
    HYGIENE.begin(request.node.nodeid)
    yield
    problem = HYGIENE.end()
    if problem is not None:
        pytest.fail(problem, pytrace=False)


@pytest.fixture(autouse=True)
def _service_of_its_own(
    request: pytest.FixtureRequest, _leave_the_broker_clean: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test that uses the broker runs with ``MQKIT_SERVICE`` set to a service of its own
    (one of its names): the retry tiers of a client that names no service are then the
    test's, and deleted after it, never shared with another test or left behind."""
    if "broker_url" not in request.fixturenames:
        return
    made = Names()
    HYGIENE.test_names(made)
    monkeypatch.setenv("MQKIT_SERVICE", made.service())


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "rabbitmq_only(reason): needs a real RabbitMQ, for the reason given; a memory pass "
        "(MQKIT_TEST_URL=memory://NAME) leaves it out and lists it with that reason",
    )
    config.addinivalue_line(
        "markers",
        "broker: uses the test broker (set automatically on a test that uses broker_url, "
        "directly or through names, raw, rt...)",
    )
    config.addinivalue_line(
        "markers",
        "own_nodes: runs on RabbitMQ nodes of its own started from the local install, not on "
        "the test broker (set automatically on a test whose code or fixtures make a "
        "RabbitNode or RabbitCluster)",
    )


_NODE_CLASSES = {"RabbitNode", "RabbitCluster"}


def _starts_nodes(item: pytest.Item) -> bool:
    """Whether the test, or a fixture it uses, makes a RabbitNode or RabbitCluster (it names
    one of them in its code)."""
    functions = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    for name, defs in info.name2fixturedefs.items() if info is not None else ():
        if name != "_track_clients":  # names RabbitNode to watch for nodes, makes none
            functions += [d.func for d in defs]
    for function in functions:
        code = getattr(inspect.unwrap(function), "__code__", None) if function else None
        if code is not None and _NODE_CLASSES & set(code.co_names):
            return True
    return False


# On a memory pass: the tests left out, and why (printed in the terminal summary).
NOT_MODELLED: list[tuple[str, str]] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "broker_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.broker)
        if _starts_nodes(item):
            item.add_marker(pytest.mark.own_nodes)
    if MEMORY_URL is None:
        return
    kept, left_out = [], []
    for item in items:
        marker = item.get_closest_marker("rabbitmq_only")
        if marker is None:
            kept.append(item)
            continue
        left_out.append(item)
        reason = marker.kwargs.get("reason") or (marker.args[0] if marker.args else "")
        NOT_MODELLED.append((item.nodeid, reason or "(no reason given)"))
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if HYGIENE.failed() and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if NOT_MODELLED:
        terminalreporter.section("left out: not modelled by the memory broker")
        for nodeid, reason in NOT_MODELLED:
            terminalreporter.write_line(f"{nodeid}: {reason}")
        terminalreporter.write_line(
            "(and every test that starts RabbitMQ nodes of its own: marker own_nodes, not "
            "selected by make test-memory)"
        )
    lines = HYGIENE.summary()
    if lines:
        terminalreporter.section("broker hygiene")
        for line in lines:
            terminalreporter.write_line(line)


# -- a plain pika client -------------------------------------------------------------------


class Raw:
    """A plain pika client for tests to look at the broker behind mqkit's back."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _channel(self) -> tuple[pika.BlockingConnection, object]:
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        return connection, connection.channel()

    def count(self, queue: str) -> int:
        """Messages ready in ``queue`` (passive declare)."""
        connection, channel = self._channel()
        try:
            return int(channel.queue_declare(queue, passive=True).method.message_count)  # type: ignore[attr-defined]
        finally:
            connection.close()

    def exists(self, queue: str) -> bool:
        connection, channel = self._channel()
        try:
            channel.queue_declare(queue, passive=True)  # type: ignore[attr-defined]
            return True
        except pika.exceptions.ChannelClosedByBroker:
            return False
        finally:
            if connection.is_open:
                connection.close()

    def publish(
        self,
        routing_key: str,
        body: bytes,
        *,
        exchange: str = "",
        properties: pika.BasicProperties | None = None,
    ) -> None:
        """Publish with a confirm (as any non-mqkit service might)."""
        connection, channel = self._channel()
        try:
            channel.confirm_delivery()  # type: ignore[attr-defined]
            channel.basic_publish(  # type: ignore[attr-defined]
                exchange,
                routing_key,
                body,
                properties
                or pika.BasicProperties(content_type="application/json", delivery_mode=2),
                mandatory=True,
            )
        finally:
            connection.close()

    def drain(
        self, queue: str, limit: int = 10_000
    ) -> list[tuple[object, pika.BasicProperties, bytes]]:
        """Take (and ack) every message in ``queue``."""
        connection, channel = self._channel()
        out = []
        try:
            while len(out) < limit:
                method, props, body = channel.basic_get(queue, auto_ack=True)  # type: ignore[attr-defined]
                if method is None:
                    break
                out.append((method, props, body))
        finally:
            connection.close()
        return out


@pytest.fixture
def raw(broker_url: str) -> Raw:
    """A plain pika client on the test broker."""
    return Raw(broker_url)
