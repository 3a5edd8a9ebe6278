"""One model family: blocks chosen from the config (MLA or V3.2's sparse attention), each block's own cache, bf16.

- a ``DeepseekV32ForCausalLM`` converts to our model with sparse attention in every block, equal in logits and in
  greedy generation, and back;
- the caches come from the blocks' attentions, are bound to them, and are all refused when mixed up;
- the whole model in bf16 against ``transformers`` in bf16, both measured against the fp32 result.
"""

import pytest
import torch
from transformers import DeepseekV3ForCausalLM, DeepseekV32ForCausalLM

from helpers.configs import tiny_config
from helpers.dsa import SparseLatentAttention, SparseLatentCache
from helpers.mla import LatentCache, MultiHeadLatentAttention
from helpers.model import DeepSeekV3
from helpers.model.blocks import attention_kind, ffn_kind
from helpers.model.hf import model_from_hf, model_to_hf

# Six indexer heads: with two, many indexer scores are exactly 0 (ReLU) and top-k breaks the ties differently in
# a one-row decode call than in a many-row prefill, in transformers too (shared/FACTS.md).
V32 = dict(index_n_heads=6, index_topk=5, first_k_dense_replace=1, num_hidden_layers=3)


def randomised(model):
    """Every norm (weight and bias) and every MoE bias random, so no piece can be skipped unnoticed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(std=0.1)
    model.generation_config.eos_token_id = None
    return model.eval()


@pytest.fixture(scope="module")
def v32_pair():
    torch.manual_seed(0)
    hf = randomised(DeepseekV32ForCausalLM(tiny_config("v32", **V32)))
    return hf, model_from_hf(hf)


def test_the_config_chooses_the_blocks():
    v3, v32 = DeepSeekV3(tiny_config()), DeepSeekV3(tiny_config("v32", **V32))
    assert [attention_kind(m.config) for m in (v3, v32)] == ["mla", "dsa"]
    assert all(type(b.attn) is MultiHeadLatentAttention for b in v3.layers)
    assert all(isinstance(b.attn, SparseLatentAttention) for b in v32.layers)
    assert [b.is_moe for b in v32.layers] == [ffn_kind(v32.config, i) == "moe" for i in range(3)] == [False, True, True]
    assert [type(c) for c in v3.new_caches()] == [LatentCache] * 2
    assert [type(c) for c in v32.new_caches()] == [SparseLatentCache] * 3


def test_v32_logits_equal_transformers_both_directions(v32_pair):
    hf, ours = v32_pair
    ids = torch.randint(0, hf.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits  # 19 tokens, top-5: most queries attend to a strict subset
        torch.testing.assert_close(ours(ids), want, atol=1e-4, rtol=0)
        back = model_to_hf(ours)
        assert isinstance(back, DeepseekV32ForCausalLM)
        torch.testing.assert_close(back(ids).logits, want, atol=1e-4, rtol=0)
    for (k1, v1), (k2, v2) in zip(hf.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1


def test_v32_greedy_generation_equals_transformers(v32_pair):
    hf, ours = v32_pair
    ids = torch.randint(0, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    want = hf.generate(ids, max_new_tokens=24, do_sample=False)
    assert want.shape == (2, 31)
    assert torch.equal(ours.generate(ids, max_new_tokens=24), want)


def test_mixed_up_caches_are_refused_before_any_changes():
    model = DeepSeekV3(tiny_config()).eval()
    ids = torch.randint(0, 256, (1, 3))
    caches = model.new_caches()
    model.hidden(ids, caches)  # binds each cache to its block
    swapped = caches[::-1]
    with pytest.raises(ValueError, match="another attention layer"):
        model.hidden(ids[:, :1], swapped)
    with pytest.raises(ValueError, match="twice"):
        model.hidden(ids[:, :1], [caches[0], caches[0]])
    with pytest.raises(TypeError, match="SparseLatentCache|LatentCache"):
        model.hidden(ids[:, :1], DeepSeekV3(tiny_config("v32", **V32)).new_caches()[:2])
    assert [c.length for c in caches] == [3, 3]


def test_generate_refuses_arguments_it_would_ignore():
    model = DeepSeekV3(tiny_config()).eval()
    ids = torch.randint(0, 256, (1, 3))
    with pytest.raises(ValueError, match="top_p and generator"):
        model.generate(ids, 2, generator=torch.Generator())
    with pytest.raises(ValueError, match="top_p and generator"):
        model.generate(ids, 2, top_p=0.5)
    with pytest.raises(TypeError, match="absorb"):
        model.generate(ids, 2, absorb="yes")
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, 2, temperature=float("nan"))


@pytest.mark.parametrize("version, overrides, cls", [("v3", {}, DeepseekV3ForCausalLM),
                                                     ("v32", V32, DeepseekV32ForCausalLM)], ids=["v3", "v32"])
def test_bf16_is_as_close_to_fp32_as_transformers_bf16(version, overrides, cls):
    """bf16 keeps 8 significant bits (relative spacing 2^-8 = 0.4%), so two correct bf16 implementations that round
    in a different order differ by about that on every activation. The test therefore measures both against the fp32
    result: ours in bf16 may be at most 1.5x as far from it as transformers in bf16 (plus 0.02 for noise). A norm or
    softmax left in bf16 makes ours several times worse."""
    torch.manual_seed(5)
    hf = randomised(cls(tiny_config(version, **overrides)))
    ours = model_from_hf(hf)
    ids = torch.randint(0, hf.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        truth = hf(ids).logits
        hf_error = (hf.to(torch.bfloat16)(ids).logits.float() - truth).abs().max()
        ours_bf16 = ours.to(torch.bfloat16)
        ours_error = (ours_bf16(ids).float() - truth).abs().max()
        caches = ours_bf16.new_caches()
        ours_bf16.hidden(ids, caches)
    assert ours_error <= 1.5 * hf_error + 0.02, (ours_error, hf_error)
    assert all(t.dtype == torch.bfloat16 for c in caches for t in c.views())  # caches in the model's dtype
