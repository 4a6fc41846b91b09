"""The batched sampler against the per-row reference (tests/engine/reference_sampler.py) token
for token, its distributions, its seeds, its host transfers, and through the real engine."""

import math
import weakref

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from tests.engine.reference_sampler import ReferenceSampler
from tetri import LLM, SamplingParams
from tetri.workers.sampler import Sampler, SampleRow

EOS = (2,)


def logits_for(*values):
    with torch.inference_mode():  # as the model runner produces them
        return torch.tensor([list(values)], dtype=torch.float32)


def random_logits(rows, vocab, seed, scale=3.0):
    with torch.inference_mode():
        return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def assert_same(got, want, rows):
    (tokens, lps), (ref_tokens, ref_lps) = got, want
    assert tokens == ref_tokens, [r.params for r in rows]
    for lp, ref in zip(lps, ref_lps):
        assert (lp is None) == (ref is None)
        if ref is not None:
            assert lp.token_id == ref.token_id
            assert lp.logprob == pytest.approx(ref.logprob, rel=1e-6, abs=1e-6)
            assert [v for _, v in lp.top] == pytest.approx([v for _, v in ref.top], rel=1e-6, abs=1e-6)
            assert untied_ids(lp.top) == untied_ids(ref.top)


def untied_ids(top):
    """The alternatives' ids where their logprob ties no other's and is not the last one's:
    among equal logprobs (bf16 logits tie often) no order is defined, and the last place may
    go to any of the tokens tied with it."""
    vals = [v for _, v in top]
    return [t if vals.count(v) == 1 and v != vals[-1] else None for t, v in top]


# ---- exact rules on small logits ---------------------------------------------------------------

def test_penalties_and_bias_follow_vllm_and_openai_rules():
    """Logprobs are those of the processed logits (before temperature): read them back."""
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=1.0,
                       logit_bias={3: 2.5, 99: 1.0}, logprobs=4)
    row = SampleRow(p, output_token_ids=[1, 1], prompt_token_ids=[2, 3])
    tokens, lps = Sampler(eos_token_ids=(0,)).sample(logits_for(0.0, 4.0, 3.0, -1.0), [row])
    # bias first: token 3 -> 1.5; repetition: token 1 4/2, token 2 (prompt) 3/2, token 3 (prompt) 1.5/2;
    # then token 1: - 1.0 * 2 (frequency) - 0.5 (presence)
    want = torch.log_softmax(torch.tensor([0.0, 4.0 / 2 - 2.0 - 0.5, 1.5, 1.5 / 2]), -1)
    assert tokens == [2]
    assert dict(lps[0].top) == pytest.approx(dict(enumerate(want.tolist())), abs=1e-6)
    assert lps[0].logprob == pytest.approx(float(want[2]), abs=1e-6)


def test_min_tokens_masks_eos_and_stop_ids_even_out_of_vocab():
    s = Sampler(eos_token_ids=(1,))
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(2, 10_000))
    assert s.sample(logits_for(0.0, 9.0, 8.0, 1.0), [SampleRow(p, [], [5])])[0] == [3]
    assert s.sample(logits_for(0.0, 9.0, 8.0, 1.0), [SampleRow(p, [3, 3], [5])])[0] == [1]  # lifted at min_tokens


def test_degenerate_parameters_fall_back_to_greedy():
    s = Sampler(eos_token_ids=())
    # below vLLM's epsilon a temperature is greedy; a tiny repetition penalty makes the seen
    # token's logit infinite (3 / 1e-300), the softmax NaN, and the row falls back to its argmax.
    for p in (SamplingParams(temperature=1e-300), SamplingParams(temperature=1.0, repetition_penalty=1e-300)):
        tokens, _ = s.sample(logits_for(0.0, 3.0, 1.0), [SampleRow(p, [1], [1])])
        assert tokens == [1], p


