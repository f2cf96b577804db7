"""Payload codecs: exact round trips, the byte-plane shuffle, and decode errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtier.tiers.codecs import Codec, PayloadCodec, get_codec, shuffle_bytes, unshuffle_into
from kvtier.tiers.errors import ConfigError, CorruptBlockError


def kv_bytes(dtype: torch.dtype, n: int = 4096, seed: int = 0) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=gen) * 0.3).to(dtype).view(torch.uint8).numpy()


@pytest.mark.parametrize("codec", list(Codec))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_into_out(codec, dtype):
    raw = kv_bytes(dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    c = get_codec(codec, level=3)
    stored = c.encode(raw, itemsize)
    out = np.zeros_like(raw)
    c.decode_into(stored, out, itemsize)
    assert np.array_equal(out, raw)
    if codec is not Codec.NONE:
        assert len(stored) < raw.size


def test_registry_covers_every_codec():
    assert set(PayloadCodec.registry) == set(Codec)
    assert [type(get_codec(c)).codec for c in Codec] == list(Codec)


def test_shuffle_puts_high_bytes_first():
    words = np.array([0x1234, 0xABCD, 0x00FF], dtype="<u2")
    planes = shuffle_bytes(words.view(np.uint8), 2)
    assert planes.tolist() == [0x12, 0xAB, 0x00, 0x34, 0xCD, 0xFF]
    out = np.empty(6, dtype=np.uint8)
    unshuffle_into(planes, out, 2)
    assert np.array_equal(out.view("<u2"), words)


def test_shuffle_is_identity_for_other_itemsizes():
    raw = np.arange(12, dtype=np.uint8)
    assert np.array_equal(shuffle_bytes(raw, 4), raw)
    out = np.empty_like(raw)
    unshuffle_into(raw, out, 4)
    assert np.array_equal(out, raw)


def test_shuffle_helps_bf16():
    raw = kv_bytes(torch.bfloat16, n=1 << 16)
    plain, shuffled = (len(get_codec(c).encode(raw, 2)) for c in (Codec.ZSTD, Codec.ZSTD_SHUFFLE))
    assert shuffled < plain


@pytest.mark.parametrize("codec", [Codec.ZSTD, Codec.ZSTD_SHUFFLE])
def test_wrong_length_is_corrupt(codec):
    raw = kv_bytes(torch.bfloat16)
    stored = get_codec(codec).encode(raw, 2)
    with pytest.raises(CorruptBlockError, match="expected"):
        get_codec(codec).decode_into(stored, np.empty(raw.size + 2, dtype=np.uint8), 2)
    with pytest.raises(CorruptBlockError, match="expected"):
        get_codec(codec).decode_into(stored, np.empty(raw.size - 2, dtype=np.uint8), 2)
    with pytest.raises(CorruptBlockError):
        get_codec(codec).decode_into(b"not zstd at all", np.empty(raw.size, dtype=np.uint8), 2)


def test_none_codec_wrong_length_is_corrupt():
    with pytest.raises(CorruptBlockError, match="expected 8"):
        get_codec(Codec.NONE).decode_into(b"1234", np.empty(8, dtype=np.uint8), 1)


@pytest.mark.parametrize("text, codec", [("none", Codec.NONE), ("zstd", Codec.ZSTD),
                                         ("zstd-shuffle", Codec.ZSTD_SHUFFLE), ("ZSTD_SHUFFLE", Codec.ZSTD_SHUFFLE),
                                         (2, Codec.ZSTD_SHUFFLE)])
def test_parse(text, codec):
    assert Codec.parse(text) is codec


@pytest.mark.parametrize("bad", ["lz4", 7, True, None])
def test_parse_rejects(bad):
    with pytest.raises(ConfigError, match="expected one of none, zstd, zstd-shuffle"):
        Codec.parse(bad)


def test_bad_level():
    with pytest.raises(ConfigError, match="zstd_level"):
        get_codec(Codec.ZSTD, level=40)
