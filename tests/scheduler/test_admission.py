"""Prefetch admission (decision half): deadline, room, protection until the load ends, joins.

The Decider runs with its real planner and cost model (llama-3-8b on h100-sxm, 64-token blocks) and a
clock the test moves; completions are fed back as the byte half reports them.
"""

from __future__ import annotations

import dataclasses

import pytest

from kvtier.scheduler.config import OffloadConfig
from kvtier.scheduler.cost.model import CostModel
from kvtier.scheduler.decider import Decider
from kvtier.scheduler.planner import Planner
from kvtier.tiers.commands import Completion, Load, Move, Save
from kvtier.tiers.errors import ConfigError
from kvtier.tiers.keys import trace_key
from kvtier.tiers.tier import TierName

COST = CostModel.from_profile("h100-sxm", "llama-3-8b", block_tokens=64)
BT = COST.spec.block_tokens


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(host_blocks: int, disk_keys: list, whole_last_block: bool = False, **kw) -> tuple[Decider, Clock]:
    bpb = COST.spec.bytes_per_block
    config = OffloadConfig(host_bytes=host_blocks * bpb, disk_bytes=4096 * bpb, disk_path="(simulated)", **kw)
    clock = Clock()
    decider = Decider(COST.spec, config, Planner(COST), clock=clock, whole_last_block=whole_last_block)
    decider.rebuild_from_disk(disk_keys)
    return decider, clock


def keys(first: int, n: int) -> list:
    return [trace_key(first + i) for i in range(n)]


def run_uncached(decider: Decider, rid: str, num_blocks: int) -> float:
    """A request with nothing cached starts its prefill now; returns its predicted prefill."""
    decider.enqueue(rid, keys(10_000 + 1000 * len(decider.running), num_blocks), num_blocks * BT)
    plan = decider.plan(rid)
    assert decider.start_load(rid, decider.request(rid).keys, 0, 0, ()) is None
    return plan.total_s


def done(decider: Decider, command, ok=None) -> list:
    return decider.complete(Completion(command.command_id, command.request_id,
                                       tuple(command.keys if ok is None else ok)))


def test_promotion_lands_before_predicted_start_or_is_not_made():
    a = keys(0, 100)
    decider, clock = make(256, a)
    decider.enqueue("a", a, 100 * BT + 1)
    # "a" is about to run (nothing ahead of it): promoting now would only race its own load
    assert decider.next_prefetch() == []
    # an uncached 32-block prompt starts: "a" now waits behind its predicted prefill
    ahead = run_uncached(decider, "r", 32)
    out = decider.next_prefetch()
    assert len(out) == 1 and isinstance(out[0], Move)  # one batched move for the request
    move = out[0]
    assert (move.src, move.dst, move.reason, move.request_id) == (TierName.DISK, TierName.HOST, "prefetch", "a")
    admission = decider.admission
    assert 4 <= len(move.keys) < 100 and admission.disk_s(len(move.keys)) <= ahead
    assert admission.disk_s(len(move.keys) + 1) > ahead  # the deadline is what bounded it
    first = a.index(move.keys[0])  # the first block its plan restores from disk (the front is recomputed)
    assert move.keys == tuple(a[first:first + len(move.keys)])  # then the next ones, in prompt order
    # in flight: not in host yet, but known to be coming (a load would join it)
    k = move.keys[0]
    assert not decider.index.holds(k, TierName.HOST) and decider.index.get(k).incoming == move.command_id
    # the prefill ahead is over: nothing more can land in time for "a"
    clock.now += ahead
    assert decider.next_prefetch() == []
    done(decider, move)
    assert all(decider.index.holds(k, TierName.HOST) for k in move.keys)
    assert decider.stats.prefetched_blocks == len(move.keys)