def test_logit_bias_bans_and_forces_tokens_in_every_mode():
    lg = random_logits(64, 50, seed=1)
    favourite = lg.argmax(-1)
    banned_rows = [SampleRow(SamplingParams(temperature=t, seed=s, logit_bias={int(f): -100.0}), [0] * s, [1])
                   for s, (t, f) in enumerate(zip([0.0, 1.0, 1.5, 2.0] * 16, favourite))]
    tokens, _ = Sampler(EOS).sample(lg, banned_rows)
    assert all(t != int(f) for t, f in zip(tokens, favourite))
    forced = [SampleRow(SamplingParams(temperature=t, seed=s, logit_bias={7: 100.0}), [], [1])
              for s, t in enumerate([0.0, 1.0, 2.0] * 10)]
    assert Sampler(EOS).sample(lg[:30], forced)[0] == [7] * 30


# ---- token for token against the per-row reference ---------------------------------------------

VOCABS = (21, 64, 320)


@st.composite
def sample_rows(draw, vocab):
    greedy = draw(st.booleans())
    bias = draw(st.none() | st.dictionaries(st.integers(0, vocab + 5), st.floats(-100, 100), max_size=4))
    params = SamplingParams(
        temperature=0.0 if greedy else draw(st.sampled_from([1e-5, 0.3, 0.8, 1.0, 1.7]) | st.floats(1e-5, 3.0)),
        top_k=draw(st.sampled_from([0, -1, 1, 2, 5, vocab - 1, vocab, vocab + 3])),
        top_p=draw(st.sampled_from([1.0, 0.95, 0.5, 0.05]) | st.floats(0.01, 1.0)),
        min_p=draw(st.sampled_from([0.0, 0.0, 0.05, 0.3]) | st.floats(0.0, 1.0)),
        seed=None if greedy else draw(st.integers(-2**70, 2**70)),
        presence_penalty=draw(st.sampled_from([0.0, 0.5, -1.0]) | st.floats(-2, 2)),
        frequency_penalty=draw(st.sampled_from([0.0, 1.0, -0.5]) | st.floats(-2, 2)),
        repetition_penalty=draw(st.sampled_from([1.0, 1.0, 0.5, 1.3, 3.0])),
        min_tokens=draw(st.integers(0, 4)), max_tokens=16,
        stop_token_ids=tuple(draw(st.lists(st.integers(0, vocab + 10), max_size=3))),
        ignore_eos=draw(st.booleans()),
        logprobs=draw(st.none() | st.integers(0, 20)),
        logit_bias=bias,
    )
    params.validate()
    out = draw(st.lists(st.integers(0, vocab - 1), max_size=8))
    prompt = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=12))
    return SampleRow(params, out, prompt, choice=draw(st.integers(0, 3)))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_batched_sampler_equals_the_per_row_reference(data):
    vocab = data.draw(st.sampled_from(VOCABS))
    rows = data.draw(st.lists(sample_rows(vocab), min_size=1, max_size=6))
    logits = random_logits(len(rows), vocab, data.draw(st.integers(0, 2**31)), data.draw(st.sampled_from([0.5, 3, 20])))
    grid = data.draw(st.sampled_from([None, None, "bf16", 0.5]))  # half-precision logits tie; a coarse grid ties a lot
    with torch.inference_mode():
        logits = logits if grid is None else logits.bfloat16().float() if grid == "bf16" else (logits / grid).round() * grid
    assert_same(Sampler(EOS).sample(logits, rows), ReferenceSampler(EOS).sample(logits, rows), rows)


OPTIONS = {
    "greedy": dict(temperature=0.0),
    "seeded": dict(temperature=1.0, seed=5),
    "top_k": dict(temperature=0.9, top_k=10, seed=1),
    "top_p": dict(temperature=0.9, top_p=0.8, seed=2),
    "min_p": dict(temperature=1.2, min_p=0.1, seed=3),
    "presence": dict(temperature=0.7, presence_penalty=1.5, seed=4),
    "frequency": dict(temperature=0.0, frequency_penalty=2.0),
    "repetition": dict(temperature=0.0, repetition_penalty=1.8),
    "logit_bias": dict(temperature=0.8, logit_bias={5: 8.0, 6: -100.0}, seed=6),
    "min_tokens": dict(temperature=1.0, min_tokens=5, stop_token_ids=(4, 9), seed=7),
    "logprobs": dict(temperature=0.0, logprobs=0),
    "top_logprobs": dict(temperature=0.6, top_k=40, top_p=0.9, min_p=0.02, logprobs=5, seed=8),
}


