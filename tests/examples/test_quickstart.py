"""The README's quick-start programs: the README shows them verbatim, and they run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = ["quickstart_sync.py", "quickstart_async.py"]


@pytest.mark.parametrize("program", PROGRAMS)
def test_readme_shows_the_program_verbatim(program: str) -> None:
    source = (ROOT / "examples" / program).read_text()
    readme = (ROOT / "README.md").read_text()
    assert source.strip() in readme, f"README.md must show examples/{program} as it is"


@pytest.mark.parametrize("program", PROGRAMS)
def test_program_charges_then_stops_on_sigterm(program: str, broker_url: str, names, raw) -> None:
    # Run it on a queue and as a service of its own: the program's "charges" and "billing"
    # are renamed for the test (and deleted afterwards by `names`, with the DLQ and the
    # retry tiers the program declared).
    queue, service = names.queue(), names.service()
    source = (ROOT / "examples" / program).read_text().replace('"charges"', repr(queue))
    source = source.replace('service="billing"', f"service={service!r}")
    env = {**os.environ, "MQKIT_URL": broker_url}
    process = subprocess.Popen(
        [sys.executable, "-c", source],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if line.startswith("charging") or not line:
                break
        assert line.strip() == "charging 42 attempt 1"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert raw.count(queue) == 0  # handled and acked before it stopped
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
