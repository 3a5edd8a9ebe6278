"""YaRN (DeepSeek-V3 §4.3) in our MLA, DSA and model equals transformers, past the original context.

transformers computes YaRN in ``modeling_rope_utils._compute_yarn_parameters`` (frequencies, cos/sin factor) and
``DeepseekV3Attention.scaling`` (softmax scale times mscale^2). Our layers read the same ``rope_parameters``
(helpers.mla.rope.YaRN). Every parameter is randomised; sequences run past ``original_max_position_embeddings``.
"""

import math

import pytest
import torch
from nbload import load_notebook
from transformers import DeepseekV3ForCausalLM, DeepseekV32ForCausalLM
from transformers.masking_utils import create_causal_mask
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3RotaryEmbedding,
)
from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Attention

from helpers.configs import tiny_config
from helpers.dsa.hf import hf_attention_forward
from helpers.hf import dsa_from_hf, mla_from_hf, mla_to_hf
from helpers.mla import LatentCache, MultiHeadLatentAttention, YaRN, rope_cos_sin
from helpers.mla.checks import check_yarn_inv_freq, check_yarn_softmax_scale
from helpers.model import DeepSeekV3
from helpers.model.hf import model_from_hf
from helpers.teaching.checks import CheckFailure
from helpers.utils import seed_everything

ORIGINAL, FACTOR = 32, 4  # max_position_embeddings = FACTOR * ORIGINAL, so transformers does not warn
V3_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=float(FACTOR), original_max_position_embeddings=ORIGINAL,
               beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)  # DeepSeek-V3's fields, small
ROPES = {
    "V3 (mscale = mscale_all_dim = 1)": V3_YARN,
    "V2 (mscale = mscale_all_dim = 0.707)": dict(V3_YARN, mscale=0.707, mscale_all_dim=0.707),
    "mscale != mscale_all_dim: cos, sin scaled too": dict(V3_YARN, mscale=1.0, mscale_all_dim=0.5),
    "plain YaRN (no mscale: cos, sin times 0.1 ln s + 1)": dict(V3_YARN, mscale=None, mscale_all_dim=None),
    "no truncation, beta 16 / 2, theta 500": dict(V3_YARN, truncate=False, beta_fast=16.0, beta_slow=2.0,
                                                 rope_theta=500.0),
    "explicit attention_factor": dict(V3_YARN, attention_factor=0.8),
}
LAYERS = {  # (rope case, config overrides)
    "V3, interleaved": ("V3 (mscale = mscale_all_dim = 1)", dict(rope_interleave=True)),
    "V3, half-split, no q compression": ("V3 (mscale = mscale_all_dim = 1)", dict(rope_interleave=False,
                                                                                  q_lora_rank=None)),
    "V2 mscale, wide rope": ("V2 (mscale = mscale_all_dim = 0.707)", dict(qk_rope_head_dim=16)),
    "cos/sin scaled": ("mscale != mscale_all_dim: cos, sin scaled too", dict()),
    "plain YaRN": ("plain YaRN (no mscale: cos, sin times 0.1 ln s + 1)", dict(qk_rope_head_dim=12)),
    "no truncation": ("no truncation, beta 16 / 2, theta 500", dict(qk_rope_head_dim=16)),
}
T, PREFILL = 100, 40  # both past ORIGINAL


def yarn_config(version="v3", rope=V3_YARN, **overrides):
    return tiny_config(version, rope_parameters=dict(rope), max_position_embeddings=FACTOR * ORIGINAL, **overrides)


def randomise(module, std=0.3):
    """Every parameter random (norm weights around 1), so no piece can be skipped unnoticed."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            norm = "norm" in name
            p.copy_(torch.randn_like(p) * (0.1 if norm else std) + (1.0 if norm and name.endswith("weight") else 0.0))
        for m in module.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(std=0.1)
    return module.eval()


def hf_prefill(attn, x):
    """transformers' attention over the whole sequence, as DeepseekV3Model drives it (rotary, causal mask)."""
    position_ids = torch.arange(x.shape[1])[None]  # (1, T)
    mask = create_causal_mask(config=attn.config, inputs_embeds=x, attention_mask=None, past_key_values=None,
                              position_ids=position_ids, allow_is_causal_skip=False)
    return attn(x, DeepseekV3RotaryEmbedding(attn.config)(x, position_ids), mask)[0]


# --- the pieces: frequencies, cos/sin factor, softmax scale ----------------------------------------------

