"""mqkit's logging defaults: a NullHandler, the client libraries quiet unless the
application chose their level, and the policy table."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

from mqkit import lifecycle, logs


def run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_importing_mqkit_adds_a_null_handler_and_quiets_the_client_libraries():
    out = run(
        """
        import logging
        import mqkit
        print([type(h).__name__ for h in logging.getLogger("mqkit").handlers])
        for name in ("pika", "aiormq", "aio_pika"):
            print(name, logging.getLevelName(logging.getLogger(name).level))
        logging.getLogger("mqkit.consumer").warning("unseen without a handler")
        logging.getLogger("pika.connection").error("Connection refused, 9 times")
        """
    )
    assert "['NullHandler']" in out
    assert "pika CRITICAL" in out and "aiormq CRITICAL" in out and "aio_pika CRITICAL" in out
    assert "unseen" not in out and "refused" not in out  # nothing printed: no handler of ours


def test_a_level_the_application_chose_first_is_kept_and_logs_can_be_shown_again():
    out = run(
        """
        import logging
        logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
        logging.getLogger("aiormq").setLevel(logging.DEBUG)
        import mqkit
        from mqkit.logs import show_client_library_logs
        print("aiormq", logging.getLevelName(logging.getLogger("aiormq").level))
        logging.getLogger("pika.connection").warning("hidden")
        show_client_library_logs(logging.INFO)
        logging.getLogger("pika.connection").info("shown again")
        logging.getLogger("mqkit.consumer").info("mqkit record")
        """
    )
    assert "aiormq DEBUG" in out
    assert "hidden" not in out
    assert "pika.connection shown again" in out
    assert "mqkit.consumer mqkit record" in out  # the NullHandler stops nothing


def test_install_is_idempotent():
    logs.install()
    logs.install()
    nulls = [h for h in logging.getLogger("mqkit").handlers if isinstance(h, logging.NullHandler)]
    assert len(nulls) == 1


def test_the_policy_table_has_a_row_per_event_with_its_logger_and_level():
    table = logs.policy_table()
    rows = table.splitlines()
    assert rows[0] == "| event | logger | level | message |"
    for event, rule in lifecycle.LOG_POLICY.items():
        [row] = [r for r in rows if r.startswith(f"| `{event.name}` |")]
        assert f"`{rule.logger}`" in row
        assert logging.getLevelName(rule.level) in row
    assert "ERROR (WARNING for `Reject`)" in table
    assert "traceback" in rows[-1] and "DEBUG" in rows[-1]


def test_the_readme_shows_the_policy_table_as_the_code_has_it():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert logs.policy_table() in readme, (
        "README.md's logging table differs from mqkit.lifecycle.LOG_POLICY: paste the output "
        "of `python -c 'from mqkit.logs import policy_table; print(policy_table())'`"
    )
