import pytest
import torch

# The tests use small tensors: one thread is as fast, and on a busy 2-core machine a second thread
# spin-waiting for a core made small operations 5-200x slower.
torch.set_num_threads(1)


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
