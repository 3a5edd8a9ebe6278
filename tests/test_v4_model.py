"""The assembled DeepSeek-V4 equals transformers' DeepseekV4ForCausalLM: logits, greedy generation, conversions, export.

Every schedule of attention kinds (sliding window only, CSA, HCA, mixes) with hash-routed and learned-routed MoE
layers, batch 2, prompts shorter than one window and prompts that are no multiple of either compression rate.
Every parameter and buffer is random (transformers' ``_init_weights`` zeros the sinks, the position biases, the
hyper-connection bases and the hash table: a piece skipped by a conversion could hide behind a zero).
"""

import pytest
import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from helpers.hf import export_pretrained, load_pretrained, model_from_hf, model_to_hf
from helpers.model.blocks import ATTENTIONS, FFNS, RESIDUALS, attention_kind, ffn_kind, residual_kind
from helpers.teaching.checks import CheckFailure
from helpers.v4.checks.model import check_v4_block, v4_block
from helpers.v4.hf.model import randomise
from helpers.v4.model import DeepSeekV4, tiny_v4_config

SWA, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"

# Layer-type schedules: each attention kind alone, and mixes (V4-Pro opens with two HCA layers, then alternates).
SCHEDULES = {
    "sliding, CSA, HCA": dict(layer_types=[SWA, CSA, HCA], mlp_layer_types=["hash_moe", "moe", "moe"]),
    "CSA only": dict(layer_types=[CSA, CSA], mlp_layer_types=["hash_moe", "moe"]),
    "HCA only": dict(layer_types=[HCA, HCA], mlp_layer_types=["moe", "moe"]),
    "sliding only": dict(layer_types=[SWA, SWA], mlp_layer_types=["hash_moe", "hash_moe"]),
    "V4-Pro pattern HCA HCA CSA HCA": dict(layer_types=[HCA, HCA, CSA, HCA],
                                           mlp_layer_types=["hash_moe", "moe", "moe", "moe"]),
}


def random_hf(**overrides) -> DeepseekV4ForCausalLM:
    return randomise(DeepseekV4ForCausalLM(tiny_v4_config(**overrides)))


@pytest.fixture(scope="module", params=list(SCHEDULES), ids=list(SCHEDULES))
def pair(request):
    hf = random_hf(**SCHEDULES[request.param])
    return hf, model_from_hf(hf)


def test_tiny_config_follows_the_facts():
    config = tiny_v4_config()
    assert config.index_n_heads >= 5  # fewer heads: exact ties in the indexer's top-k (shared/FACTS.md)
    assert config.index_head_dim >= config.qk_rope_head_dim
    rates = config.compress_rates
    assert rates["compressed_sparse_attention"] < config.sliding_window < rates["heavily_compressed_attention"] * 2


def test_the_config_chooses_the_blocks():
    config = tiny_v4_config(**SCHEDULES["sliding, CSA, HCA"])
    model = DeepSeekV4(config)
    assert [attention_kind(config, i) for i in range(3)] == ["swa", "csa", "hca"]
    assert [ffn_kind(config, i) for i in range(3)] == ["hash_moe", "v4_moe", "v4_moe"]
    assert residual_kind(config) == "hyper"
    for i, block in enumerate(model.layers):
        assert type(block.attn) is type(ATTENTIONS["swa"](config, i))
        assert type(block.ffn) is type(FFNS[ffn_kind(config, i)](config, i, None))
        assert type(block.attn_residual) is type(RESIDUALS["hyper"](config))


@pytest.mark.parametrize("length", [5, 13, 29], ids=["shorter than a window", "no multiple of the rates",
                                                     "more CSA entries than index_topk"])
def test_logits_equal_transformers_both_directions(pair, length):
    hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        assert ours(ids).shape == (2, length, hf.config.vocab_size)
        torch.testing.assert_close(ours(ids), want, atol=1e-4, rtol=0)
        back = model_to_hf(ours)
        assert isinstance(back, DeepseekV4ForCausalLM)
        torch.testing.assert_close(back(ids).logits, want, atol=1e-4, rtol=0)
    hf_state, back_state = hf.state_dict(), back.state_dict()
    assert hf_state.keys() == back_state.keys()
    for key, value in hf_state.items():
        assert torch.equal(value, back_state[key]), key


@pytest.mark.parametrize("length", [5, 13], ids=["shorter than a window", "no multiple of the rates"])
def test_greedy_generation_equals_transformers(pair, length):
    hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(2))
    want = hf.generate(ids, max_new_tokens=20, do_sample=False)  # crosses several windows of both rates
    assert want.shape == (2, length + 20)
    assert torch.equal(ours.generate(ids, max_new_tokens=20), want)


