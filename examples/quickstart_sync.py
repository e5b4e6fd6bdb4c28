from pydantic import BaseModel

import mqkit


class ChargeCard(BaseModel):
    order_id: str
    amount: float


def charge(cmd: ChargeCard, ctx: mqkit.Context) -> None:
    print("charging", cmd.order_id, "attempt", ctx.attempt, flush=True)


with mqkit.Client(service="billing") as client:
    client.producer(ChargeCard, queue="charges").publish(ChargeCard(order_id="42", amount=9.9))
    client.consumer("charges", ChargeCard, charge)
    client.run()  # until Ctrl-C or SIGTERM, then finishes in-flight work and returns
