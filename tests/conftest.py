import os
import pathlib
import sys

import matplotlib
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Plots in this process go to an off-screen canvas; the setting must not reach notebook kernels
# (nbval starts them with this environment, and a kernel with MPLBACKEND=Agg shows no plots).
os.environ.pop("MPLBACKEND", None)
matplotlib.use("Agg")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tests use tiny tensors: one thread avoids oversubscription stalls on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
