import pathlib
import sys

import pytest
import torch

# Make the helper modules in tests/ importable (exact.py and friends).
sys.path.insert(0, str(pathlib.Path(__file__).parent))


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
