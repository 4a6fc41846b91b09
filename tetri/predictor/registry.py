"""Length-predictor specs (`--predictor none | oracle | model:DIR`) -> predictors.

The composition root's side of the predictor: it knows both the pure predictors
(`tetri.sched.predictor`) and the trained ones (`tetri.predictor.model`, torch, imported
only for a `model:` spec), so neither of those imports the other's package.
"""

from __future__ import annotations

from tetri.sched.predictor import LengthPredictor, NonePredictor, OraclePredictor

PREDICTOR_SPECS = ("none", "oracle", "model:DIR")


def make_predictor(spec: str, bucket_tokens: int = 200) -> LengthPredictor:
    """Parse `none | oracle | model:DIR`. A model's bucket width comes from its meta.json."""
    if spec == "none":
        return NonePredictor(bucket_tokens)
    if spec == "oracle":
        return OraclePredictor(bucket_tokens)
    if spec.startswith("model:") and len(spec) > len("model:"):
        from tetri.predictor.model import load_predictor  # lazy: torch lives there

        return load_predictor(spec[len("model:"):])
    raise ValueError(f"predictor must be one of {PREDICTOR_SPECS}, got {spec!r}")