@pytest.mark.parametrize("case", list(ROPES))
@pytest.mark.parametrize("dim", [8, 16, 64])
def test_frequencies_and_scales_equal_transformers(case, dim):
    config = yarn_config(rope=ROPES[case], qk_rope_head_dim=dim)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    yarn = YaRN.from_rope_parameters(config.rope_parameters)
    theta = config.rope_parameters["rope_theta"]
    assert torch.equal(yarn.inv_freq(dim, theta), inv_freq)
    assert yarn.cos_sin_scale == attention_factor
    assert MultiHeadLatentAttention.from_config(config).softmax_scale == DeepseekV3Attention(config, 0).scaling
    positions = torch.arange(3 * ORIGINAL)
    cos, sin = rope_cos_sin(positions, dim, theta, yarn)  # (T, dim/2)
    want_cos, want_sin = DeepseekV3RotaryEmbedding(config)(torch.zeros(1), positions[None])  # (1, T, dim)
    assert torch.equal(cos, want_cos[0, :, : dim // 2]) and torch.equal(sin, want_sin[0, :, : dim // 2])


def test_the_ramp_keeps_fast_pairs_and_interpolates_slow_ones():
    yarn = YaRN(factor=40.0, original_max_position_embeddings=4096)  # DeepSeek-V3: d_h^R = 64, theta 10^4
    plain = 1.0 / 10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float) / 64)
    ratio = yarn.inv_freq(64, 10000.0) / plain  # (32,): 1 kept, 1/40 interpolated
    low, high = yarn.correction_range(64, 10000.0)
    assert (low, high) == (10, 23)  # the pairs turning 32 and 1 times over 4096 tokens, rounded outwards
    assert torch.equal(ratio[:low + 1], torch.ones(low + 1))
    torch.testing.assert_close(ratio[high:], torch.full((32 - high,), 1 / 40))
    assert (ratio[low + 1:high] < 1).all() and (ratio[low + 1:high] > 1 / 40).all()
    assert (ratio[1:] <= ratio[:-1] + 1e-6).all()  # monotone: the slower the pair, the more it is interpolated
    assert yarn.scale_softmax(1.0) == 1.0  # no mscale_all_dim: the softmax scale is unchanged
    v3 = YaRN(factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0)
    assert v3.cos_sin_scale == 1.0 and v3.scale_softmax(1.0) == pytest.approx((0.1 * math.log(40) + 1) ** 2)


def test_factor_one_is_plain_rope():
    config = tiny_config()
    layer = randomise(MultiHeadLatentAttention.from_config(config))
    stretched = MultiHeadLatentAttention(**dict(layer.settings(), yarn=YaRN(factor=1.0,
                                                                             original_max_position_embeddings=16)))
    stretched.load_state_dict(layer.state_dict())
    x = torch.randn(1, 40, config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(stretched(x), layer(x), atol=1e-6, rtol=1e-6)


# --- the MLA layer --------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["naive", "absorbed"])
@pytest.mark.parametrize("case", list(LAYERS))
def test_layer_prefill_and_decode_equal_transformers(case, backend):
    seed_everything(0)
    rope, overrides = LAYERS[case]
    attn = randomise(DeepseekV3Attention(yarn_config(rope=ROPES[rope], **overrides), 0))
    ours = mla_from_hf(attn)
    ours.backend = backend
    x = torch.randn(2, T, attn.config.hidden_size)
    with torch.no_grad():
        want = hf_prefill(attn, x)  # (2, T, H)
        torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=1e-5)
        cache = LatentCache()
        steps = [ours(x[:, :PREFILL], cache)] + [ours(x[:, t:t + 1], cache) for t in range(PREFILL, T)]
        torch.testing.assert_close(torch.cat(steps, dim=1), want, atol=1e-5, rtol=1e-5)
        # YaRN matters here: the same weights with plain RoPE and the plain softmax scale give another output
        plain = MultiHeadLatentAttention(**dict(ours.settings(), yarn=None))
        plain.load_state_dict(ours.state_dict())
        assert (plain(x) - want)[:, ORIGINAL:].abs().max() > 1e-3


