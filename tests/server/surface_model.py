"""A copy of the embedded model's directory whose tokenizer exercises every request field:
a BOS post-processor (so `add_special_tokens` changes the ids), fill-in-the-middle tokens (so
`suffix` has a template) and a chat template that renders `name`, `tool_call_id`, an assistant's
`tool_calls` and the request's `tools`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

FIM = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>tools\n{{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}"
    "{% if m.get('name') %} name={{ m['name'] }}{% endif %}"
    "{% if m.get('tool_call_id') %} call={{ m['tool_call_id'] }}{% endif %}{{ '\\n' }}"
    "{{ m['content'] }}{% for c in m.get('tool_calls') or [] %}<tool_call>{{ c | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_surface_model(default_model_dir: str, out: Path) -> str:
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.processors import TemplateProcessing

    shutil.copytree(default_model_dir, out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True) for t in FIM])
    bos = tok.token_to_id("<s>")
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tok.save(str(out / "tokenizer.json"))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    for extra in ("chat_template.jinja",):
        (out / extra).unlink(missing_ok=True)
    config = json.loads((out / "config.json").read_text())
    config["vocab_size"] = tok.get_vocab_size()
    (out / "config.json").write_text(json.dumps(config))
    return str(out)