@pytest.mark.parametrize("vocab", [320, 32000])
def test_every_option_alone_and_mixed_equals_the_reference(vocab):
    s, ref = Sampler(EOS), ReferenceSampler(EOS)
    out = list(range(10, 20)) * 2
    out_lens = [0, 3, 5, 2, 10, 12, 7, 9, 4, 3, 1, 6]  # min_tokens' row is still below its minimum
    rows = [SampleRow(SamplingParams(**o), out[:n], [3, 4, 5, 11], choice=i % 2) for i, (o, n) in
            enumerate(zip(OPTIONS.values(), out_lens))]
    lg = random_logits(len(rows), vocab, seed=vocab)
    for i, row in enumerate(rows):
        assert_same(s.sample(lg[i:i + 1], [row]), ref.sample(lg[i:i + 1], [row]), [row])
    assert_same(s.sample(lg, rows), ref.sample(lg, rows), rows)


@pytest.mark.parametrize("opts", [dict(top_k=50), dict(top_k=50, top_p=0.95), dict(top_k=200, top_p=0.99, min_p=0.01)])
def test_tokens_tied_with_the_kth_logit_survive_top_k_as_in_the_reference(opts):
    """bf16 logits (as a bf16 model gives them) tie often at a row's k-th value: every tied token
    survives the cut, and top-p orders ties by token id, as the reference does."""
    with torch.inference_mode():
        lg = random_logits(64, 32000, seed=8).bfloat16().float()
    kth = lg.topk(50, dim=-1).values[:, -1:]
    assert int(((lg == kth).sum(-1) > 1).sum()) > 10  # the case is real: most rows tie at their 50th logit
    for seed in range(4):
        rows = [SampleRow(SamplingParams(temperature=1.0, seed=seed * 64 + i, **opts), [], [1]) for i in range(64)]
        assert_same(Sampler(EOS).sample(lg, rows), ReferenceSampler(EOS).sample(lg, rows), rows)


def test_greedy_is_the_argmax_of_the_processed_logits():
    lg = random_logits(16, 32000, seed=3)
    rows = [SampleRow(SamplingParams(temperature=0.0), [], [1]) for _ in range(16)]
    assert Sampler(EOS).sample(lg, rows)[0] == lg.argmax(-1).tolist()


# ---- distributions -----------------------------------------------------------------------------

