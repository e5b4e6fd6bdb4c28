"""Parity: the sync and async twins have the same public surface.

No broker needed; it lives with the behaviour suite because it imports both shells.
"""

from __future__ import annotations

import inspect

import pytest

import mqkit

TWINS = [
    (mqkit.Client, mqkit.AsyncClient),
    (mqkit.Producer, mqkit.AsyncProducer),
    (mqkit.Consumer, mqkit.AsyncConsumer),
    (mqkit.EventBus, mqkit.AsyncEventBus),
    (mqkit.DeadLetterQueue, mqkit.AsyncDeadLetterQueue),
]
IDS = [sync.__name__ for sync, _ in TWINS]

# The public API (README) and docs/SHELL_CONTRACT.md surface each pair must have.
REQUIRED = {
    "Client": {
        "declare",
        "producer",
        "consumer",
        "event_bus",
        "request",
        "responder",
        "dead_letters",
        "run",
        "stop",
        "close",
        "health",
        "settings",
        "topology",
    },
    "Producer": {"publish", "publish_many"},
    "Consumer": {"start", "stop", "run"},
    "EventBus": {"subscribe", "publish", "start", "stop", "run"},
    "DeadLetterQueue": {"count", "peek", "replay", "purge", "export"},
}

# Methods that talk to the broker (or wait for something that does): coroutine functions on
# the async side.
IO_METHODS = {
    "Client": {"declare", "request", "run", "close"},
    "Producer": {"publish", "publish_many"},
    "Consumer": {"start", "stop", "run"},
    "EventBus": {"publish", "start", "stop", "run"},
    "DeadLetterQueue": {"count", "peek", "replay", "purge", "export"},
}


def public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def is_property(cls: type, name: str) -> bool:
    return isinstance(inspect.getattr_static(cls, name), property)


def parameters(function) -> list[tuple[str, object, object]]:
    signature = inspect.signature(function)
    return [(p.name, p.kind, p.default) for p in signature.parameters.values() if p.name != "self"]


@pytest.mark.parametrize(("sync", "async_"), TWINS, ids=IDS)
def test_required_names_exist(sync, async_):
    missing_sync = REQUIRED[sync.__name__] - public(sync)
    missing_async = REQUIRED[sync.__name__] - public(async_)
    assert not missing_sync, f"{sync.__name__} lacks {sorted(missing_sync)}"
    assert not missing_async, f"{async_.__name__} lacks {sorted(missing_async)}"


@pytest.mark.parametrize(("sync", "async_"), TWINS, ids=IDS)
def test_same_public_names_both_ways(sync, async_):
    only_sync = public(sync) - public(async_)
    only_async = public(async_) - public(sync)
    assert not only_sync, f"on {sync.__name__} but not {async_.__name__}: {sorted(only_sync)}"
    assert not only_async, f"on {async_.__name__} but not {sync.__name__}: {sorted(only_async)}"


@pytest.mark.parametrize(("sync", "async_"), TWINS, ids=IDS)
def test_properties_and_methods_match(sync, async_):
    for name in sorted(public(sync) & public(async_)):
        assert is_property(sync, name) == is_property(async_, name), name
        sync_attr = inspect.getattr_static(sync, name)
        async_attr = inspect.getattr_static(async_, name)
        assert callable(sync_attr) == callable(async_attr), name


@pytest.mark.parametrize(("sync", "async_"), TWINS, ids=IDS)
def test_io_methods_are_coroutines_on_the_async_side(sync, async_):
    for name in sorted(IO_METHODS[sync.__name__]):
        assert not inspect.iscoroutinefunction(getattr(sync, name)), f"{sync.__name__}.{name}"
        assert inspect.iscoroutinefunction(getattr(async_, name)), (
            f"{async_.__name__}.{name} must be async def"
        )


@pytest.mark.parametrize(("sync", "async_"), TWINS, ids=IDS)
def test_no_public_async_method_without_a_blocking_twin(sync, async_):
    # Whatever is a coroutine on the async side is plain (blocking) on the sync side, and
    # a plain method on the sync side that is not I/O may be plain on the async side too.
    for name in sorted(public(sync) & public(async_)):
        if is_property(sync, name) or not callable(getattr(sync, name)):
            continue
        assert not inspect.iscoroutinefunction(getattr(sync, name)), f"{sync.__name__}.{name}"


@pytest.mark.parametrize(("sync", "async_"), TWINS, ids=IDS)
def test_same_parameters(sync, async_):
    for name in sorted(public(sync) & public(async_)):
        if is_property(sync, name) or not callable(getattr(sync, name)):
            continue
        assert parameters(getattr(sync, name)) == parameters(getattr(async_, name)), (
            f"{sync.__name__}.{name} and {async_.__name__}.{name} differ"
        )


@pytest.mark.parametrize(
    ("sync", "async_"),
    [
        (mqkit.Client, mqkit.AsyncClient),
        (mqkit.Consumer, mqkit.AsyncConsumer),
        (mqkit.EventBus, mqkit.AsyncEventBus),
    ],
    ids=["Client", "Consumer", "EventBus"],
)
def test_context_managers(sync, async_):
    assert hasattr(sync, "__enter__") and hasattr(sync, "__exit__")
    assert inspect.iscoroutinefunction(async_.__aenter__)
    assert inspect.iscoroutinefunction(async_.__aexit__)


def test_client_constructors_match():
    assert parameters(mqkit.Client.__init__) == parameters(mqkit.AsyncClient.__init__)


def test_subscribe_is_a_plain_method_on_both():
    # With handler=None it is a decorator, so it cannot be a coroutine function.
    assert not inspect.iscoroutinefunction(mqkit.EventBus.subscribe)
    assert not inspect.iscoroutinefunction(mqkit.AsyncEventBus.subscribe)


def test_every_exported_name_resolves():
    for name in mqkit.__all__:
        assert getattr(mqkit, name) is not None, name
    assert issubclass(mqkit.ConfigError, ValueError)
    for error in (
        mqkit.ConfigError,
        mqkit.ConnectionFailed,
        mqkit.TopologyError,
        mqkit.PublishError,
        mqkit.RequestTimeout,
        mqkit.RemoteError,
        mqkit.DecodeError,
    ):
        assert issubclass(error, mqkit.MqkitError)
    for error in (mqkit.PublishUnroutable, mqkit.PublishNacked, mqkit.PublishTimeout):
        assert issubclass(error, mqkit.PublishError)