@pytest.mark.parametrize("whole_last_block", [False, True])
def test_a_fully_cached_prompts_last_block_is_promoted_where_the_engine_loads_it_whole(whole_last_block):
    # 30 blocks, the prompt exactly 30 blocks long: the plan recomputes the last token, so it restores 29;
    # an engine that loads the last block whole (vLLM's connector) reads the 30th from disk unless promoted
    a = keys(0, 30)
    decider, _ = make(256, a, whole_last_block=whole_last_block)
    run_uncached(decider, "r", 400)  # a long prefill ahead: neither deadline nor room bounds the promotion
    decider.enqueue("a", a, 30 * BT)
    (move,) = decider.next_prefetch()
    assert a[28] in move.keys and (a[29] in move.keys) == whole_last_block
    assert len(set(move.keys)) == len(move.keys)
    done(decider, move)
    plan = decider.plan("a")  # every block in host: all 29 restorable blocks restored, the 30th loaded whole
    got = (plan.num_matched_blocks, plan.num_found_blocks, plan.restore_stop, plan.whole_block_stop)
    assert got == (29, 30, 29, 30)


def test_room_is_bounded_and_protected_blocks_survive_saves_until_the_load_ends():
    a = keys(0, 30)
    decider, clock = make(40, a, prefetch_room_share=0.25)
    run_uncached(decider, "r", 200)  # a long prefill ahead: only the room bounds the promotion
    decider.enqueue("a", a, 30 * BT + 1)
    (move,) = decider.next_prefetch()
    assert len(move.keys) == 10  # a quarter of the 40 host slots
    done(decider, move)
    promoted = move.keys
    # another request saves 40 new blocks: host is full, yet no protected block is a victim
    saves = decider.start_save("s", keys(5000, 40), range(40))
    save = next(c for c in saves if isinstance(c, Save))
    assert len(save.keys) == 30  # the unprotected slots are all it could use
    done(decider, save)
    assert all(decider.index.holds(k, TierName.HOST) for k in promoted)
    # "a" starts: its load reads the promoted blocks from host; they stay protected until it ends
    plan = decider.plan("a")
    load = decider.start_load("a", a, plan.split, plan.restore_stop, range(plan.split, plan.restore_stop))
    assert isinstance(load, Load) and load.after == ()
    assert all(t is TierName.HOST for k, t in zip(load.keys, load.src_tiers) if k in promoted)
    assert decider.index.is_protected(promoted[0])
    for command in decider.take_prepared():
        done(decider, command)
    done(decider, load)
    assert not any(decider.index.is_protected(k) for k in promoted)
    assert decider.stats.prefetch_used_blocks == 10 and decider.stats.double_reads == 0


def test_a_load_joins_a_promotion_in_flight_instead_of_reading_it_again():
    a = keys(0, 24)
    decider, clock = make(64, a)
    run_uncached(decider, "r", 200)
    decider.enqueue("a", a, 24 * BT + 1)
    (move,) = decider.next_prefetch()
    # "a" starts before the promotion landed; with no canceller (a vLLM worker), it joins the move
    plan = decider.plan("a")
    load = decider.start_load("a", a, plan.split, plan.restore_stop, range(plan.split, plan.restore_stop))
    joined = [k for k, t in zip(load.keys, load.src_tiers) if k in move.keys]
    assert load.after == (move.command_id,) and joined
    assert all(t is TierName.HOST for k, t in zip(load.keys, load.src_tiers) if k in move.keys)
    assert decider.stats.prefetch_joined_blocks == len(joined) and decider.stats.double_reads == 0
    for command in decider.take_prepared():
        done(decider, command)
    done(decider, move)
    done(decider, load)
    assert decider.stats.prefetch_used_blocks == len(joined)
    assert decider.index.pinned_keys() == []


