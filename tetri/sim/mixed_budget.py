"""A simulated mixed worker's per-step prompt budget, through the real `tetri.sched.step_budget`.

The fit is fed the cost model's seconds for each mixed step that carried prompt tokens, as
the real mixed core feeds its measured step wall times; "fixed" keeps Sarathi's budget of
`chunk_size` tokens with each decode counting one (mode colocated-chunked's baseline).
"""

from __future__ import annotations

from tetri.sched.step_budget import MixedStep, make_step_budget
from tetri.sim.costmodel import StepShape
from tetri.sim.requests import SimRequest
from tetri.sim.workers import WorkerEnv, decode_context_tokens


class SimStepBudget:
    def __init__(self, env: WorkerEnv) -> None:
        self.chunk_size = env.chunk_size_tokens
        self.fit = make_step_budget(env.step_budget, env.chunk_size_tokens, env.step_tpot_s)

    def prompt_budget(self, run: list[SimRequest], extra_s: float = 0.0, taken_tokens: int = 0) -> int:
        """Prompt tokens this step may add beside the decodes `run`; `extra_s`: seconds the step
        spends anyway (KV copies); `taken_tokens`: prompt tokens it already carries (re-prefills)."""
        if not self.fit.adaptive:
            return self.chunk_size - len(run)
        budget = self.fit.budget(len(run), decode_context_tokens(run), extra_s)
        return max(self.fit.min_tokens, budget - taken_tokens)

    def observe(self, run: list[SimRequest], shape: StepShape, seconds: float) -> None:
        self.fit.observe(MixedStep(shape.prefill_tokens, len(run), decode_context_tokens(run)), seconds)
