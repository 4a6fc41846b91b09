"""SLO-aware prompt-token budget of one mixed step (Sarathi-Serve's token budget), pure code.

A mixed step runs every scheduled decode plus prompt pieces. Every decode in the batch waits
for the whole step, so the step's seconds are the decodes' time per output token: the prompt
tokens a step may carry follow from the TPOT SLO, not from a fixed chunk. `StepBudget`
learns the step time as a linear function of the step's shape,

    step_s ~ base_s + prompt_tokens * s_per_prompt_token + decode_reqs * s_per_decode
           + decode_context_tokens * s_per_context_token

from the (shape, measured seconds) pairs its caller feeds it (the real mixed core: its
measured step wall times; the simulator: the cost model's step times), and answers, beside
the decodes this step carries:

  - the largest prompt budget whose predicted step fits `tpot_s * margin`, when that is at
    least `chunk_size` (up to `max_tokens`): the slack a loose SLO leaves goes to prefill;
  - else `chunk_size`, cut down only as far as the predicted step must to fit `tpot_s`
    itself (down to `min_tokens`): below the operator's chunk the budget shrinks only for
    a step that would break the SLO, never for the margin (shrinking trades TTFT, and with
    it the TTFT SLO, for TPOT the SLO does not ask for).

The fit is ridge-regularized least squares with exponential forgetting, pulled toward a
prior: with no data it answers `chunk_size` (the prior says a step of `chunk_size` tokens
takes the target), so the first steps run as a fixed-chunk engine does; the measured
pairs take over within a few dozen steps. Only steps that carried prompt tokens are fed
(a decode-only step is memory-bound: its time says little about what a prompt token costs).

The margin (default 0.8) on growing: a request's TPOT is the mean over the steps it decoded in, and the
SLO judges its p99 over requests; a step predicted at 80% of the SLO leaves room for the
fit's error (the attention of a prompt piece grows with its start, which the shape leaves
out), for the KV copies and other work a step adds, and for the steps the fit has not yet
caught up with, so the p99 stays inside.

When even a step without prompt tokens is predicted over the SLO (the SLO cannot be met
on this worker at this batch), shrinking the prompt budget only stalls prefill without
saving the SLO: the budget is `chunk_size` then.

`fixed(chunk_size)` (no declared TPOT SLO, or `--step-budget fixed`) answers `chunk_size`
always: today's behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass

STEP_BUDGET_MODES = ("fixed", "slo")
DEFAULT_MARGIN = 0.8
MIN_TOKENS = 64
MAX_CHUNKS = 8
"""The largest budget is this many chunk_size (a bound on one step's activation memory)."""
_SCALES = (1.0, 1e-3, 1e-2, 1e-5)
"""Feature units (1, prompt tokens / 1000, decodes / 100, context tokens / 100k): comparable
magnitudes, so the ridge prior pulls on each coefficient alike."""


@dataclass(frozen=True)
class MixedStep:
    """What a mixed step carries (the fit's input)."""

    prompt_tokens: int
    decode_reqs: int = 0
    decode_context_tokens: int = 0

    def features(self) -> tuple[float, float, float, float]:
        raw = (1.0, float(self.prompt_tokens), float(self.decode_reqs), float(self.decode_context_tokens))
        return tuple(x * s for x, s in zip(raw, _SCALES))  # type: ignore[return-value]


class StepBudget:
    def __init__(self, chunk_size: int, tpot_s: float | None = None, margin: float = DEFAULT_MARGIN,
                 min_tokens: int | None = None, max_tokens: int | None = None, forget: float = 0.98,
                 prior_weight: float = 0.25) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        if tpot_s is not None and tpot_s <= 0:
            raise ValueError("tpot_s must be > 0")
        if not 0 < margin <= 1:
            raise ValueError("margin must be in (0, 1]")
        if not 0 < forget <= 1:
            raise ValueError("forget must be in (0, 1]")
        self.chunk_size = chunk_size
        self.tpot_s = tpot_s
        self.target_s = None if tpot_s is None else tpot_s * margin
        self.min_tokens = min(chunk_size, MIN_TOKENS) if min_tokens is None else min_tokens
        self.max_tokens = MAX_CHUNKS * chunk_size if max_tokens is None else max_tokens
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError("need 1 <= min_tokens <= max_tokens")
        self.forget = forget
        self.samples = 0
        # prior: a chunk_size-token step (decodes counted as prompt tokens) takes the target
        per_token = (self.target_s or 1.0) / chunk_size
        self._prior = (0.0, per_token / _SCALES[1], per_token / _SCALES[2], 0.0)
        self._prior_weight = prior_weight
        n = len(_SCALES)
        self._xtx = [[0.0] * n for _ in range(n)]
        self._xty = [0.0] * n
        self._coef = self._prior

    @classmethod
    def fixed(cls, chunk_size: int) -> StepBudget:
        return cls(chunk_size, None)

    @property
    def adaptive(self) -> bool:
        return self.target_s is not None

    # ---- learning ----------------------------------------------------------------
    def observe(self, shape: MixedStep, seconds: float) -> None:
        """One measured step. Steps without prompt tokens are ignored (see the module doc)."""
        if not self.adaptive or shape.prompt_tokens <= 0 or seconds <= 0:
            return
        x = shape.features()
        f = self.forget
        for i, xi in enumerate(x):
            row = self._xtx[i]
            for j, xj in enumerate(x):
                row[j] = f * row[j] + xi * xj
            self._xty[i] = f * self._xty[i] + xi * seconds
        self.samples += 1
        self._coef = self._solve()

    def _solve(self) -> tuple[float, ...]:
        """(prior_weight * I + X'X) coef = prior_weight * prior + X'y (Gaussian elimination)."""
        n, lam = len(self._xty), self._prior_weight * self._prior_scale()
        a = [[self._xtx[i][j] + (lam if i == j else 0.0) for j in range(n)] + [self._xty[i] + lam * self._prior[i]]
             for i in range(n)]
        for col in range(n):
            pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
            a[col], a[pivot] = a[pivot], a[col]
            if a[col][col] == 0.0:
                return self._prior
            for r in range(n):
                if r != col:
                    k = a[r][col] / a[col][col]
                    a[r] = [v - k * p for v, p in zip(a[r], a[col])]
        return tuple(a[i][n] / a[i][i] for i in range(n))

    def _prior_scale(self) -> float:
        """The ridge strength in the units of X'X: the prior counts as `prior_weight` steps
        whose features are the size of one chunk_size step's."""
        x = MixedStep(self.chunk_size, 0, 0).features()
        return sum(v * v for v in x) / len(x)

    # ---- answers -----------------------------------------------------------------
    def predict_s(self, shape: MixedStep) -> float:
        return sum(c * x for c, x in zip(self._coef, shape.features()))

    def budget(self, decode_reqs: int = 0, decode_context_tokens: int = 0, extra_s: float = 0.0) -> int:
        """Prompt tokens this step may carry beside `decode_reqs` decodes whose contexts sum to
        `decode_context_tokens`; `extra_s`: seconds the step spends anyway (KV copies)."""
        if not self.adaptive:
            return self.chunk_size
        fixed_s = extra_s + self.predict_s(MixedStep(0, decode_reqs, decode_context_tokens))
        per_token_s = self._coef[1] * _SCALES[1]
        if per_token_s <= 0:  # (a degenerate fit: prompt tokens look free)
            return self.max_tokens
        grow = int((self.target_s - fixed_s) / per_token_s)
        if grow >= self.chunk_size:
            return min(self.max_tokens, grow)
        hold_s = self.tpot_s - fixed_s
        if hold_s <= 0:
            return self.chunk_size  # the SLO is out of reach at this batch: do not stall prefill too
        return max(self.min_tokens, min(self.chunk_size, int(hold_s / per_token_s)))


def make_step_budget(mode: str, chunk_size: int, tpot_s: float | None, margin: float = DEFAULT_MARGIN,
                     max_tokens: int | None = None) -> StepBudget:
    """`mode` "slo" with a declared TPOT: the adaptive budget; otherwise the fixed chunk."""
    if mode not in STEP_BUDGET_MODES:
        raise ValueError(f"step budget must be one of {STEP_BUDGET_MODES}, got {mode!r}")
    if mode == "fixed" or tpot_s is None:
        return StepBudget.fixed(chunk_size)
    return StepBudget(chunk_size, tpot_s, margin, max_tokens=max_tokens)