def chi2_bound(df: int, z: float = 4.75) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df) at one-sided normal z (p ~ 1e-6)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def kept_distribution(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """What a draw should follow, computed independently in float64 from the definitions."""
    x = logits.double() / temperature
    if top_k:
        x = torch.where(x >= x.topk(top_k).values[-1], x, -math.inf)
    p = torch.softmax(x, -1)
    if top_p < 1.0:
        order = p.argsort(descending=True)
        before = torch.cumsum(p[order], 0) - p[order]
        p[order[before > top_p]] = 0.0
    if min_p:
        p[p < min_p * p.max()] = 0.0
    return p / p.sum()


def chi2(counts: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    kept = expected > 0
    assert int(counts[~kept].sum()) == 0, "drew a token the cuts exclude"
    n = counts.sum()
    e = expected[kept] * n
    return float(((counts[kept] - e) ** 2 / e).sum()), int(kept.sum()) - 1


DIST_CASES = {
    "plain": dict(temperature=1.0),
    "hot_top_k": dict(temperature=1.5, top_k=6),
    "cool_top_p": dict(temperature=0.7, top_p=0.8),
    "min_p": dict(temperature=1.0, min_p=0.2),
    "all_cuts": dict(temperature=0.9, top_k=9, top_p=0.9, min_p=0.05),
}


@pytest.mark.parametrize("case", DIST_CASES)
@pytest.mark.parametrize("seeded", [True, False])
def test_draws_follow_the_cut_and_renormalised_distribution(case, seeded):
    """12,000 draws of one row's logits: every position of many seeds and choices (or the
    worker generator); chi-square against the distribution computed from the definitions."""
    opts = DIST_CASES[case]
    base = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.7, 0.5, 0.2, 0.0, -0.3, -0.8, -1.5, -3.0])
    n_draws, positions = 12_000, 40
    outputs = [[0] * pos for pos in range(positions)]
    rows = [SampleRow(SamplingParams(seed=(i // positions if seeded else None), **opts), outputs[i % positions],
                      [1], choice=(i // 7) % 3) for i in range(n_draws)]
    with torch.inference_mode():
        lg = base.expand(n_draws, -1).clone()
    tokens, _ = Sampler((), seed=11).sample(lg, rows)
    counts = torch.bincount(torch.tensor(tokens), minlength=len(base)).double()
    stat, df = chi2(counts, kept_distribution(base, **opts))
    assert stat < chi2_bound(df), (stat, df, counts.tolist())


def test_the_chi_square_check_catches_a_wrong_distribution():
    """The check above is not vacuous: draws that ignore top_p fail it."""
    base = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.7, 0.5, 0.2, 0.0])
    rows = [SampleRow(SamplingParams(seed=i, temperature=1.0), [], [1]) for i in range(5000)]
    with torch.inference_mode():
        lg = base.expand(5000, -1).clone()
    counts = torch.bincount(torch.tensor(Sampler(()).sample(lg, rows)[0]), minlength=8).double()
    with pytest.raises(AssertionError):
        chi2(counts, kept_distribution(base, top_p=0.6))
    stat, df = chi2(counts, kept_distribution(base))
    assert stat < chi2_bound(df)
    assert chi2(counts, kept_distribution(base, temperature=0.8))[0] > chi2_bound(df)


def test_min_tokens_never_yields_eos_or_a_stop_id_early():
    vocab, eos, stop = 30, 2, 5
    bump = torch.zeros(vocab)
    bump[[eos, stop]] = 6.0
    lg = random_logits(400, vocab, seed=2, scale=0.3) + bump
    rows = [SampleRow(SamplingParams(temperature=1.0, seed=i, min_tokens=4, stop_token_ids=(stop,)), [7] * (i % 8), [1])
            for i in range(400)]
    tokens, _ = Sampler((eos,)).sample(lg, rows)
    early = [t for t, r in zip(tokens, rows) if len(r.output_token_ids) < 4]
    late = [t for t, r in zip(tokens, rows) if len(r.output_token_ids) >= 4]
    assert eos not in early and stop not in early
    assert sum(t in (eos, stop) for t in late) > 0.9 * len(late)  # unmasked, they dominate


# ---- seeds: any batch, any device --------------------------------------------------------------

def test_a_seeded_row_draws_the_same_in_any_batch_composition():
    vocab = 1000
    lg = random_logits(1, vocab, seed=4)[0]
    target = dict(temperature=0.9, top_p=0.95, seed=1234, presence_penalty=0.3)
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.5, top_k=3, seed=9, logprobs=2)]
    for pos in range(0, 60, 3):
        out = list(range(100, 100 + pos))
        row = SampleRow(SamplingParams(**target), out, [1, 2], choice=1)
        alone = Sampler(EOS, seed=0).sample(lg[None], [row])[0][0]
        for k in range(1, 4):  # the row in the middle of other rows, other worker seeds
            noise = random_logits(2 * k, vocab, seed=pos + k)
            batch = [SampleRow(others[j % 3], out[:j], [3]) for j in range(2 * k)]
            batch.insert(k, row)
            with torch.inference_mode():
                stacked = torch.cat([noise[:k], lg[None], noise[k:]])
            assert Sampler(EOS, seed=k).sample(stacked, batch)[0][k] == alone


def test_a_seeded_stream_depends_on_seed_choice_and_position():
    lg = random_logits(1, 5000, seed=5, scale=0.1).expand(30, -1)
    def draws(seed, choice):
        rows = [SampleRow(SamplingParams(temperature=1.0, seed=seed), [0] * pos, [1], choice) for pos in range(30)]
        return Sampler(EOS).sample(lg, rows)[0]
    a = draws(1, 0)
    assert a == draws(1, 0)
    assert len(set(a)) > 25  # positions are not one draw repeated
    assert a != draws(2, 0) and a != draws(1, 1)


# ---- host transfers ----------------------------------------------------------------------------

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item"}


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncing = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
        if name in SYNC_OPS or bool_index:
            self.syncing.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("with_logprobs", [False, True])
def test_one_device_to_host_transfer_per_step(monkeypatch, with_logprobs):
    """Every option at once: at most one tolist/cpu/item/numpy/bool conversion, and no aten op
    that needs the host to read device data (item, nonzero, boolean indexing)."""
    transfers = []
    for name in ("tolist", "cpu", "item", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _o=original, _n=name, **k: (transfers.append(_n), _o(self, *a, **k))[1])
    rows = [SampleRow(SamplingParams(**o), list(range(10, 10 + i)), [3, 4, 5]) for i, o in enumerate(OPTIONS.values())
            if with_logprobs or o.get("logprobs") is None]
    rows.append(SampleRow(SamplingParams(temperature=1.0, top_p=0.7), [1], [1]))  # unseeded
    lg = random_logits(len(rows), 320, seed=6)
    log = _OpLog()
    with log:
        tokens, _ = Sampler(EOS).sample(lg, rows)
    assert len(tokens) == len(rows)
    assert transfers == ["tolist"]
    assert log.syncing == []


class _LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors that aten ops created inside the mode."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.held: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.held:
                    self.held.add(storage.data_ptr())
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, storage.data_ptr(), storage.nbytes())
        return out

    def _release(self, ptr, nbytes):
        self.held.discard(ptr)
        self.live -= nbytes


