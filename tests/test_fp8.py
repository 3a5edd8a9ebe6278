"""FP8: block quantisation, accumulation, FP8 training GEMMs, the FP8 latent cache, the checkers (notebooks 33-34)."""

import json
import pathlib

import pytest
import torch
from torch import nn

from helpers.fp8 import FORMATS, FP8Linear, GateInFP8, dequantize, fp8_linear, grid, quantize, to_fp8
from helpers.fp8.accumulate import limited_matmul, relative_error, round_mantissa
from helpers.fp8.cache import FP8LatentCache, decode_logits, fp8_caches, generate_greedy
from helpers.fp8.checks import check_quantize_blocks, check_quantize_latent
from helpers.fp8.formats import fake_quantize
from helpers.fp8.linear import fp8_backend
from helpers.mla import LatentCache, MultiHeadLatentAttention

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "results"


def _outliers(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    x[:, :3] *= 100.0  # a few channels 100x larger, as in real activations
    return x


# ---------------------------------------------------------------------------------------------------
# formats and quantize / dequantize
# ---------------------------------------------------------------------------------------------------

def test_grids_hold_the_formats_values():
    e4m3, e5m2 = grid(FORMATS["e4m3"]), grid(FORMATS["e5m2"])
    assert e4m3.max().item() == 448.0 and e5m2.max().item() == 57344.0
    assert len(e4m3) == 127 and len(e5m2) == 124  # 0, subnormals and normals with the sign bit clear
    assert e4m3[1].item() == 2.0 ** -9 and e5m2[1].item() == 2.0 ** -16  # smallest subnormals


@pytest.mark.parametrize(("shape", "block"), [((4, 256), (1, 128)), ((256, 128), (128, 128)), ((8, 64), (8, 64))])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_quantize_dtype_shape_and_round_trip_bound(shape, block, ue8m0):
    """e4m3 keeps 3 mantissa bits: rounding to nearest errs by at most 2^-4 relative where x / s is a normal
    number (|x / s| >= 2^-6), and by at most half the smallest subnormal step, 2^-10 s, below that."""
    x = _outliers(*shape)
    q, scale = quantize(x, block, ue8m0=ue8m0)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (shape[0] // block[0], shape[1] // block[1])
    back = dequantize(q, scale, block)
    assert back.dtype == torch.float32 and back.shape == x.shape
    s = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    normal = (x / s).abs() >= 2.0 ** -6
    err = (back - x).abs()
    assert (err[normal] <= 2.0 ** -4 * x.abs()[normal]).all()
    assert (err[~normal] <= 2.0 ** -10 * s[~normal] * (1 + 1e-6)).all()
    assert (x / s).abs().max() <= 448.0 * (1 + 1e-6)
    if ue8m0:
        assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))  # powers of two


def test_e5m2_round_trip_bound():
    x = _outliers(4, 128)
    q, scale = quantize(x, (1, 128), dtype=torch.float8_e5m2)
    back, s = dequantize(q, scale, (1, 128)), scale.repeat_interleave(128, 1)
    normal = (x / s).abs() >= 2.0 ** -14
    assert q.dtype == torch.float8_e5m2
    assert ((back - x).abs()[normal] <= 2.0 ** -3 * x.abs()[normal]).all()


@pytest.mark.parametrize("block", [(3, 128), (1, 100), (5, 7)])
def test_blocks_that_do_not_divide_are_refused(block):
    with pytest.raises(ValueError, match=r"block_shape .* does not divide the tensor's shape \(4, 256\)"):
        quantize(torch.randn(4, 256), block)
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(2, 4, 256), (1, 128))
    with pytest.raises(ValueError, match="one scale per block"):
        dequantize(*quantize(torch.randn(4, 256), (1, 128)), (2, 128))


@pytest.mark.parametrize("ue8m0", [False, True])
def test_all_zero_block_gets_a_positive_finite_scale(ue8m0):
    x = torch.randn(4, 256)
    x[:, :128] = 0.0
    q, scale = quantize(x, (1, 128), ue8m0=ue8m0)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert not torch.isnan(q.float()).any() and (q.float()[:, :128] == 0).all()
    assert torch.equal(dequantize(q, scale, (1, 128))[:, :128], torch.zeros(4, 128))


