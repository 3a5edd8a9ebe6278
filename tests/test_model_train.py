"""Training, data and MTP of the assembled model: the loss falls, the bias balances, MTP decoding is greedy."""

import pytest
import torch
from transformers import DeepseekV3ForCausalLM
from transformers.modeling_layers import MtpModel

from helpers.configs import tiny_config
from helpers.model import DeepSeekV3
from helpers.model.data import encode, is_validation, load_corpus, train_tokenizer
from helpers.model.hf import export_pretrained
from helpers.model.train import TrainSettings, lr_at, train
from helpers.moe import Balancing


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def test_corpus_split_by_file_and_tokenizer_deterministic(corpus):
    assert corpus.train and corpus.val and not set(corpus.train) & set(corpus.val)
    assert all(is_validation(p) for p in corpus.val) and not any(is_validation(p) for p in corpus.train)
    assert load_corpus().sha256() == corpus.sha256()
    texts = list(corpus.train.values())[:30]
    a, b = train_tokenizer(texts, 400), train_tokenizer(texts, 400)
    assert a.to_str() == b.to_str() and a.get_vocab_size() == 400
    ids = encode(a, texts[:2])
    assert a.decode(ids[: len(a.encode(texts[0]).ids)].tolist()) == texts[0]  # byte-level: lossless


def test_lr_schedule_warms_up_then_decays():
    s = TrainSettings(steps=100, warmup=10, lr=1e-3, min_lr=1e-4)
    lrs = [lr_at(i, s) for i in range(100)]
    assert lrs[0] < lrs[9] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4, rel=0.05)
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:]))


def test_short_training_lowers_the_loss_and_is_deterministic(corpus):
    texts = list(corpus.train.values())[:40]
    tok = train_tokenizer(texts, 256)
    ids = encode(tok, texts)
    settings = TrainSettings(steps=40, batch_size=4, seq_len=32, lr=1e-2, min_lr=1e-3, warmup=5, eval_every=20,
                             eval_windows=4, gamma=1e-2, seq_aux_loss_alpha=1e-3, seed=1)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = DeepSeekV3(tiny_config(), Balancing(gamma=settings.gamma, seq_aux_loss_alpha=settings.seq_aux_loss_alpha))
        runs.append((model, train(model, ids, ids, settings, progress=False)))
    (model, hist), (_, hist2) = runs
    assert hist["train_loss"] == hist2["train_loss"]  # deterministic given the seed
    first, last = sum(hist["train_loss"][:5]) / 5, sum(hist["train_loss"][-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert hist["val_loss"][-1] < hist["val_loss"][0]
    assert len(hist["max_vio"]) == len(model.moe_layers) and len(hist["max_vio"][0]) == 40
    assert all(layer.bias.abs().sum() > 0 for layer in model.moe_layers)  # the bias moved every step


def test_bias_moves_against_the_load_each_step():
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_config(), Balancing(gamma=0.01)).train()
    before = [m.bias.clone() for m in model.moe_layers]
    model.losses(torch.randint(0, 256, (2, 16)))["total"].backward()
    loads = [m.load_since_update.clone() for m in model.moe_layers]
    model.update_bias()
    for b0, load, m in zip(before, loads, model.moe_layers):
        torch.testing.assert_close(m.bias - b0, 0.01 * torch.sign(load.mean() - load))


def test_mtp_module_equals_transformers_mtp_model(tmp_path):
    torch.manual_seed(5)
    ours = DeepSeekV3(tiny_config(num_mtp_layers=1)).eval()
    export_pretrained(ours, tmp_path)
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    mtp = MtpModel.from_pretrained(hf).eval()
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = hf(ids, output_hidden_states=True).hidden_states[-1]  # after the final norm
        _, logits, _ = mtp(input_ids=ids[:, 1:], last_hidden_states=h[:, :-1], attention_mask=None,
                           position_ids=torch.arange(1, 10)[None], mtp_cache=None)
        mine = ours.mtp_forward(ids, ours.hidden(ids))[0]  # (1, 9, V)
    torch.testing.assert_close(mine[:, -1], logits[:, 0], atol=1e-4, rtol=0)


def test_mtp_speculative_decoding_equals_greedy_and_accepts_drafts():
    """Trained on a periodic sequence, the MTP module's drafts are often right; the output is greedy's."""
    period = torch.tensor([3, 17, 4, 99, 250, 8, 61, 42, 7, 120, 33, 5, 200, 76])
    stream = period.repeat(200)
    settings = TrainSettings(steps=60, batch_size=4, seq_len=32, lr=1e-2, min_lr=1e-3, warmup=5, eval_every=60,
                             eval_windows=2, gamma=1e-2, seed=0)
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_config(num_mtp_layers=1), Balancing(gamma=settings.gamma))
    train(model, stream, stream, settings, progress=False)
    prompts = [period[:5][None], torch.tensor([[1, 2, 3, 4]]), period[3:12][None]]
    accepted = 0
    for prompt in prompts:
        stats = {}
        fast = model.generate(prompt, 40, use_mtp=True, stats=stats)
        assert torch.equal(fast, model.generate(prompt, 40)), prompt
        accepted += stats["accepted"]
        assert stats["main_steps"] + stats["accepted"] >= 40 and stats["main_steps"] <= 40  # a kept draft saves a step
    assert accepted > 0


def test_checkpoint_readme_is_written_from_the_record(tmp_path):
    import json

    from helpers.model.train import write_readme

    with pytest.raises(FileNotFoundError, match="training.json"):
        write_readme(tmp_path)
    settings = dict(steps=7, batch_size=2, seq_len=16, lr=1e-3, min_lr=1e-4, warmup=3, gamma=1e-3,
                    seq_aux_loss_alpha=0.0, mtp_lambda=0.3, eval_every=5, eval_windows=4)
    record = {"command": "python -m helpers.train --steps 7", "seed": 3, "seconds": 123.4, "threads": 2,
              "final_val_loss": 5.4321, "tokens_per_s": 456.7, "torch": "x", "settings": settings,
              "parameters": {"total_with_mtp": 1111, "activated_with_mtp": 999, "total": 888, "activated": 777}}
    (tmp_path / "training.json").write_text(json.dumps(record))
    text = write_readme(tmp_path).read_text()
    for figure in ("python -m helpers.train --steps 7", "| seed | 3 |", "123 s (2.1 min) on 2 threads", "457 tokens/s",
                   "5.432 nats/token", "1,111 with the MTP module (999 activated", "7 of 2 x 16 tokens"):
        assert figure in text
