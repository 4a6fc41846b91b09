"""The front's handlers of the workers' step results, as functions of the `RuntimeClient`
(`client`): a ChunkDone (first tokens straight to the client, then the handoff, after the
learned predictor's answer when it runs off the event loop), a TokenBatch (demultiplexed into
each request's stream) and a PeerPaths. `RuntimeClient._on_message` calls them.

They feed each event to the scheduler (`chunk_done` + `prefilled`, `on_token_batch`) and carry
out the `Actions` it returns, streaming exactly the entries it lists as `current`; they change
no scheduler state themselves (tests/server/test_engine_events.py checks the calls)."""

from __future__ import annotations

import asyncio
import logging
import time

from tetri.protocol import ChunkDone, PeerPaths, PeerPools, TokenBatch
from tetri.server.engine_api import ChoiceDelta, EngineOutput

log = logging.getLogger("tetri.engine")


def on_chunk_done(client, msg: ChunkDone) -> None:
    acts = client.scheduler.chunk_done(msg)  # `current`: the results from the worker holding the request
    for i in acts.current:  # first tokens go out before the handoff is even ordered
        res = msg.finished[i]
        if client.length_log is not None:
            client.length_log.on_prefilled(res.req_id, res.hidden, res.first_tokens, res.finish_reasons)
        stream = client.streams.get(res.req_id)
        if stream is None:
            continue
        choices = [ChoiceDelta(index=c, token_ids=[tok], logprobs=[res.logprobs[c]] if res.logprobs and res.logprobs[c] else None,
                               finish_reason=res.finish_reasons[c] if res.finish_reasons else None)
                   for c, tok in enumerate(res.first_tokens)]
        stream.put(EngineOutput(req_id=res.req_id, choices=choices, queue_time_s=client._dispatched.pop(res.req_id, None),
                                prompt_logprobs=res.prompt_logprobs))
        if stream.done:
            client._ended(res.req_id)
    client._apply(acts)
    for res in msg.finished:
        if client.predict_off_loop and res.req_id in client.scheduler.reqs:
            predict_then_hand_off(client, res, msg.worker_id)
        else:
            client._apply(client.scheduler.prefilled(res, msg.worker_id, client._loads(), time.monotonic()))


def predict_then_hand_off(client, res, wid: int) -> None:
    """Run the learned predictor on the helper thread; order the handoff when it answers
    (unless the worker died or the request moved meanwhile)."""
    info, features = client.scheduler.predict_inputs(res.req_id, res)
    text = client._texts.get(res.req_id)
    predictor = client.scheduler.predictor
    incarnation = (client.procs.restarts.get(wid, 0), client.scheduler.reqs[res.req_id].migrations)

    def predict():
        if features.get("prompt") is None and text is not None:
            features["prompt"] = text.result()
        return predictor.predict(info, features)

    def done(fut) -> None:
        req = client.scheduler.reqs.get(res.req_id)
        now_incarnation = (client.procs.restarts.get(wid, 0), req.migrations if req else incarnation[1])
        if client._closed or wid in client.dead or now_incarnation != incarnation:
            return  # on_worker_dead already released, migrated or failed what it held
        try:
            pred = fut.result()
        except Exception:
            log.exception("length predictor failed for %s", res.req_id)
            pred = None
        client._apply(client.scheduler.prefilled(res, wid, client._loads(), time.monotonic(), pred, predicted=True))

    asyncio.get_running_loop().run_in_executor(client._aux, predict).add_done_callback(done)


def on_tokens(client, msg: TokenBatch) -> None:
    acts = client.scheduler.on_token_batch(msg)  # `current`: the entries from the worker holding the request
    per_req: dict[str, list[ChoiceDelta]] = {}
    scored = {r: p for r, p in zip(msg.req_ids, msg.prompt_logprobs) if p is not None}  # mixed workers
    for i in acts.current:
        req_id = msg.req_ids[i]
        lp = msg.logprobs[i] if msg.logprobs else None
        per_req.setdefault(req_id, []).append(ChoiceDelta(
            index=msg.choices[i], token_ids=[msg.token_ids[i]], logprobs=[lp] if lp is not None else None,
            finish_reason=msg.finish_reasons[i]))
        if client.length_log is not None:
            client.length_log.on_token(req_id, msg.choices[i], msg.finish_reasons[i])
    for req_id, choices in per_req.items():
        stream = client.streams.get(req_id)
        if stream is None:
            continue
        stream.put(EngineOutput(req_id=req_id, choices=choices,
                                queue_time_s=client._dispatched.pop(req_id, None), prompt_logprobs=scored.get(req_id)))
        if stream.done:
            client._ended(req_id)
    client._apply(acts)  # none today (no sends or fails come of output); carried out all the same


def on_peer_paths(client, msg: PeerPaths) -> None:
    """Record the path per pair (/workers, metrics). An owner whose peer fell back to the
    host-staged path gets PeerPools again: it stages what it already holds once it sees the
    peer's request (its flag is set by now), so no handoff waits on a prompt finished before."""
    client.kv_paths[msg.worker_id] = msg
    if client.metrics is not None:
        client.metrics.observe_kv_paths(msg.worker_id, msg.paths)
    staged = [src for src, path in msg.paths.items()  # prefill owners only: they never answer PeerPaths
              if path == "host_staged" and client.board.read(src).role == "prefill"]
    if staged:
        pools = {wid: r.pool for wid, r in client.ready.items() if wid not in client.dead}
        for src in staged:
            client._send(src, PeerPools(pools=pools))
