"""A restore read layer group by layer group (`get_many(..., layer_groups=...)`, `disk.read.PartedValue`): the
same bytes as a whole-value read, each group of every block in place when `on_group` says so, a value that
fails its checks (at its header or at its checksum, decided with the last group) a clean miss, compressed
values read whole, and an engine load that delivers groups before the read ends. Real LMDB stores, real threads."""

from __future__ import annotations

import pytest
import torch

from diskutil import SPEC, block, edit_value, empty, key
from kvtier.scheduler.engines.hf.kv import HFKVBuffer
from kvtier.tiers.codecs import Codec
from kvtier.tiers.disk import env as diskenv
from kvtier.tiers.disk.format import HEADER_BYTES
from kvtier.tiers.disk.read import PartedValue, part_bounds
from kvtier.tiers.disk.store import DiskTier
from kvtier.tiers.errors import ConfigError, TransferError
from kvtier.tiers.kvbuffer import BlockKVBuffer
from kvtier.tiers.pool import HostTier
from kvtier.tiers.tier import TierName
from kvtier.tiers.transfer import Transferer

N = 12
BPB = SPEC.bytes_per_block
GROUPS = [(0, 1), (1, 2)]


def fill(path: str, codec: Codec = Codec.NONE) -> None:
    with DiskTier(path, SPEC, 4 * N * BPB, codec=codec) as disk:
        disk.put_many([key(i) for i in range(N)], [block(i) for i in range(N)])


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("codec", [Codec.NONE, Codec.ZSTD])
def test_each_group_of_every_block_is_in_place_when_reported_and_the_blocks_are_exact(store, threads, codec):
    fill(store, codec)
    outs, seen = [empty() for _ in range(N)], []

    def on_group(g: int) -> None:  # every block's layers [lo, hi) are already there
        lo, hi = GROUPS[g]
        seen.append((g, all(torch.equal(outs[i][lo:hi], block(i)[lo:hi]) for i in range(N))))

    with DiskTier(store, SPEC, 4 * N * BPB, read_threads=threads, read_split_bytes=BPB) as disk:
        found = disk.get_many([key(i) for i in range(N)], outs, layer_groups=GROUPS, on_group=on_group)
        assert disk.stats().hits == N
    assert found == [True] * N
    assert seen == [(0, True), (1, True)]
    assert all(torch.equal(outs[i], block(i)) for i in range(N))


@pytest.mark.parametrize("threads", [1, 4])
def test_landed_groups_are_reported_in_batches_in_place_before_their_group(store, threads, monkeypatch):
    # a caller copies each batch on as it lands: the tail after the last read is one batch, not a group
    fill(store)
    edit_value(store, SPEC, key(7), lambda v: v[:20] + bytes([v[20] ^ 0xFF]) + v[21:])  # foreign at its header
    locate = diskenv.SharedEnv.locate_many
    monkeypatch.setattr(diskenv.SharedEnv, "locate_many", lambda self, txn, lks: [  # 2 and 3 read through LMDB
        diskenv.UNLOCATED if i in (2, 3) else where for i, where in enumerate(locate(self, txn, lks))])
    outs, events = [empty() for _ in range(N)], []

    def on_part(g: int, landed: list[int]) -> None:
        lo, hi = GROUPS[g]
        events.append(("part", g, landed, all(torch.equal(outs[i][lo:hi], block(i)[lo:hi]) for i in landed)))

    with DiskTier(store, SPEC, 4 * N * BPB, read_threads=threads, read_split_bytes=BPB) as disk:
        found = disk.get_many([key(i) for i in range(N)], outs, batch_blocks=3, layer_groups=GROUPS,
                              on_part=on_part, on_group=lambda g: events.append(("group", g)))
    assert found == [i != 7 for i in range(N)]
    for g in range(len(GROUPS)):
        end = events.index(("group", g))
        parts = [e for e in events[:end] if e[0] == "part" and e[1] == g]
        assert sorted(i for e in parts for i in e[2]) == [i for i in range(N) if i != 7]  # each once, in place
        assert all(e[3] and 1 <= len(e[2]) <= 3 for e in parts)
        assert len(parts) > 1  # in batches as they land, not all at the group's end
    assert not [e for e in events[events.index(("group", 1)):] if e[0] == "part"]


@pytest.mark.parametrize("where, reason", [(HEADER_BYTES + BPB - 1, "corrupt"),  # last group: the checksum
                                           (HEADER_BYTES + 1, "corrupt"),         # first group
                                           (20, "foreign")])                      # the header's key