def test_a_canceller_cancels_what_has_not_begun_and_the_load_reads_it_itself():
    a = keys(0, 24)
    decider, clock = make(64, a)
    begun = 4  # the byte half had started the first piece
    decider.set_canceller(lambda command_id: list(move.keys[begun:]))
    run_uncached(decider, "r", 200)
    decider.enqueue("a", a, 24 * BT + 1)
    (move,) = decider.next_prefetch()
    plan = decider.plan("a")
    load = decider.start_load("a", a, plan.split, plan.restore_stop, range(plan.split, plan.restore_stop))
    by_key = dict(zip(load.keys, load.src_tiers))
    assert load.after == (move.command_id,)
    assert all(by_key[k] is TierName.HOST for k in move.keys[:begun] if k in by_key)
    assert all(by_key[k] is TierName.DISK for k in move.keys[begun:] if k in by_key)
    assert decider.stats.prefetch_cancelled_blocks == len(move.keys) - begun
    for command in decider.take_prepared():
        done(decider, command)
    done(decider, move, ok=move.keys[:begun])
    done(decider, load)
    assert decider.index.pinned_keys() == []


def test_a_promotion_cancelled_whole_gives_back_its_whole_predicted_read_on_a_ramped_disk():
    # a calibrated cold disk: small reads slower per byte (PathCost's ramp), so a read of n blocks costs
    # more than latency + n x the bulk per-block time; cancelling it must give all of that back
    bpb = COST.spec.bytes_per_block
    disk = dataclasses.replace(COST.path("disk"), ramp_bytes=256 * bpb, ramp_exponent=0.7)
    ramped = dataclasses.replace(COST, paths={**COST.paths, "disk": disk})
    a = keys(0, 24)
    config = OffloadConfig(host_bytes=64 * bpb, disk_bytes=4096 * bpb, disk_path="(simulated)")
    decider = Decider(COST.spec, config, Planner(ramped), clock=Clock())
    decider.rebuild_from_disk(a)
    decider.set_canceller(lambda command_id: list(move.keys))  # nothing had begun
    run_uncached(decider, "r", 200)
    decider.enqueue("a", a, 24 * BT + 1)
    (move,) = decider.next_prefetch()
    admission = decider.admission
    assert admission.disk_s(len(move.keys)) > disk.latency_s + len(move.keys) * disk.block_s  # the ramp costs
    assert admission.disk_backlog_s == pytest.approx(admission.disk_s(len(move.keys)))
    admission.cancel_request("a")
    assert decider.stats.prefetch_cancelled_blocks == len(move.keys)
    assert admission.disk_backlog_s == pytest.approx(0.0, abs=1e-12)
    assert decider.stats.disk_prefetch_s == pytest.approx(0.0, abs=1e-12)


def test_bad_prefetch_settings_are_refused():
    with pytest.raises(ConfigError, match="prefetch_room_share"):
        OffloadConfig(prefetch_room_share=1.5)
    with pytest.raises(ConfigError, match="prefetch_inflight_blocks"):
        OffloadConfig(prefetch_inflight_blocks=0)


def test_a_load_sizes_its_layer_groups_from_the_planner():
    """Little to compute after a disk read: whole values; some: small last groups; much: small first groups."""
    decider, _ = make(host_blocks=64, disk_keys=keys(0, 48), prefetch=False)
    shapes = []
    for rid, blocks, after in (("one", keys(0, 16), 1), ("short", keys(16, 16), 8 * BT),
                               ("long", keys(32, 16), 64 * BT)):
        decider.enqueue(rid, blocks, 16 * BT + after)
        load = decider.start_load(rid, blocks, 0, 16, range(16))
        assert isinstance(load, Load) and set(load.src_tiers) == {TierName.DISK}
        shape = (load.num_groups, load.growth)
        assert shape == decider.planner.layer_groups(load.src_tiers, 16 * BT, 16 * BT + after,
                                                     decider.config.num_layer_groups)
        shapes.append(shape)
        for command in decider.take_prepared():
            done(decider, command)
        done(decider, load)
        decider.finish(rid)
    (one, _), (short, shrinking), (long, growing) = shapes
    assert one == 1 and short == long == decider.config.num_layer_groups
    assert shrinking < 1 < growing
