"""The model benchmark's machinery (never its speed): same tokens as transformers, a split that adds up, goals."""

import pytest

from helpers.model.bench import SMALL_CONFIG, decode_benchmark, summary, training_benchmark

TINY = dict(SMALL_CONFIG, num_hidden_layers=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def decode():
    return decode_benchmark(TINY, [8, 40], new_tokens=4, repeats=1, warmup=0, chunk=16)


def test_decode_benchmark_gives_transformers_tokens_and_a_split_that_adds_up(decode):
    for context, d in decode.items():
        assert d["same_tokens"], context
        for name in ("ours absorbed", "ours naive", "transformers"):
            m = d["split"][name]
            assert m["attention"] > 0 and m["moe"] > 0, (context, name)
            assert m["attention"] + m["moe"] + m["rest"] == pytest.approx(m["total"])
            assert m["rest"] >= 0, (context, name)


def test_summary_states_every_goal(decode):
    train = training_benchmark(TINY, batch=2, seq=8, repeats=1, warmup=0)
    record = summary(train, decode, TINY, batch=2, seq=8, new_tokens=4)
    assert set(record["train"]) == {"ours", "transformers eager", "transformers grouped_mm", "dense, same activated"}
    assert len(record["goals"]) == 4 and all(isinstance(g["met"], bool) for g in record["goals"].values())
    assert "at 40 tokens" in " ".join(record["goals"])
