"""The load board means what it says (issue 20, item 9): a decode worker counts heavy decodes
by `--heavy-decode-tokens` (carried to it in its config), and `predicted_decode_tokens` is
the predicted output still to come, falling as tokens are produced. Real nodes and pools."""

from tests.runtime.inproc import Cluster
from tetri.cli import build_engine, build_parser
from tetri.sched.front import ReqState
from tetri.sched.predictor import OraclePredictor


def test_heavy_decode_tokens_reaches_the_decode_workers_config(default_model_dir):
    engine = build_engine(build_parser().parse_args(["--model", default_model_dir, "--heavy-decode-tokens", "77"]))
    assert engine.sched_cfg.heavy_decode_tokens == 77  # WorkerProcs hands this config to every worker
    assert engine.scheduler.cfg.heavy_decode_tokens == 77  # and the front's dispatch uses the same


def test_decode_board_counts_heavy_by_the_threshold_and_remaining_tokens(default_model_dir):
    c = Cluster(default_model_dir, heavy_decode_tokens=100, predictor=OraclePredictor(bucket_tokens=10))
    c.submit("long", [5, 6, 7, 8], max_tokens=120, expected_output_tokens=120)  # predicted 120 > 100: heavy
    c.submit("short", [9, 10, 11], max_tokens=50, expected_output_tokens=50)  # predicted 50: light
    for _ in range(20):
        c.round()
        if all(c.front.reqs[r].state is ReqState.DECODING for r in ("long", "short")):
            break
    decode = c.nodes[1]
    seen = []
    for _ in range(5):
        fields = decode.board_fields()
        emitted = {r: len(c.tokens[r]) for r in ("long", "short")}
        assert (fields["heavy_decodes"], fields["light_decodes"]) == (1, 1)
        assert fields["predicted_decode_tokens"] == (120 - emitted["long"]) + (50 - emitted["short"])
        seen.append(fields["predicted_decode_tokens"])
        c.round()
    assert seen == sorted(seen, reverse=True) and seen[0] - seen[-1] == 2 * (len(seen) - 1)
