"""Decider lifetime: completed commands leave no reference cycles; `close` forgets the books at once."""

from __future__ import annotations

import gc
import weakref

from kvtier.scheduler.config import OffloadConfig
from kvtier.scheduler.cost.model import CostModel
from kvtier.scheduler.decider import Decider
from kvtier.scheduler.planner import Planner
from kvtier.tiers.commands import Completion, Move
from kvtier.tiers.keys import trace_key

COST = CostModel.from_profile("h100-sxm", "llama-3-8b", block_tokens=64)


def test_completed_commands_are_freed_without_the_cycle_collector_and_close_forgets_every_block():
    bpb = COST.spec.bytes_per_block
    decider = Decider(COST.spec, OffloadConfig(gpu_bytes=4 * bpb, host_bytes=64 * bpb), Planner(COST))
    callbacks, kinds = [], set()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(3):  # 4 GPU slots: the second and third saves demote the blocks before them to host
            commands = decider.start_save(f"r{r}", [trace_key(100 * r + i) for i in range(4)], list(range(4)))
            for command in commands:
                kinds.add(type(command))
                callbacks.append(weakref.ref(decider.pending[command.command_id].on_done))
                assert decider.complete(Completion(command.command_id, command.request_id, command.keys)) == []
            del commands, command
        assert Move in kinds, "no demotion: the test would not cover its callback"
        assert [c for c in callbacks if c() is not None] == []  # freed by reference counts alone
    finally:
        if was_enabled:
            gc.enable()
    assert len(decider.index) == 12 and not decider.pending
    decider.close()
    assert len(decider.index) == 0 and decider.lookup([trace_key(0)]) == []


def test_a_closed_manager_and_its_pools_are_freed_without_the_cycle_collector(tmp_path):
    """A server that reopens its manager (or a benchmark that opens one per cold repeat) gets the host pool's
    memory back at once, not at a later full collection that stalls whichever request it lands in."""
    import torch

    from kvtier.scheduler.manager import OffloadManager
    from kvtier.tiers.kvbuffer import BlockKVBuffer
    from managerutil import MODEL, tiny_spec

    spec = tiny_spec()
    config = OffloadConfig(host_bytes=8 * spec.bytes_per_block, disk_bytes=8 * spec.bytes_per_block,
                           disk_path=str(tmp_path / "d"), prefetch=False)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        manager = OffloadManager(spec, config, model_config=MODEL)
        buffer = BlockKVBuffer(spec, 4)
        manager.store("r", torch.arange(64), buffer).wait(10)
        manager.close()
        refs = [weakref.ref(manager), *(weakref.ref(t) for t in manager.executor.tiers.values())]
        del manager
        assert [r for r in refs if r() is not None] == []
    finally:
        if was_enabled:
            gc.enable()