def test_per_block_beats_per_tensor_when_outliers_exceed_the_range():
    """Channels 1e5 larger than the rest: one scale for the tensor pushes the ordinary channels below E4M3's
    smallest values, one scale per 1 x 128 tile keeps them (measured on the ordinary channels' contribution)."""
    x, w = _outliers(64, 512), torch.randn(256, 512) * 0.02
    x[:, :3] *= 1e3  # 1e5 in all
    exact = x[:, 3:] @ w[:, 3:].T
    per_tensor = fake_quantize(x, x.shape)[:, 3:] @ fake_quantize(w, w.shape)[:, 3:].T
    per_block = fake_quantize(x, (1, 128))[:, 3:] @ fake_quantize(w, (128, 128))[:, 3:].T
    assert relative_error(per_block, exact)[0] < relative_error(per_tensor, exact)[0] / 2


def test_fake_quantize_pads_ragged_blocks():
    x = torch.randn(5, 96)
    torch.testing.assert_close(fake_quantize(x, (1, 32)), dequantize(*quantize(x, (1, 32)), (1, 32)))
    padded = torch.nn.functional.pad(x, (0, 32))  # 96 -> 128: the ragged tile is the last 64 padded with zeros
    torch.testing.assert_close(fake_quantize(x, (1, 64)), fake_quantize(padded, (1, 64))[:, :96])


# ---------------------------------------------------------------------------------------------------
# accumulation
# ---------------------------------------------------------------------------------------------------

def test_round_mantissa():
    x = torch.randn(1000)
    assert torch.equal(round_mantissa(x, 23), x)
    cut = round_mantissa(x, 13)
    assert ((cut - x).abs() <= x.abs() * 2.0 ** -13).all() and (cut.abs() <= x.abs()).all()  # toward zero
    near = round_mantissa(x, 13, "nearest")
    assert ((near - x).abs() <= x.abs() * 2.0 ** -14 * (1 + 1e-6)).all()


def test_promotion_reduces_the_accumulation_error():
    g = torch.Generator().manual_seed(0)
    a = fake_quantize(torch.randn(16, 1024, generator=g), (1, 128))
    b = fake_quantize(torch.randn(1024, 16, generator=g), (128, 128))
    exact = a.double() @ b.double()
    without = relative_error(limited_matmul(a, b, n_c=None, group=4), exact)[0]
    promoted = relative_error(limited_matmul(a, b, n_c=128, group=4), exact)[0]
    full = relative_error(limited_matmul(a, b, mantissa_bits=23, n_c=None), exact)[0]
    assert promoted < without / 4 and full < 1e-5 < promoted
    with pytest.raises(ValueError, match="n_c"):
        limited_matmul(a, b, n_c=100)


# ---------------------------------------------------------------------------------------------------
# FP8 training GEMMs
# ---------------------------------------------------------------------------------------------------

def test_fp8_linear_gradients_are_the_fp8_gemms():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g, requires_grad=True)
    w = (torch.randn(48, 96, generator=g) * 0.1).requires_grad_()
    dy = torch.randn(64, 48, generator=g)
    y = fp8_linear(x, w, 32)
    y.backward(dy)
    w_q = fake_quantize(w.detach(), (32, 32))
    torch.testing.assert_close(y, fake_quantize(x.detach(), (1, 32)) @ w_q.T)  # Fprop
    torch.testing.assert_close(x.grad, fake_quantize(dy, (1, 32)) @ w_q)  # Dgrad
    torch.testing.assert_close(w.grad, fake_quantize(dy, (32, 1)).T @ fake_quantize(x.detach(), (32, 1)))  # Wgrad
    x32, w32 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (x32 @ w32.T).backward(dy)
    for got, want in ((y, x32 @ w32.T), (x.grad, x32.grad), (w.grad, w32.grad)):
        assert relative_error(got, want)[0] < 0.06  # e4m3 rounding of both operands: a few percent