def test_layer_round_trip_builds_the_yarn_config():
    seed_everything(1)
    ours = randomise(MultiHeadLatentAttention(64, 4, 16, 16, 8, 16, q_lora_rank=32, yarn=YaRN(
        factor=4.0, original_max_position_embeddings=ORIGINAL, mscale=0.707, mscale_all_dim=0.707)))
    hf = mla_to_hf(ours)  # config from config_fields(): rope_parameters and max_position_embeddings = s L
    assert hf.config.max_position_embeddings == FACTOR * ORIGINAL
    assert hf.config.rope_parameters["rope_type"] == "yarn" and hf.scaling == ours.softmax_scale
    x = torch.randn(1, 70, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf_prefill(hf, x), atol=1e-5, rtol=1e-5)
    assert mla_from_hf(hf).settings() == ours.settings()


# --- DSA (V3.2): the indexer's RoPE is stretched too ------------------------------------------------------

def test_dsa_layer_equals_transformers_with_yarn():
    seed_everything(0)
    config = yarn_config("v32", index_n_heads=6, index_topk=5)
    attn = randomise(DeepseekV32Attention(config, 0))
    ours = dsa_from_hf(attn)
    assert ours.yarn == ours.indexer.yarn == YaRN.from_rope_parameters(config.rope_parameters)
    x = torch.randn(2, 60, config.hidden_size)
    chunks = [x[:, :PREFILL]] + [x[:, t:t + 1] for t in range(PREFILL, 60)]
    with torch.no_grad():
        for parts in ([x], chunks):
            want, _ = hf_attention_forward(attn, parts)
            cache = ours.new_cache()
            got = torch.cat([ours(part, cache) for part in parts], dim=1)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- the model --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["v3", "v32"])
def model_pair(request):
    torch.manual_seed(0)
    cls = DeepseekV3ForCausalLM if request.param == "v3" else DeepseekV32ForCausalLM
    extra = dict(index_n_heads=6, index_topk=5) if request.param == "v32" else {}
    hf = cls(yarn_config(request.param, **extra))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        for m in hf.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(std=0.1)
    hf.eval().generation_config.eos_token_id = None
    return hf, model_from_hf(hf)


