"""GGUF checkpoints, dequantized once into a cached Hugging Face directory.

The file is read with the `gguf` package and converted by transformers' own GGUF loader
(`load_gguf_checkpoint`: dequantization, llama.cpp's q/k permutation reversed, names mapped to
Hugging Face's), so config, tokenizer and chat template come from the file exactly as
`from_pretrained(..., gguf_file=...)` reads them. The result (config.json, tokenizer files,
generation_config.json, model.safetensors in the serving dtype) lands in
`<cache>/gguf/<stem>-<dtype>-<key>`, keyed by the file's identity (resolved path, size, mtime)
and this converter's version, and is written to a temporary directory renamed into place, so
concurrent first runs never see half a checkpoint. Every worker then loads the directory as
any other checkpoint (`loader.py`), in a fraction of the conversion's time.

Only the architectures `loader.py` runs are accepted, and only tensor types the `gguf` package
can dequantize; anything else is refused before any work with an error naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from tetri.workers.models.default_model import cache_root

CONVERTER_VERSION = 1
GGUF_ARCHS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
"""general.architecture -> the Hugging Face class it becomes (the ones `loader.SUPPORTED` runs)."""


class UnsupportedGGUF(ValueError):
    pass


def cache_dir_for(gguf_path: str, dtype: str) -> Path:
    st = os.stat(gguf_path)
    ident = f"{os.path.realpath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}|{CONVERTER_VERSION}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{Path(gguf_path).stem}-{dtype}-{key}"


def ensure_converted(gguf_path: str, dtype: str) -> str:
    """The cached directory of `gguf_path` in `dtype`, converting it on first use."""
    target = cache_dir_for(gguf_path, dtype)
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        convert(gguf_path, tmp, dtype)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def check_supported(gguf_path: str) -> str:
    """The Hugging Face architecture of the file; UnsupportedGGUF naming the architecture or
    the tensor type otherwise. Reads the metadata and one row of each tensor type."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(gguf_path)
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else "unknown"
    if arch not in GGUF_ARCHS:
        raise UnsupportedGGUF(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHS)}")
    seen = set()
    for tensor in reader.tensors:
        if tensor.tensor_type in seen:
            continue
        seen.add(tensor.tensor_type)
        try:
            dequantize(tensor.data[:1], tensor.tensor_type)
        except NotImplementedError:
            raise UnsupportedGGUF(f"GGUF tensor type {tensor.tensor_type.name} (in {tensor.name}) cannot be "
                                  "dequantized by the installed gguf package") from None
    name = reader.fields.get("general.name")
    if arch == "llama" and name is not None and "mistral" in str(name.contents()).lower():
        return GGUF_ARCHS["mistral"]  # transformers' own rule: llama.cpp files Mistral as llama
    return GGUF_ARCHS[arch]


def convert(gguf_path: str, out: Path, dtype: str) -> None:
    """Write `gguf_path` as a Hugging Face directory into `out`, weights in `dtype`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from tetri.workers.models.loader import DTYPE_NAMES

    arch = check_supported(gguf_path)
    folder, name = os.path.split(gguf_path)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.architectures = [arch]
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)  # only its parameter names are used
    if type(skeleton).__name__ != arch:
        raise UnsupportedGGUF(f"{gguf_path} became {type(skeleton).__name__}, expected {arch}")
    torch_dtype = DTYPE_NAMES[dtype]
    parsed = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=skeleton, torch_dtype=torch_dtype)
    tensors = {k: v.contiguous() for k, v in parsed["tensors"].items()}
    missing = [k for k in skeleton.state_dict() if k not in tensors and not k.startswith("lm_head.")]
    if missing:
        raise UnsupportedGGUF(f"{gguf_path} lacks tensors the model needs: {', '.join(missing[:5])}")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.dtype = torch_dtype
    config.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(str(out))
    eos = config.eos_token_id
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": config.bos_token_id, "eos_token_id": eos}))
    (out / "SOURCE").write_text(f"{os.path.realpath(gguf_path)}\n")