@pytest.mark.parametrize("greedy_rows", [0, 1])
def test_the_sampler_holds_no_more_than_the_memory_plan_budgets(greedy_rows):
    """memory.SAMPLER_OWN_BUFFERS (inside SAMPLER_WORKSPACE, which a CUDA worker keeps out of
    its KV pool) bounds the sampler's own tensors, every option at once (the previous version
    held 8.3 and 8.8)."""
    from tetri.workers.memory import SAMPLER_OWN_BUFFERS

    batch, vocab = 16, 32000
    lg = random_logits(batch, vocab, seed=9)
    opts = dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3,
                repetition_penalty=1.1, logprobs=5, logit_bias={3: 1.0}, seed=1)
    rows = [SampleRow(SamplingParams(**(dict(temperature=0.0, repetition_penalty=1.1) if i < greedy_rows else opts)),
                      list(range(10, 40)), list(range(1, 200))) for i in range(batch)]
    live = _LiveBytes()
    with live:
        Sampler(EOS).sample(lg, rows)
    assert live.peak / (batch * vocab * 4) <= SAMPLER_OWN_BUFFERS, live.peak / (batch * vocab * 4)


# ---- through the real engine -------------------------------------------------------------------

class CheckedSampler:
    """The engine's sampler, checked at every step against the reference on the same logits
    and the rows exactly as the engine built them (positions, prompts, choices)."""

    def __init__(self, real: Sampler):
        self.real, self.ref, self.steps = real, ReferenceSampler(real.eos_token_ids), 0

    def sample(self, logits, rows):
        got = self.real.sample(logits, rows)
        assert_same(got, self.ref.sample(logits, rows), rows)
        self.steps += 1
        return got