def test_fp8_linear_shares_the_weight_and_to_fp8_keeps_the_head():
    from helpers.model import DeepSeekV3
    from helpers.model.train import model_config

    linear = nn.Linear(64, 32, bias=False)
    fp8 = FP8Linear.from_linear(linear, 32)
    assert fp8.weight is linear.weight and list(fp8.state_dict()) == ["weight"]
    torch.manual_seed(0)
    model = DeepSeekV3(model_config(64, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                                    q_lora_rank=32, kv_lora_rank=32))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    loss32 = model.losses(ids)["main"]
    to_fp8(model, 32)
    plain = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert plain == ["head"]
    assert all(layer.backend == fp8_backend(32) for layer in model.moe_layers)
    loss8 = model.losses(ids)["main"]
    with GateInFP8(model, 32):
        loss_router = model.losses(ids)["main"]
    assert 0 < abs(loss8 - loss32) / loss32 < 0.01 and loss_router != loss8
    loss8.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("mtp"))


# ---------------------------------------------------------------------------------------------------
# FP8 latent cache
# ---------------------------------------------------------------------------------------------------

def test_fp8_cache_bytes_per_token_match_flashmla():
    cache = FP8LatentCache()
    cache.append(torch.randn(2, 3, 512), torch.randn(2, 3, 64))
    assert cache.bytes_per_token() == 656  # 512 fp8 + 4 fp32 scales + 64 bf16
    q, scale, rope = cache.views()
    assert (q.dtype, scale.dtype, rope.dtype) == (torch.float8_e4m3fn, torch.float32, torch.bfloat16)
    assert scale.shape == (2, 3, 4) and cache.c_kv.dtype == torch.float32
    with pytest.raises(ValueError, match="tile"):
        FP8LatentCache(tile=48).append(torch.randn(1, 1, 64), torch.randn(1, 1, 8))


def test_fp8_cache_decode_within_tolerance_of_fp32():
    """Stated tolerance: decode outputs over the FP8 cache within 5% (relative Frobenius norm) of the FP32 cache's;
    e4m3 rounds each latent value by at most 2^-4, and attention averages those errors."""
    torch.manual_seed(0)
    layer = MultiHeadLatentAttention(64, 4, 32, 16, 8, 16, q_lora_rank=32, backend="absorbed").eval()
    x = torch.randn(2, 12, 64)
    outs = []
    for cache in (LatentCache(), FP8LatentCache(tile=16)):
        with torch.no_grad():
            steps = [layer(x[:, :8], cache)] + [layer(x[:, t:t + 1], cache) for t in range(8, 12)]
        outs.append(torch.cat(steps, dim=1))
    err = relative_error(outs[1], outs[0])[0]
    assert 1e-4 < err < 0.05


def test_fp8_cache_generation_agrees_with_fp32():
    from helpers.model import DeepSeekV3
    from helpers.model.train import model_config

    torch.manual_seed(0)
    model = DeepSeekV3(model_config(64, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                                    q_lora_rank=32, kv_lora_rank=32)).eval()
    prompt = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    ids32 = generate_greedy(model, prompt, 8, model.new_caches())
    torch.testing.assert_close(ids32, model.generate(prompt, 8))
    logits32 = decode_logits(model, ids32, 6, model.new_caches())
    logits8 = decode_logits(model, ids32, 6, fp8_caches(model, tile=16))
    assert logits8.shape == (1, 8, 64) and relative_error(logits8, logits32)[0] < 0.05


# ---------------------------------------------------------------------------------------------------
# checkers and the saved training run
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("checker", [check_quantize_blocks, check_quantize_latent], ids=lambda c: c.name)
def test_checkers_pass_the_reference_and_name_every_mistake(checker, capsys):
    checker(checker.reference)
    assert "passes" in capsys.readouterr().out
    audit = checker.audit()
    for mistake in checker.mistakes:
        assert audit[mistake.name] is not None and mistake.message in audit[mistake.name], mistake.name


def test_training_run_is_recorded():
    path = RESULTS / "fp8_training.json"
    if not path.exists():
        pytest.skip("run `python -m helpers.fp8.train` to write the record")
    record = json.loads(path.read_text())
    assert record["command"].startswith("python -m helpers.fp8.train")
    runs = record["runs"]
    assert set(runs) == {"fp32", "fp8", "fp8_router"}
    assert all(len(r["train_loss"]) == record["steps"] for r in runs.values())
    assert runs["fp32"]["train_loss"][-1] < runs["fp32"]["train_loss"][0] - 1  # it learned
    assert max(runs["fp8"]["val_relative_difference"]) < 0.05
