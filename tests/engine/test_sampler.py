"""Sampler rules on synthetic logits, and every sampling option through the real engine."""

import torch

from tetri import LLM, SamplingParams
from tetri.workers.sampler import Sampler, SampleRow


def logits_for(*values):
    with torch.inference_mode():  # as the model runner produces them
        return torch.tensor([list(values)], dtype=torch.float32)


def test_penalties_follow_vllm_rules():
    s = Sampler(eos_token_ids=(0,))
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=1.0)
    row = SampleRow(p, output_token_ids=[1, 1], prompt_token_ids=[2])
    lg = logits_for(0.0, 4.0, 3.0, -1.0)
    s._process_row(lg := lg.clone(), 0, row)
    # token 1: 4/2 (repetition) - 1.0*2 (frequency) - 0.5 (presence); token 2 (prompt only): 3/2
    assert lg[0].tolist() == [0.0, 4.0 / 2 - 2.0 - 0.5, 1.5, -1.0]


def test_min_tokens_masks_eos_and_stop_ids_even_out_of_vocab():
    s = Sampler(eos_token_ids=(1,))
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(2, 10_000))
    tokens, _ = s.sample(logits_for(0.0, 9.0, 8.0, 1.0), [SampleRow(p, [], [5])])
    assert tokens == [3]


def test_degenerate_parameters_fall_back_to_greedy():
    s = Sampler(eos_token_ids=())
    for p in (SamplingParams(temperature=1e-300), SamplingParams(temperature=1.0, repetition_penalty=1e-300)):
        tokens, _ = s.sample(logits_for(0.0, 3.0, 1.0), [SampleRow(p, [1], [1])])
        assert tokens[0] in (0, 1, 2)


def test_every_sampling_option_runs_in_the_engine(default_model_dir):
    llm = LLM(default_model_dir, check_invariants=True)
    options = [dict(presence_penalty=0.5), dict(frequency_penalty=-0.5), dict(repetition_penalty=1.3),
               dict(min_tokens=3), dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, seed=1, logprobs=3),
               dict(n=3, temperature=0.9, seed=4)]
    for opt in options:
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=6, **{"temperature": 0.0, **opt}))[0]
        assert all(len(o.token_ids) >= 1 for o in out.outputs), opt
        if opt.get("logprobs"):
            assert all(len(lp.top) == 3 for lp in out.outputs[0].logprobs)
    a = llm.generate([[9, 9]], SamplingParams(max_tokens=8, temperature=1.0, seed=7))[0].token_ids
    b = llm.generate([[9, 9]], SamplingParams(max_tokens=8, temperature=1.0, seed=7))[0].token_ids
    assert a == b
    assert llm.executor.blocks.num_free == llm.executor.blocks.num_blocks
