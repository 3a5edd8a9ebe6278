"""The assembled model equals transformers' DeepseekV3ForCausalLM: logits, greedy generation, export, errors."""

import pytest
import torch
from transformers import DeepseekV3ForCausalLM

from helpers.accounting import count_parameters, meta_model
from helpers.configs import tiny_config
from helpers.model import DeepSeekV3
from helpers.model.hf import export_pretrained, load_pretrained, model_from_hf, model_to_hf

# Three tiny configs that between them switch every optional path on and off.
CONFIGS = {
    "q compression, 1 dense layer, groups 2 of 4": {},
    "no q compression, all MoE, one group, half-split RoPE": dict(
        q_lora_rank=None, first_k_dense_replace=0, n_group=1, topk_group=1, rope_interleave=False),
    "3 layers, 2 dense, 16 experts top-4, 8 groups top-3, no shared": dict(
        num_hidden_layers=3, first_k_dense_replace=2, n_routed_experts=16, num_experts_per_tok=4, n_group=8,
        topk_group=3, n_shared_experts=0, q_lora_rank=24, norm_topk_prob=False),
}


def random_hf(overrides):
    """A DeepseekV3ForCausalLM with random weights, norms and MoE biases (so routing is not uniform)."""
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(std=0.1)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def pair(request):
    hf = random_hf(CONFIGS[request.param])
    return hf, model_from_hf(hf)


def test_logits_equal_transformers_both_directions(pair):
    hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        torch.testing.assert_close(ours(ids), want, atol=1e-4, rtol=0)
        back = model_to_hf(ours)
        torch.testing.assert_close(back(ids).logits, want, atol=1e-4, rtol=0)
    for (k1, v1), (k2, v2) in zip(hf.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1


def test_greedy_generation_equals_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    want = hf.generate(ids, max_new_tokens=32, do_sample=False)
    assert want.shape == (2, 39)
    assert torch.equal(ours.generate(ids, max_new_tokens=32), want)  # absorbed latent cache (default)
    assert torch.equal(ours.generate(ids, max_new_tokens=32, absorb=False), want)


def test_parameter_count_agrees_with_accounting(pair):
    hf, ours = pair
    count = count_parameters(meta_model(hf.config), hf.config)
    assert ours.num_parameters() == (count.total, count.activated)


def test_interface_shapes_and_sampling():
    model = DeepSeekV3(tiny_config()).eval()
    ids = torch.randint(0, 256, (3, 5))
    assert model(ids).shape == (3, 5, 256)
    out = model.generate(ids, max_new_tokens=4)
    assert out.shape == (3, 9) and torch.equal(out[:, :5], ids)
    a = model.generate(ids, 6, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    b = model.generate(ids, 6, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_export_loads_with_from_pretrained_and_mtp_generate(tmp_path):
    torch.manual_seed(3)
    ours = DeepSeekV3(tiny_config(num_mtp_layers=1)).eval()
    export_pretrained(ours, tmp_path)
    hf, info = DeepseekV3ForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval().generation_config.eos_token_id = None
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=0)
    plain = hf.generate(ids, max_new_tokens=32, do_sample=False)
    assert torch.equal(hf.generate(ids, max_new_tokens=32, do_sample=False, use_mtp=True), plain)
    assert torch.equal(ours.generate(ids, 32), plain)
    back = load_pretrained(tmp_path)  # our own loader keeps the MTP module too
    for (k1, v1), (k2, v2) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1


@pytest.mark.parametrize("field, value, words", [
    ("rope_parameters", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, "rope_type"),
    ("attention_bias", True, "attention_bias"),
    ("tie_word_embeddings", True, "tie_word_embeddings"),
    ("hidden_act", "gelu", "hidden_act"),
])
def test_unsupported_config_names_the_field(field, value, words):
    config = tiny_config()
    setattr(config, field, value)
    with pytest.raises(ValueError, match=words):
        DeepSeekV3(config)


def test_prompt_past_max_positions_is_refused():
    model = DeepSeekV3(tiny_config(max_position_embeddings=16)).eval()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(torch.zeros(1, 10, dtype=torch.long), max_new_tokens=7)


def test_bad_checkpoint_directory_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path / "nowhere")
    export_pretrained(DeepSeekV3(tiny_config()), tmp_path)
    tiny_config(hidden_size=32).save_pretrained(tmp_path)  # config no longer matches the weights
    with pytest.raises(ValueError, match="model.safetensors.*has shape"):
        load_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(tmp_path)
