"""tetri-serve: a single-node LLM server that disaggregates prefill from decode."""

from tetri.types import CompletionOutput, RequestOutput, SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The offline engine imports torch; keep `import tetri` light for the front process.
    if name == "LLM":
        from tetri.llm import LLM

        return LLM
    raise AttributeError(name)
