import pytest
import torch

from helpers import seed_everything
from helpers.rules import require_positive
from helpers.teaching.plotting import axes


def test_seed_everything_repeats_random_streams():
    seed_everything(3)
    a = torch.randn(5)
    seed_everything(3)
    assert torch.equal(a, torch.randn(5))
    seed_everything(4)
    assert not torch.equal(a, torch.randn(5))


@pytest.mark.parametrize("bad", [-1, 1.5, "0", True])
def test_seed_everything_rejects_bad_seed(bad):
    with pytest.raises(ValueError, match="seed"):
        seed_everything(bad)


def test_require_positive_names_the_field():
    require_positive(a=1, b=None)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        require_positive(n_heads=4, kv_lora_rank=0)


def test_axes_requires_title_and_labels():
    ax = axes("KV cache", "context length (tokens)", "cache (GiB)")
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("KV cache", "context length (tokens)", "cache (GiB)")
    with pytest.raises(ValueError, match="ylabel"):
        axes("KV cache", "context length (tokens)", "")
