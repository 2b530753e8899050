import os

import pytest
import torch

# Tests are written for the CI box: 2 cores, no GPU. Keep runs deterministic.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
