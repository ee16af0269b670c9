"""Fixtures shared by the SAE tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run the test with one torch intra-op thread, restoring the previous setting afterwards.

    Tiny shapes: on a shared 2-core machine OpenMP threads only spin against each other. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
