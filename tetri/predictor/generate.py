"""`tetri-predictor generate`: the served model's own output lengths and hidden states.

The honest labels for a length predictor of model M are M's own output lengths, in M's own
tokens, on prompts it was not trained on. This runs M in the real offline engine
(`tetri.LLM`, greedy, batched) over chat prompts, rendered as `tetri-serve`'s chat endpoint
renders them (the model's chat template, encoded without extra special tokens), and writes
one JSONL line per prompt in the format `tetri-serve --log-lengths` writes:

    prompt         the prompt text as the server logs it (decoded prompt ids, specials skipped)
    output_tokens  the greedy response's length in tokens (capped by --max-tokens)
    finish_reason  "stop" (a natural length) or "length" (cut at the cap)
    prompt_tokens  prompt length in tokens
    hidden         the final-norm hidden state of the last prompt token, taken from the same
                   forward pass that samples the first token (`ModelRunner.last_hidden`, what
                   a prefill worker returns in `PrefillResult.hidden`)
plus `instruction` (the raw user message), `dataset` and `generator` (the model's name).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

ALPACA_INSTRUCTIONS = Path("/work/shared/datasets/alpaca_eval/model_outputs/Meta-Llama-3-8B-Instruct.json")


def alpaca_instructions(path: str | Path = ALPACA_INSTRUCTIONS) -> list[dict]:
    """The AlpacaEval instructions (one per prompt, in file order) with their sub-dataset."""
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    seen, out = set(), []
    for rec in records:
        if rec["instruction"] in seen:
            continue
        seen.add(rec["instruction"])
        out.append({"instruction": rec["instruction"], "dataset": rec.get("dataset")})
    return out


class HiddenCapture:
    """Wraps an `Executor.run` and keeps, per request, the hidden row of the step that
    sampled its first token (sampling row i of a step is `sample_seqs[i]`)."""

    def __init__(self, executor) -> None:
        self.executor = executor
        self.hidden: dict[str, list[float]] = {}
        self._run = executor.run
        executor.run = self

    def __call__(self, segments, sample_seqs):
        firsts = [i for i, seqs in enumerate(sample_seqs) if seqs and not seqs[0].output_ids]
        out = self._run(segments, sample_seqs)
        rows = self.executor.runner.last_hidden
        for i in firsts:
            req_id = sample_seqs[i][0].req_id
            self.hidden.setdefault(req_id, rows[i].float().tolist())
        return out


def render_chat(tokenizer, instruction: str) -> tuple[list[int], str]:
    """(prompt ids, prompt text as the server logs it) of one user message."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                         add_generation_prompt=True)
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    return ids, tokenizer.decode(ids, skip_special_tokens=True)


def done_instructions(out_path: str | Path) -> set[str]:
    """Instructions already answered in `out_path` (for --resume)."""
    if not Path(out_path).exists():
        return set()
    return {json.loads(line)["instruction"] for line in open(out_path, encoding="utf-8") if line.strip()}


def generate_lengths(model_dir: str, items: Iterable[dict], out_path: str | Path, *, max_tokens: int = 512,
                     max_num_seqs: int = 256, kv_cache_gb: float | None = None, generator: str | None = None,
                     batch: int = 0, resume: bool = False, log=None) -> dict:
    """Greedy responses of `model_dir` to `items` (`instruction`, optional `dataset`); writes the
    JSONL (see the module doc) and returns counts. `batch` > 0 submits that many prompts per
    `generate` call and writes them before the next (a checkpoint); 0 submits all at once.
    `resume` appends to `out_path`, skipping the instructions it already holds; `log(text)`
    hears about each finished batch."""
    from tetri import LLM, SamplingParams  # lazy: torch

    done = done_instructions(out_path) if resume else set()
    items = [it for it in items if it["instruction"] not in done]
    llm = LLM(model_dir, dtype="float32", max_num_seqs=max_num_seqs, kv_cache_gb=kv_cache_gb)
    tok = llm.tokenizer
    if tok is None:
        raise ValueError(f"{model_dir} ships no tokenizer")
    capture = HiddenCapture(llm.executor)
    generator = generator or Path(model_dir).name
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    counts = {"n": 0, "stop": 0, "length": 0}
    step = batch if batch > 0 else max(1, len(items))
    with open(out_path, "a" if resume else "w", encoding="utf-8") as f:
        for start in range(0, len(items), step):
            part = items[start:start + step]
            rendered = [render_chat(tok, it["instruction"]) for it in part]
            outs = llm.generate([ids for ids, _ in rendered], params)
            for it, (ids, text), out in zip(part, rendered, outs):
                choice = out.outputs[0]
                line = {"prompt": text, "output_tokens": len(choice.token_ids), "finish_reason": choice.finish_reason,
                        "prompt_tokens": len(ids), "hidden": capture.hidden.pop(out.req_id),
                        "instruction": it["instruction"], "dataset": it.get("dataset"), "generator": generator}
                f.write(json.dumps(line) + "\n")
                counts["n"] += 1
                counts[choice.finish_reason] = counts.get(choice.finish_reason, 0) + 1
            f.flush()
            if log is not None:
                log(f"{counts['n']} of {len(items)} prompts done ({len(done)} before)")
    llm.close()
    return counts
