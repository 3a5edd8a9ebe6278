"""The V4 cache: the window keeps n_win - 1 tokens, windows close once, CSA carries its overlap, entries are causal."""

import torch

from helpers.v4.attention import CSA, HCA, SWA, V4Attention
from helpers.v4.cache import SlidingWindow, V4Cache, visible_entries, window_mask
from tests.test_v4_attention import v4_config


def test_window_keeps_window_minus_one_past_tokens():
    window = SlidingWindow(4)
    keys, start = window.append(torch.arange(6.0).view(1, 6, 1))
    assert start == 0 and keys.shape[1] == 6 and window.kv.flatten().tolist() == [3.0, 4.0, 5.0]
    keys, start = window.append(torch.tensor([[[6.0]]]))
    assert start == 3 and keys.flatten().tolist() == [3.0, 4.0, 5.0, 6.0] and window.length == 7


def test_window_mask_sees_itself_and_window_minus_one_before():
    allowed = window_mask(torch.arange(3, 6), key_start=1, n_keys=5, window=3)  # keys at 1..5
    assert allowed.int().tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]]


def test_entry_visible_once_its_whole_window_is_past():
    seen = visible_entries(torch.arange(12), 3, ratio=4).sum(-1)  # entries visible at positions 0..11
    assert seen.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3]  # w < (t + 1) // 4: position 3 closes window 0


def test_pending_tokens_and_overlap_across_calls():
    layer = V4Attention.from_config(v4_config(CSA), 0)
    cache = layer.new_cache()
    assert isinstance(cache, V4Cache) and cache.indexer is not None
    with torch.no_grad():
        layer(torch.randn(2, 6, 32), cache)  # one window of 4 closed, 2 tokens pending
        assert cache.compressor.n_entries == 1 and cache.compressor.pending_kv.shape[1] == 2
        assert cache.compressor.overlap_kv.shape == (2, 4, 16) and cache.indexer.overlap_kv.shape == (2, 4, 12)
        layer(torch.randn(2, 2, 32), cache)  # closes the second window
    assert cache.compressor.n_entries == cache.indexer.n_entries == 2 and cache.compressor.pending_kv.shape[1] == 0


def test_cache_contents_per_layer_type():
    for kind, parts in ((SWA, (False, False)), (HCA, (True, False)), (CSA, (True, True))):
        cache = V4Attention.from_config(v4_config(kind), 0).new_cache()
        assert (cache.compressor is not None, cache.indexer is not None) == parts, kind


def test_cache_memory_is_bounded_by_the_window_plus_entries():
    layer = V4Attention.from_config(v4_config(HCA), 0)
    cache = layer.new_cache()
    with torch.no_grad():
        for _ in range(40):
            layer(torch.randn(1, 1, 32), cache)
    # window: 5 tokens of 16 floats; entries: 40 // 5 = 8 of 16 floats; nothing pending (40 is a multiple of 5)
    assert cache.nbytes() == (5 + 8) * 16 * 4
