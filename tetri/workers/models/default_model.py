"""The embedded default model: a tiny random-weight Llama with a byte-level BPE tokenizer.

Built once, deterministically and fully offline, into the user's cache directory
(`$TETRI_CACHE_DIR`, else `$XDG_CACHE_HOME/tetri-serve`, else `~/.cache/tetri-serve`), so
that `tetri-serve` and `LLM()` run on a fresh machine with no download. Its output is
gibberish: it exists to exercise the whole system, not to answer questions.

The lm_head is drawn with a large spread so the next-token distribution is peaked: greedy
decoding then has no near-ties, and different batch shapes (which round matmuls differently)
still pick the same tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

VERSION = "v1"
SPECIAL_TOKENS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A large language model reads a prompt and then
writes an answer one token at a time. Prefill reads the whole prompt at once and is limited
by compute; decode produces one token per step and is limited by memory bandwidth. When one
accelerator runs both phases, a long prompt stalls every running decode, and a crowd of
decodes starves new prompts. Splitting the phases onto different workers removes that
interference. The key-value cache of a prompt moves from the prefill worker to the decode
worker, block by block, without passing through the host. Hello, world! How are you today?
I am fine, thank you. What is the capital of France? Paris is the capital of France.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14159. Symbols: ( ) [ ] { } < > = + - * / %
# $ @ & ! ? ; : ' " , . _ ~ ^ | \\ `. Unicode: café, naïve, résumé, 東京, привет, 😀.
def main():\n    print("hello")\n    return 0\n
"""


def cache_root() -> Path:
    env = os.environ.get("TETRI_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tetri-serve"


def default_model_dir() -> Path:
    return cache_root() / f"default-model-{VERSION}"


def ensure_default_model() -> str:
    """Return the default model's directory, building it on first use."""
    target = default_model_dir()
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        _build(tmp)
        try:
            os.rename(tmp, target)  # atomic; another process may have won the race
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _build_tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return tok.get_vocab_size()


def _build(out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    vocab = _build_tokenizer(out)
    eos_ids = [SPECIAL_TOKENS.index("</s>"), SPECIAL_TOKENS.index("<|im_end|>")]
    hidden, inter, layers, heads, kv_heads = 128, 256, 2, 4, 2
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": eos_ids,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 0, "eos_token_id": eos_ids}, indent=2)
    )
    gen = torch.Generator().manual_seed(1234)

    def rand(*shape: int, std: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    weights = {"model.embed_tokens.weight": rand(vocab, hidden, std=1.0)}
    for i in range(layers):
        p = f"model.layers.{i}."
        weights[p + "self_attn.q_proj.weight"] = rand(heads * head_dim, hidden, std=0.1)
        weights[p + "self_attn.k_proj.weight"] = rand(kv_heads * head_dim, hidden, std=0.1)
        weights[p + "self_attn.v_proj.weight"] = rand(kv_heads * head_dim, hidden)
        weights[p + "self_attn.o_proj.weight"] = rand(hidden, heads * head_dim)
        weights[p + "mlp.gate_proj.weight"] = rand(inter, hidden)
        weights[p + "mlp.up_proj.weight"] = rand(inter, hidden)
        weights[p + "mlp.down_proj.weight"] = rand(hidden, inter)
        weights[p + "input_layernorm.weight"] = torch.ones(hidden)
        weights[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    weights["model.norm.weight"] = torch.ones(hidden)
    weights["lm_head.weight"] = rand(vocab, hidden, std=0.6)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