def test_a_damaged_value_is_a_counted_miss_and_removed_whichever_group_it_is_in(store, where, reason):
    fill(store)
    edit_value(store, SPEC, key(5), lambda v: v[:where] + bytes([v[where] ^ 0xFF]) + v[where + 1:])
    outs = [empty() for _ in range(N)]
    groups = []
    with DiskTier(store, SPEC, 4 * N * BPB, read_threads=4, read_split_bytes=BPB) as disk:
        found = disk.get_many([key(i) for i in range(N)], outs, layer_groups=GROUPS, on_group=groups.append)
        stats = disk.stats()
        assert not disk.contains(key(5))
    assert found == [i != 5 for i in range(N)]
    assert groups == [0, 1]
    assert (stats.corrupt, stats.foreign) == ((1, 0) if reason == "corrupt" else (0, 1))
    assert all(torch.equal(outs[i], block(i)) for i in range(N) if i != 5)


def test_absent_blocks_still_report_every_group(store):
    fill(store)
    groups = []
    with DiskTier(store, SPEC, 4 * N * BPB) as disk:
        found = disk.get_many([key(100), key(0)], [empty(), empty()], layer_groups=GROUPS, on_group=groups.append)
    assert found == [False, True] and groups == [0, 1]


def test_the_parts_extents_are_the_bytes_each_part_reads():
    bounds = part_bounds(SPEC, GROUPS)
    raw = PartedValue(4096, HEADER_BYTES + BPB, b"f" * 16, key(0), empty().numpy(), SPEC.itemsize, bounds)
    first, second = raw.extent(0), raw.extent(1)
    assert first == (4096, HEADER_BYTES + bounds[1])  # the header with part 0
    assert second == (4096 + HEADER_BYTES + bounds[1], BPB - bounds[1])
    packed = PartedValue(4096, BPB // 3, b"f" * 16, key(0), empty().numpy(), SPEC.itemsize, bounds)
    assert [packed.extent(0), packed.extent(1)] == [(4096, BPB // 3), (4096, 0)]  # compressed: read whole first


def test_layer_groups_must_cover_the_layers_in_order(store):
    fill(store)
    assert part_bounds(SPEC, None) == [] and part_bounds(SPEC, [(0, 2)]) == []
    assert part_bounds(SPEC, GROUPS) == [0, BPB // 2, BPB]
    with DiskTier(store, SPEC, 4 * N * BPB) as disk:
        for bad in ([(0, 1), (0, 2)], [(1, 2), (0, 1)], [(0, 1), (1, 3)], [(0, 0), (0, 2)]):
            with pytest.raises(ConfigError, match="layer_groups: expected contiguous"):
                disk.get_many([key(0)], [empty()], layer_groups=bad)


@pytest.mark.parametrize("engine", ["hf", "blocks"])
def test_an_engine_load_is_exact_and_fails_from_the_first_damaged_block(store, engine):
    """Through the host slots into a transformers cache or a block buffer: exact KV, host slots filled, a
    damaged block failed with all after it."""
    fill(store)
    edit_value(store, SPEC, key(7), lambda v: v[:-1] + bytes([v[-1] ^ 0xFF]))
    disk = DiskTier(store, SPEC, 4 * N * BPB, read_threads=4, read_split_bytes=BPB)
    host = HostTier(SPEC, N * BPB)
    transfer = Transferer({TierName.HOST: host, TierName.DISK: disk})
    try:
        buffer = HFKVBuffer.allocate(SPEC, N * SPEC.block_tokens) if engine == "hf" else BlockKVBuffer(SPEC, N)
        slots = list(reversed(range(N)))
        tiers = [TierName.HOST] + [TierName.DISK] * (N - 1)  # block 0 from the host tier
        host.pool.blocks(slots[0], 1)[0].copy_(block(0))
        handle = transfer.load([key(i) for i in range(N)], tiers, slots, buffer, list(range(N)), num_groups=2)
        handle.wait(30)
        assert handle.failed == tuple(key(i) for i in range(7, N))
        transfer.drain()
        out = torch.empty((1, *SPEC.block_shape))
        for i in range(7):
            buffer.read_blocks([i], out, (0, SPEC.num_layers))
            assert torch.equal(out[0], block(i))
            assert torch.equal(host.pool.blocks(slots[i], 1)[0], block(i))
    finally:
        transfer.close()
        disk.close()


def test_a_layer_group_copy_that_fails_fails_the_load(store):
    """The host blocks' share of a group is copied by a job of its own: its error must reach the load's handle."""
    fill(store)

    class Broken(HFKVBuffer):
        def write_blocks(self, dst_blocks, src, layers):
            raise RuntimeError("engine KV gone")

        write_chunks = write_blocks

    disk = DiskTier(store, SPEC, 4 * N * BPB)
    host = HostTier(SPEC, N * BPB)
    transfer = Transferer({TierName.HOST: host, TierName.DISK: disk})
    try:
        plain = HFKVBuffer.allocate(SPEC, N * SPEC.block_tokens)
        buffer = Broken(SPEC, plain.keys, plain.values)
        handle = transfer.load([key(i) for i in range(3)], [TierName.HOST, TierName.DISK, TierName.DISK], [0, 1, 2],
                               buffer, [0, 1, 2], num_groups=2)
        with pytest.raises(TransferError, match="engine KV gone"):
            handle.wait(30)
    finally:
        transfer.close()
        disk.close()
