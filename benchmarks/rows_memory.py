"""The behaviour suite on the in-memory broker vs on RabbitMQ: how much faster a service's
tests run on ``memory://``.

The same selection of the project's tests (``tests/integration``, the tests that use a
broker, minus those that start RabbitMQ nodes of their own or are marked ``rabbitmq_only``)
runs twice in a child pytest: on the broker at ``--url`` and on the memory broker
(``MQKIT_TEST_URL=memory://bench``). A row's rate is tests passed per second of wall time;
the target compares the two. ``--quick`` runs three files of the suite instead of all.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from common import Config, Result

ROOT = Path(__file__).resolve().parents[1]
MARKS = "broker and not own_nodes and not rabbitmq_only"
QUICK = ("test_producer.py", "test_rpc.py", "test_retry.py")
_PASSED = re.compile(r"(\d+) passed")
_FAILED = re.compile(r"(\d+) (?:failed|error)")


def _run(label: str, key: str, url: str, cfg: Config) -> Result:
    result = Result("memory", key, label)
    paths = [f"tests/integration/{name}" for name in QUICK] if cfg.quick else ["tests/integration"]
    env = dict(os.environ, MQKIT_TEST_URL=url)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", MARKS, *paths],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    result.seconds = time.perf_counter() - started
    tail = done.stdout.strip().splitlines()[-1:] or [""]
    passed = _PASSED.search(tail[0])
    failed = _FAILED.search(tail[0])
    if done.returncode != 0 or passed is None:
        result.error = f"pytest exited {done.returncode}: {tail[0][:200]}"
        return result
    result.messages = int(passed.group(1))
    result.note = f"{result.messages} tests in {result.seconds:.0f}s" + (
        f", {failed.group(1)} failed" if failed else ""
    )
    return result


def memory_section(cfg: Config) -> list[Result]:
    """Two rows: the suite on RabbitMQ (``--url``), then on ``memory://bench``."""
    return [
        _run("behaviour suite on RabbitMQ (tests/s)", "suite_rabbitmq", cfg.url, cfg),
        _run("behaviour suite on memory:// (tests/s)", "suite_memory", "memory://bench", cfg),
    ]