def test_model_logits_equal_transformers_past_the_original_length(model_pair):
    hf, ours = model_pair
    assert all(block.attn.yarn is not None for block in ours.layers)
    ids = torch.randint(0, hf.config.vocab_size, (2, 3 * ORIGINAL), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_model_greedy_generation_equals_transformers_past_the_original_length(model_pair):
    hf, ours = model_pair
    ids = torch.randint(0, hf.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    want = hf.generate(ids, max_new_tokens=2 * ORIGINAL, do_sample=False)  # to position 84 > 32
    assert torch.equal(ours.generate(ids, 2 * ORIGINAL), want)


# --- refusals: another rope type, bad YaRN fields -----------------------------------------------------------

BAD = [  # (what, rope_parameters changes, words the message must hold)
    ("rope_type linear", dict(rope_type="linear"), ["rope_type", "'linear'", "yarn"]),
    ("rope_type dynamic", dict(rope_type="dynamic"), ["rope_type", "'dynamic'"]),
    ("factor missing", dict(factor=None), ["factor", "missing"]),
    ("original length missing", dict(original_max_position_embeddings=None),
     ["original_max_position_embeddings", "missing"]),
    ("factor below 1", dict(factor=0.5), ["factor", "at least 1"]),
    ("factor nan", dict(factor=float("nan")), ["factor", "finite"]),
    ("factor inf", dict(factor=float("inf")), ["factor", "finite"]),
    ("original length 0", dict(original_max_position_embeddings=0), ["original_max_position_embeddings", "positive"]),
    ("original length 32.5", dict(original_max_position_embeddings=32.5), ["original_max_position_embeddings"]),
    ("betas swapped", dict(beta_fast=1.0, beta_slow=32.0), ["beta_fast", "greater than beta_slow", "swapped"]),
    ("betas equal", dict(beta_fast=4.0, beta_slow=4.0), ["beta_fast", "beta_slow"]),
    ("beta_slow negative", dict(beta_slow=-1.0), ["beta_slow", "positive"]),
    ("mscale negative", dict(mscale=-1.0), ["mscale", ">= 0"]),
    ("mscale_all_dim nan", dict(mscale_all_dim=float("nan")), ["mscale_all_dim", "finite"]),
    ("attention_factor 0", dict(attention_factor=0.0), ["attention_factor", "positive"]),
    ("misspelt key", dict(beta_fats=32.0), ["beta_fats", "did you mean 'beta_fast'"]),
    ("partial rotation", dict(partial_rotary_factor=0.5), ["partial_rotary_factor"]),
]


@pytest.mark.parametrize("what, change, words", BAD, ids=[b[0] for b in BAD])
def test_bad_rope_parameters_name_the_field(what, change, words):
    rope = dict(V3_YARN, **change)
    config = yarn_config()
    config.rope_parameters = rope  # after construction: transformers would only warn
    for build in (lambda: YaRN.from_rope_parameters(rope), lambda: MultiHeadLatentAttention.from_config(config),
                  lambda: DeepSeekV3(config)):
        with pytest.raises(ValueError) as err:
            build()
        for word in words:
            assert word in str(err.value), (what, str(err.value))


def test_flags_and_types_are_refused():
    with pytest.raises(TypeError, match="truncate"):
        YaRN.from_rope_parameters(dict(V3_YARN, truncate=None))  # transformers would read None as False
    with pytest.raises(TypeError, match="truncate"):
        YaRN(factor=4.0, original_max_position_embeddings=32, truncate="yes")
    with pytest.raises(TypeError, match="yarn must be"):
        MultiHeadLatentAttention(64, 4, 16, 16, 8, 16, yarn=V3_YARN)
    assert YaRN.from_rope_parameters({"rope_type": "default", "rope_theta": 1e4}) is None
    assert YaRN.from_rope_parameters(dict(V3_YARN, beta_fast=None)).beta_fast == 32.0  # transformers' default


# --- the notebook's checkers: each known mistake gets its own message --------------------------------------

@pytest.mark.parametrize("checker", [check_yarn_inv_freq, check_yarn_softmax_scale], ids=lambda c: c.name)
def test_checker_names_every_mistake(checker, capsys):
    assert len(checker.mistakes) >= 6
    audit = checker.audit()
    for mistake in checker.mistakes:
        message = audit[mistake.name]
        assert message is not None, f"{mistake.name} passes the checker"
        assert mistake.message in message, f"{mistake.name} got another message: {message}"
        others = [m.message for m in checker.mistakes if m is not mistake]
        assert not any(other in message for other in others), f"{mistake.name} also matches another mistake"
    checker(checker.reference)
    assert "passes all 3 checks" in capsys.readouterr().out


@pytest.mark.parametrize("name, checker", [("yarn_inv_freq", check_yarn_inv_freq),
                                           ("yarn_softmax_scale", check_yarn_softmax_scale)])
def test_notebook_solutions_pass_and_stubs_are_reported(name, checker, capsys):
    nb = "26_mla_yarn_long_context.ipynb"
    checker(getattr(load_notebook(nb), name))
    assert f"✓ {name} passes" in capsys.readouterr().out
    with pytest.raises(CheckFailure, match="still the exercise stub") as failure:
        checker(getattr(load_notebook(nb, exercise=True), name))
    assert "show_hint()" in str(failure.value)


# --- the experiment behind notebook 26 ---------------------------------------------------------------------

def test_experiment_swaps_only_the_rope_and_measures_every_position():
    from helpers.mla.yarn_experiment import ExperimentSettings, loss_by_position, small_config, with_rope

    s = ExperimentSettings(train_len=8, factor=4, vocab_size=64)
    seed_everything(0)
    plain = DeepSeekV3(small_config(s, yarn=False)).eval()
    stretched = with_rope(plain, s, yarn=True)
    assert all(b.attn.yarn == YaRN(factor=4.0, original_max_position_embeddings=8, mscale=1.0, mscale_all_dim=1.0)
               for b in stretched.layers)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), stretched.state_dict().values()))
    windows = torch.randint(0, 64, (3, s.eval_len))
    losses = loss_by_position(stretched, windows, batch_size=2)
    assert len(losses) == s.eval_len - 1 and losses != loss_by_position(plain, windows)


def test_saved_experiment_is_the_documented_command():
    import json
    import pathlib

    from helpers.mla.yarn_experiment import ExperimentSettings

    record = json.loads((pathlib.Path(__file__).parent.parent / "notebooks/results/yarn_experiment.json").read_text())
    assert record["command"] == "python -m helpers.mla.yarn_experiment --out notebooks/results/yarn_experiment.json"
    defaults = ExperimentSettings()
    assert record["settings"] == dict(vars(defaults), eval_len=defaults.eval_len) and record["seed"] == 0
    assert set(record["loss_by_position"]) == {"plain", "yarn", "plain_finetuned", "yarn_finetuned"}
    assert all(len(v) == defaults.eval_len - 1 for v in record["loss_by_position"].values())