def test_cached_decode_equals_full_recompute(pair):
    """Our own caches: prefill 7, then 9 one-token steps, equal to one call over all 16 tokens."""
    _, ours = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(ids)
        caches = ours.new_caches()
        steps = [ours.logits(ours.hidden(ids[:, :7], caches))]
        steps += [ours.logits(ours.hidden(ids[:, t:t + 1], caches)) for t in range(7, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


def test_export_loads_with_from_pretrained(tmp_path):
    hf = random_hf(**SCHEDULES["sliding, CSA, HCA"])
    ours = model_from_hf(hf)
    export_pretrained(ours, tmp_path)
    loaded, info = DeepseekV4ForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.randint(0, hf.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)
    for key, value in hf.state_dict().items():  # buffers too: the hash table and the bias travel
        assert torch.equal(loaded.state_dict()[key], value), key
    ours_again = load_pretrained(tmp_path)  # config.json's model_type picks the V4 family
    assert isinstance(ours_again, DeepSeekV4)
    for (k1, v1), (k2, v2) in zip(ours.state_dict().items(), ours_again.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1


@pytest.mark.parametrize("field, value, words", [
    ("layer_types", [SWA, "full_attention"], r"layer_types\[1\]"),
    ("mlp_layer_types", ["moe", "dense"], r"mlp_layer_types\[1\]"),
    ("layer_types", [SWA], "layer_types"),
    ("hc_mult", 0, "hc_mult"),
    ("sliding_window", 0, "sliding_window"),
    ("tie_word_embeddings", True, "tie_word_embeddings"),
])
def test_bad_config_names_the_field(field, value, words):
    config = tiny_v4_config(layer_types=[SWA, CSA], mlp_layer_types=["hash_moe", "moe"])
    object.__setattr__(config, field, value)  # past the config's own checks, as a hand-edited config.json would
    with pytest.raises(ValueError, match=words):
        DeepSeekV4(config)


def test_wrong_model_class_is_refused():
    with pytest.raises(ValueError, match="DeepseekV4ForCausalLM"):
        model_from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="DeepSeekV4|DeepSeekV3"):
        model_to_hf(torch.nn.Linear(2, 2))


def test_config_round_trip_keeps_the_schedule():
    config = tiny_v4_config(**SCHEDULES["V4-Pro pattern HCA HCA CSA HCA"])
    again = DeepseekV4Config.from_dict(config.to_dict())
    assert again.layer_types == config.layer_types and again.mlp_layer_types == config.mlp_layer_types


def test_block_checker_names_every_mistake_and_passes_the_model():
    audit = check_v4_block.audit()
    for mistake in check_v4_block.mistakes:
        assert audit[mistake.name] is not None and mistake.message in audit[mistake.name], mistake.name
    assert len({m.message for m in check_v4_block.mistakes}) == len(check_v4_block.mistakes)
    check_v4_block(v4_block)
    with pytest.raises(CheckFailure, match="values differ|largest difference"):  # unknown mistake: described
        check_v4_block(lambda block, streams, input_ids: 1.01 * v4_block(block, streams, input_ids))


def test_reference_block_is_the_model_block():
    model = DeepSeekV4(tiny_v4_config()).eval()
    randomise_ours = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=randomise_ours) * 0.05)
        ids = torch.randint(0, 256, (2, 11), generator=randomise_ours)
        x = model.embed_streams(ids)
        for block in model.layers:
            torch.testing.assert_close(v4_block(block, x, ids), block(x, input_ids=ids))
            x = block(x, input_ids=ids)


def test_training_step_balances_topk_layers_and_muon_takes_the_matrices():
    from helpers.v4.train import RouterLoads, make_optimizer, v4_settings

    torch.manual_seed(0)
    model = DeepSeekV4(tiny_v4_config()).train()
    opts = make_optimizer(model, "muon", v4_settings())
    muon = {id(p) for p in opts[1].param_groups[0]["params"]}
    for name, p in model.named_parameters():
        expected = p.dim() == 2 and name not in ("embed.weight", "head.weight") and "position_bias" not in name
        assert (id(p) in muon) == expected, name
    loads = RouterLoads(model.moe_layers)
    ids = torch.randint(0, 256, (2, 16))
    model.losses(ids)["main"].backward()
    tables = [layer.tid2eid.clone() for layer in model.moe_layers if layer.is_hash]
    assert [load.sum().item() for load in loads.loads] == [2 * 16 * 2] * 3  # every token, top-2, every layer
    vio = loads.max_vio()
    loads.update_biases(1e-3)
    assert all(v >= 0 for v in vio) and all(load.sum() == 0 for load in loads.loads)
    assert all(layer.bias.abs().sum() > 0 for layer in model.moe_layers if not layer.is_hash)
    assert all(torch.equal(t, layer.tid2eid) for t, layer in zip(tables, [m for m in model.moe_layers if m.is_hash]))
    loads.remove()


def test_decode_benchmark_runs_and_records_both():
    from helpers.v4.bench import decode_benchmark

    out = decode_benchmark([12], tokens=1, repeats=1, warmup=0)
    (row,) = out["rows"]
    assert row["context"] == 12 and row["ours_ms_per_token"] > 0 and row["transformers_ms_per_token"] > 0
    assert row["first_step_max_abs_diff"] < 1e-4  # transformers' cache filled from ours continues alike
    assert set(row["split_ms_per_token"]["ours"]) == set(out["parts"]) == set(row["split_ms_per_token"]["transformers"])


def test_every_attention_backend_decodes_the_same(pair):
    """The model's default ``"auto"`` (fast decode step) and the plain ``"masked"`` reading agree step by step."""
    from helpers.v4.model import DeepSeekV4

    _, ours = pair
    assert {block.attn.backend for block in ours.layers} == {"auto"}
    plain = DeepSeekV4(ours.config, attention_backend="masked").eval()
    plain.load_state_dict(ours.state_dict())
    ids = torch.randint(0, ours.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        outs = []
        for model in (ours, plain):
            caches = model.new_caches()
            steps = [model.logits(model.hidden(ids[:, :21], caches))]
            steps += [model.logits(model.hidden(ids[:, t:t + 1], caches)) for t in range(21, 40)]
            outs.append(torch.cat(steps, dim=1))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="backend"):
        DeepSeekV4(ours.config, attention_backend="flash")
