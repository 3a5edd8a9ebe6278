"""Bad settings and bad inputs of the MoE layer and its learner-facing functions: refused once, by name."""

import math

import pytest
import torch

from helpers.moe import Balancing, DeepSeekMoE, dispatch, gating_weights

SIZES = (16, 8, 8, 2)  # H, I, N_r, K_r

BAD_SETTINGS = [
    ("norm_topk_prob a string", dict(norm_topk_prob="yes"), TypeError, ["norm_topk_prob", "True or False"]),
    ("norm_topk_prob an int", dict(norm_topk_prob=1), TypeError, ["norm_topk_prob"]),
    ("infinite scale", dict(routed_scaling_factor=math.inf), ValueError, ["routed_scaling_factor", "finite"]),
    ("NaN scale", dict(routed_scaling_factor=math.nan), ValueError, ["routed_scaling_factor", "finite"]),
    ("zero scale", dict(routed_scaling_factor=0.0), ValueError, ["routed_scaling_factor", "positive"]),
    ("NaN gamma", dict(gamma=math.nan), ValueError, ["gamma", "finite"]),
    ("negative alpha", dict(aux_loss_alpha=-1.0), ValueError, ["aux_loss_alpha", ">= 0"]),
    ("infinite seq alpha", dict(seq_aux_loss_alpha=math.inf), ValueError, ["seq_aux_loss_alpha"]),
    ("unknown backend", dict(backend="sorteed"), ValueError, ["backend", "did you mean 'sorted'"]),
    ("unknown scoring", dict(scoring_func="sigmod"), ValueError, ["scoring_func", "did you mean 'sigmoid'"]),
    ("unknown group score", dict(group_score="top3_sum"), ValueError, ["group_score"]),
    ("shared experts negative", dict(n_shared_experts=-1), ValueError, ["n_shared_experts"]),
    ("both balancing forms", dict(gamma=0.1, balancing=Balancing()), ValueError, ["balancing", "not both"]),
]


@pytest.mark.parametrize(("what", "kwargs", "exc", "words"), BAD_SETTINGS, ids=[r[0] for r in BAD_SETTINGS])
def test_bad_settings_are_refused_at_build_by_name(what, kwargs, exc, words):
    with pytest.raises(exc) as info:
        DeepSeekMoE(*SIZES, **kwargs)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


@pytest.mark.parametrize("kwargs", [dict(gamma=math.nan), dict(aux_loss_alpha=-0.1), dict(seq_aux_loss_alpha="1")])
def test_balancing_checks_itself(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Balancing(**kwargs)


def test_setting_an_unknown_backend_on_a_layer_names_the_closest():
    layer = DeepSeekMoE(*SIZES)
    with pytest.raises(ValueError, match="did you mean 'reference'"):
        layer.backend = "referense"
    assert layer.backend == "auto"


def test_nan_input_is_refused_in_training_only():
    layer = DeepSeekMoE(*SIZES)
    x = torch.randn(1, 3, 16)
    x[0, 1, 2] = math.nan
    with pytest.raises(ValueError, match="u holds 1 NaN"):
        layer.train()(x)
    assert not layer.load_since_update.any()  # refused before the load was counted
    layer.eval()(x)  # eval and decode: no scan of the data


def test_forward_checks_rank_width_and_dtype():
    layer = DeepSeekMoE(*SIZES)
    with pytest.raises(ValueError, match="at least 2 dims"):
        layer(torch.randn(16))
    with pytest.raises(ValueError, match="hidden_size=16"):
        layer(torch.randn(1, 3, 12))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(1, 3, 16, dtype=torch.float64))


def dispatch_args(n_tokens=4, hidden=8, inter=4, n_experts=6, top_k=2):
    torch.manual_seed(0)
    return (torch.randn(n_tokens, hidden), torch.rand(n_tokens, top_k), torch.randint(0, n_experts, (n_tokens, top_k)),
            torch.randn(n_experts, 2 * inter, hidden), torch.randn(n_experts, hidden, inter))


BAD_DISPATCH = [
    ("u of 3 dims", lambda u, w, i, g, d: dispatch(u[None], w, i, g, d), ValueError, ["u must be [tokens, hidden=8]"]),
    ("u of another width", lambda u, w, i, g, d: dispatch(u[:, :5], w, i, g, d), ValueError, ["hidden=8"]),
    ("u in float64", lambda u, w, i, g, d: dispatch(u.double(), w, i, g, d), TypeError, ["u has dtype"]),
    ("float indices", lambda u, w, i, g, d: dispatch(u, w, i.float(), g, d), TypeError, ["indices", "integer"]),
    ("an id past the experts", lambda u, w, i, g, d: dispatch(u, w, i + 6, g, d), ValueError, ["[0, 6)"]),
    ("experts of other sizes", lambda u, w, i, g, d: dispatch(u, w, i, g, d[:, :, :3]), ValueError,
     ["w_gate_up must be (E, 2I, H)"]),
    ("a list for u", lambda u, w, i, g, d: dispatch(u.tolist(), w, i, g, d), TypeError, ["u must be a torch.Tensor"]),
    ("unknown backend", lambda u, w, i, g, d: dispatch(u, w, i, g, d, backend="grouped_mm"), ValueError,
     ["backend", "did you mean 'grouped'"]),
    ("threads for the reference", lambda u, w, i, g, d: dispatch(u, w, i, g, d, n_workers=2, backend="reference"),
     ValueError, ["n_workers applies to"]),
]


@pytest.mark.parametrize(("what", "call", "exc", "words"), BAD_DISPATCH, ids=[r[0] for r in BAD_DISPATCH])
def test_dispatch_checks_its_arguments_by_name(what, call, exc, words):
    with pytest.raises(exc) as info:
        call(*dispatch_args())
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


def test_dispatch_takes_backend_names_as_path_or_backend():
    args = dispatch_args()
    want = dispatch(*args, backend="reference")
    for name in ("loop", "sorted", "grouped", "auto"):
        torch.testing.assert_close(dispatch(*args, path=name), want)
        torch.testing.assert_close(dispatch(*args, backend=name), want)


def test_gating_weights_checks_the_scale_as_a_finite_number():
    scores, indices = torch.rand(3, 6), torch.tensor([[0, 1], [2, 3], [4, 5]])
    with pytest.raises(ValueError, match="routed_scaling_factor must be a finite positive number"):
        gating_weights(scores, indices, True, math.nan)
