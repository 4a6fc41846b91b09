"""Issue-5 features on the real server: the probe predictor's eval, and a real instance flip."""

import concurrent.futures as cf
import json
import time

from tests.runtime.server_proc import ServerProc
from tetri import LLM, SamplingParams


def test_probe_evaluates_on_served_traffic(probe_dir, capsys):
    from tetri.predictor.cli import main

    model_dir, log = probe_dir
    main(["eval", "--model", str(model_dir), "--data", str(log)])
    report = json.loads(capsys.readouterr().out)
    assert {"accuracy", "accuracy_within_one_bucket", "mae_tokens", "majority_baseline"} <= set(report)
    assert report["n"] == 24


def test_flip_moves_an_idle_decode_worker_to_prefill(default_model_dir):
    """A burst of long prompts saturates the only prefill worker while both decode workers
    idle: one decode worker is drained and flipped (no restart) and serving goes on."""
    srv = ServerProc("--device", "cpu", "--prefill", "1", "--decode", "2", "--chunk-size", "16",
                     "--flip", "--flip-window-s", "0.3", "--max-model-len", "2048").start()
    try:
        client = srv.openai(timeout=120)
        model = client.models.list().data[0].id
        prompts = [[(7 * i + j) % 480 + 4 for j in range(1500)] for i in range(16)]  # seconds of prefill

        def run(p):
            return client.completions.create(model=model, prompt=p, max_tokens=2, temperature=0.0,
                                             extra_body={"ignore_eos": True, "return_token_ids": True})

        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(16) as pool:
            outs = list(pool.map(run, prompts))
        burst_s = time.monotonic() - t0
        # The flip starts during the burst (the prefill queue is full for seconds); finishing it
        # (drain, SetRole, the new row) is a fraction of the burst's work, so allow as long as
        # the burst itself took on this machine, at least 20 s.
        deadline = time.monotonic() + max(20.0, burst_s)
        roles = []
        while time.monotonic() < deadline:
            roles = sorted(w["role"] for w in srv.workers())
            if roles == ["decode", "prefill", "prefill"]:
                break
            time.sleep(0.2)
        assert roles == ["decode", "prefill", "prefill"], srv.workers()
        want = LLM(default_model_dir).generate(prompts, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        got = [o.choices[0].model_extra.get("token_ids") or o.choices[0].token_ids for o in outs]
        assert got == [w.token_ids for w in want]
        # the flipped worker serves in its new role
        more = list(cf.ThreadPoolExecutor(4).map(run, prompts[:4]))
        assert all(o.choices[0].finish_reason == "length" for o in more)
        assert srv.wait_idle()
    finally:
        srv.stop()
