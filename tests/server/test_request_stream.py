"""`RequestStream`, the per-request mailbox: deltas merge into ONE pending output, so a reader
that falls behind holds the unread tokens and nothing else (no queue of message objects), and
it still gets every token, in order, per choice, with the last finish reason."""

from __future__ import annotations

import asyncio
import random

from tetri.server.engine_api import ChoiceDelta, EngineOutput, RequestStream
from tetri.types import TokenLogprob


def _delta(choice: int, token: int, finish: str | None = None) -> EngineOutput:
    lp = TokenLogprob(token, -0.5, [(token, -0.5)])
    return EngineOutput(req_id="r", choices=[ChoiceDelta(index=choice, token_ids=[token], logprobs=[lp],
                                                         finish_reason=finish)])


def test_an_unread_stream_holds_one_merged_output():
    stream = RequestStream("r", n=2)
    for t in range(10_000):
        stream.put(_delta(t % 2, t))
        pending = stream._pending
        assert pending is not None and len(pending.choices) == min(t + 1, 2)  # one delta per choice, ever
    stream.put(_delta(0, 10_000, "length"))
    stream.put(_delta(1, 10_001, "stop"))
    assert stream.done

    async def read_all():
        outs = [out async for out in stream]
        return outs

    outs = asyncio.run(read_all())
    assert len(outs) == 1  # everything since the last read, merged
    by_choice = {ch.index: ch for ch in outs[0].choices}
    assert by_choice[0].token_ids == list(range(0, 10_001, 2))
    assert by_choice[1].token_ids == list(range(1, 10_002, 2))
    assert [lp.token_id for lp in by_choice[0].logprobs] == by_choice[0].token_ids
    assert (by_choice[0].finish_reason, by_choice[1].finish_reason) == ("length", "stop")


async def test_a_slow_reader_gets_every_token_in_order_and_the_error():
    stream = RequestStream("r", n=1)
    rng = random.Random(0)
    got: list[int] = []
    most_pending = 0

    async def reader():
        async for out in stream:
            got.extend(out.choices[0].token_ids if out.choices else [])
            if out.error is not None:
                return out.error
            await asyncio.sleep(0)  # fall behind now and then
        return None

    task = asyncio.create_task(reader())
    for t in range(2000):
        stream.put(_delta(0, t))
        most_pending = max(most_pending, len(stream._pending.choices) if stream._pending else 0)
        if rng.random() < 0.05:
            await asyncio.sleep(0)
    stream.put(EngineOutput(req_id="r", choices=[], error="worker died"))
    stream.put(_delta(0, 99999))  # after the end: ignored
    assert await task == "worker died"
    assert got == list(range(2000)) and most_pending == 1
    assert await stream.get() is None
