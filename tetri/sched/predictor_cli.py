"""`tetri-predictor` console-script shim.

sched/ stays pure (no torch), so the real CLI lives in `tetri.predictor.cli` and is imported
only when the command runs.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from tetri.predictor.cli import main as predictor_main  # lazy: torch, numpy

    return predictor_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