def test_every_sampling_option_in_the_engine_matches_the_reference_at_every_step(default_model_dir):
    llm = LLM(default_model_dir, check_invariants=True)
    checked = llm.executor.sampler = CheckedSampler(llm.executor.sampler)
    vocab = llm.executor.loaded.spec.vocab_size
    forced = (vocab - 1) // 2
    prompts = [[5, 6, 7], [9, 9, 9, 9, 10, 11]]
    for name, opt in OPTIONS.items():
        outs = llm.generate(prompts, SamplingParams(max_tokens=6 if name == "min_tokens" else 4, **opt))
        assert all(len(o.token_ids) == (6 if name == "min_tokens" else 4) or o.finish_reason == "stop" for out in outs for o in out.outputs), name
        if opt.get("logprobs") is not None:
            for lp, tok in zip(outs[0].outputs[0].logprobs, outs[0].token_ids):
                assert lp.token_id == tok and len(lp.top) == opt["logprobs"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0.8, seed=3, logit_bias={forced: 100.0}))
    assert [o.token_ids for o in outs] == [[forced] * 4] * 2
    n3 = llm.generate([[9, 9]], SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=4))[0]
    assert len({tuple(o.token_ids) for o in n3.outputs}) == 3  # choices draw apart
    assert checked.steps > 40
    assert llm.executor.blocks.num_free == llm.executor.blocks.num_blocks


SEEDED = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=77, repetition_penalty=1.2,
                        presence_penalty=0.4, ignore_eos=True)


def test_a_seeded_request_gives_the_same_tokens_alone_and_in_a_batch(default_model_dir):
    llm = LLM(default_model_dir, chunk_size=16)
    alone = llm.generate([[4, 5, 6, 7]], SEEDED)[0].token_ids
    mixed = llm.generate([[8] * 30, [4, 5, 6, 7], [3, 1, 4, 1, 5]],
                         [SamplingParams(max_tokens=12, temperature=0.7), SEEDED, SamplingParams(max_tokens=3)])
    assert mixed[1].token_ids == alone
    assert llm.generate([[4, 5, 6, 7]], SamplingParams(**{**_fields(SEEDED), "seed": 78}))[0].token_ids != alone


def _fields(p: SamplingParams) -> dict:
    return {f: getattr(p, f) for f in p.__struct_fields__}


def test_a_seeded_request_gives_the_same_tokens_colocated_and_disaggregated(default_model_dir):
    from tests.runtime.inproc import Cluster
    from tetri.sched.front import FrontReq

    alone = LLM(default_model_dir, chunk_size=16).generate([[4, 5, 6, 7]], SEEDED)[0].token_ids
    c = Cluster(default_model_dir)  # prefill worker samples the first token, decode the rest
    c.apply(c.front.add(FrontReq("r", [4, 5, 6, 7], SEEDED, c.now), c.loads(), c.now))
    c.run()
    assert c.tokens["r"] == alone


# ---- CUDA (skipped without a GPU; never run here: no GPU was available) -------------------------

@pytest.mark.gpu
def test_on_cuda_the_sampler_draws_what_it_draws_on_cpu_with_one_sync():
    import warnings

    from tetri.workers.sample_noise import uniforms

    keys = [torch.randint(-2**62, 2**62, (4096,)), torch.randint(0, 8, (4096,)), torch.randint(0, 10**6, (4096,))]
    assert torch.equal(uniforms(*keys), uniforms(*(k.cuda() for k in keys)).cpu())  # the noise, bit for bit
    rows = [SampleRow(SamplingParams(**o), list(range(10, 10 + i)), [3, 4, 5]) for i, o in enumerate(OPTIONS.values())]
    lg = random_logits(len(rows), 32000, seed=7)
    with torch.inference_mode():
        lg_cuda = lg.cuda()
    cpu = Sampler(EOS).sample(lg, rows)
    s = Sampler(EOS)
    s.sample(lg_cuda, rows)  # warm-up: generator, pinned host blocks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = s.sample(lg_cuda, rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]
    assert got[0] == cpu[0]  # float32 softmax rounds differently there: a flip needs a near-tie
