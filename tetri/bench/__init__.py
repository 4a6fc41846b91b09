"""tetri-bench: workload generation, a streaming OpenAI-compatible client, and reports.

Light to import (no torch, no aiohttp): the simulator uses `build_report` / `RequestRecord`.
"""

from tetri.bench.records import RequestRecord, Slo
from tetri.bench.report import build_report

__all__ = ["RequestRecord", "Slo", "build_report"]
