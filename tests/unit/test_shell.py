"""The names a shell gives its connections (mqkit.shell): the same on both runtimes."""

from __future__ import annotations

from mqkit.shell import connection_name, link_name


def test_the_broker_sees_the_service_and_the_purpose() -> None:
    assert connection_name("billing") == "mqkit:billing"
    assert connection_name("billing", "publishing") == "mqkit:billing (publishing)"


def test_log_lines_name_the_connection_by_its_purpose() -> None:
    assert link_name() == "the connection"
    assert link_name("publishing") == "the publishing connection"
