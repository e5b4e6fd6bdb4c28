"""A consumer process killed (SIGKILL) in the middle of a handler loses nothing: the broker
redelivers the message it held, to the next consumer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from pydantic import BaseModel

CHILD = {
    "sync": """
        import time
        from pydantic import BaseModel
        import mqkit

        class Job(BaseModel):
            n: int

        def handle(job, ctx):
            print("handling", job.n, ctx.message_id, flush=True)
            time.sleep(60)  # killed in here

        with mqkit.Client(url=URL, service=SERVICE) as client:
            client.consumer(QUEUE, Job, handle).start()
            time.sleep(60)
    """,
    "async": """
        import asyncio
        from pydantic import BaseModel
        import mqkit

        class Job(BaseModel):
            n: int

        async def handle(job, ctx):
            print("handling", job.n, ctx.message_id, flush=True)
            await asyncio.sleep(60)  # killed in here

        async def main():
            async with mqkit.AsyncClient(url=URL, service=SERVICE) as client:
                await client.consumer(QUEUE, Job, handle).start()
                await asyncio.sleep(60)

        asyncio.run(main())
    """,
}


class Job(BaseModel):
    n: int


@pytest.mark.parametrize("victim", ["sync", "async"])
def test_killed_consumer_process_gets_its_message_redelivered(
    victim: str, rt, names, collector, broker_url: str, raw
) -> None:
    queue, service = names.queue(), names.service()  # its retry tiers go with the names
    source = f"URL = {broker_url!r}\nQUEUE = {queue!r}\nSERVICE = {service!r}\n"
    source += textwrap.dedent(CHILD[victim])
    with rt.client(service=service) as client:
        message_id = client.producer(Job, queue=queue).publish(Job(n=7))
        child = subprocess.Popen(
            [sys.executable, "-c", source],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ},
        )
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            assert line.split() == ["handling", "7", message_id], line
            os.kill(child.pid, signal.SIGKILL)
            assert child.wait(timeout=10) == -signal.SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            if child.stdout is not None:
                child.stdout.close()
        received = collector()
        with client.consumer(queue, Job, received):
            received.wait(1, timeout=20)
            time.sleep(0.3)
        [(job, ctx)] = received.items
    assert job == Job(n=7)
    assert ctx.message_id == message_id
    assert ctx.redelivered is True  # the broker's flag: it was delivered to the dead process
    assert ctx.attempt == 1  # a crash is not a failed attempt
    assert raw.count(queue) == 0 and raw.count(f"{queue}.dlq") == 0
