"""tools/bench_prefix_cache.py: the verdicts it prints, without servers (its runs take minutes:
the README's figures come from it)."""

from tests.tools import load_tool


def _tool():
    return load_tool("bench_prefix_cache")


def _rec(wave: int, prompt: list[int], tokens: list[int], ttft_s: float, turn: int = 0) -> dict:
    return dict(conversation=0, turn=turn, wave=wave, prompt_ids=prompt, prompt_tokens=len(prompt), token_ids=tokens,
                ttft_s=ttft_s)


def test_hits_a_lossless_cache_must_serve_count_only_earlier_waves_full_blocks():
    tool = _tool()
    a = list(range(40))
    recs = [_rec(0, a, [1], 1.0), _rec(0, a[:20] + [99] * 5, [1], 1.0),  # same wave: not counted
            _rec(1, a + [7] * 30, [1], 1.0),  # shares 40 tokens with wave 0: 2 full blocks
            _rec(2, a + [7] * 32, [1], 1.0),  # shares 70 with wave 1: 4 blocks
            _rec(3, a + [7] * 32, [1], 1.0)]  # the same prompt again: all but its last token, 4 blocks
    assert tool.hits_from_earlier_waves(recs, 16) == 32 + 64 + 64
    assert tool.hits_from_earlier_waves(recs, 8) == 40 + 64 + 64


class _Server:
    def __init__(self, hits: int, queries: int) -> None:
        self.row = dict(role="prefill", prefix_cache_queries=queries, prefix_cache_hits=hits, block_size=16)
        # a decode worker's handoff lookups are not the prefill cache's hit rate
        self.decode = dict(role="decode", prefix_cache_queries=queries, prefix_cache_hits=queries,
                           handoff_blocks_copied=3, handoff_blocks_cached=5, block_size=16)

    def workers(self):
        return [self.row, self.decode]

    def wait_idle(self, timeout_s):
        return True


def test_summary_ratios_and_a_differing_output_is_counted():
    tool = _tool()
    p0, p1 = list(range(20)), list(range(40))
    on = [_rec(0, p0, [1, 2], 0.5, turn=0), _rec(1, p1, [3], 0.25, turn=1)]
    off = [_rec(0, p0, [1, 2], 0.5, turn=0), _rec(1, p1, [4], 1.0, turn=1)]
    report = tool.summarize({tool.ON: on, tool.OFF: off}, {tool.ON: _Server(16, 60), tool.OFF: _Server(0, 0)})
    assert report["mean_ttft_ratio_on_over_off"] == (0.5 + 0.25) / (0.5 + 1.0)
    assert report["mean_ttft_ratio_by_turn"] == [1.0, 0.25]
    assert report["outputs_identical"] == "1/2" and not report["all_outputs_identical"]
    assert report[tool.ON]["hits_from_earlier_waves"] == 16 and report[tool.ON]["hit_rate"] == 16 / 60
    assert report[tool.ON]["handoff_blocks_cached"] == 5 and report[tool.ON]["handoff_blocks_copied"] == 3
    assert report[tool.ON]["mean_output_tokens"] == 1.5
