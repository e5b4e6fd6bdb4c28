import asyncio

from pydantic import BaseModel

import mqkit


class ChargeCard(BaseModel):
    order_id: str
    amount: float


async def charge(cmd: ChargeCard, ctx: mqkit.Context) -> None:
    print("charging", cmd.order_id, "attempt", ctx.attempt, flush=True)


async def main() -> None:
    async with mqkit.AsyncClient(service="billing") as client:
        producer = await client.producer(ChargeCard, queue="charges")
        await producer.publish(ChargeCard(order_id="42", amount=9.9))
        client.consumer("charges", ChargeCard, charge)
        await client.run()  # until Ctrl-C or SIGTERM, then drains


asyncio.run(main())
