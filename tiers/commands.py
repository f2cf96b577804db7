"""The commands the decision half sends the byte half, and the completions that come back.

Small frozen dataclasses of plain data (keys, tier names, slot numbers, engine block ids), so they
pickle and can cross a process boundary (vLLM's connector metadata). The executor (`tiers/executor.py`)
defines what each means; the scheduler creates them.

- `Move`: copy blocks between two tiers (promote, demote, write-through to disk; why: `MoveReason`).
  Pools are addressed by slot, the disk by key.
- `Load`: copy blocks from tiers into the engine's KV, layer group by layer group.
- `Save`: copy blocks from the engine's KV into a pool tier.
- `Evict`: forget blocks in a tier (a pool slot becomes free; a disk value is deleted).
- `Completion`: a command's outcome: which keys arrived, which failed (a miss or a corrupt value).
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from kvtier.tiers.keys import BlockKey
from kvtier.tiers.tier import TierName

_ids = itertools.count(1)


def next_command_id() -> int:
    """A process-unique command id."""
    return next(_ids)


class MoveReason(str, enum.Enum):
    """Why blocks move between tiers (reports count bytes by reason; links order work by it)."""

    PREFETCH = "prefetch"  # toward a queued request's restore
    DEMOTE = "demote"  # evicted from a tier, copied to the one below
    WRITE_THROUGH = "write-through"  # a new block's copy below, made at once
    MOVE = "move"  # anything else (tests, tools)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Move:
    """Copy whole blocks from `src` to `dst` (slots for pools, empty for the disk)."""

    src: TierName
    dst: TierName
    keys: tuple[BlockKey, ...]
    src_slots: tuple[int, ...] = ()
    dst_slots: tuple[int, ...] = ()
    request_id: str | None = None
    reason: MoveReason = MoveReason.MOVE
    command_id: int = field(default_factory=next_command_id)


@dataclass(frozen=True, slots=True)
class Load:
    """Copy blocks into the engine's KV. A disk block is first read into the host slot named for it.

    `after`: command ids of moves in flight whose destination slots this load reads (a promotion the
    load joined instead of reading the disk again); the load's copies start once they have completed,
    and a block one of them failed to deliver is a failed block of the load. `growth`: each of the
    `num_groups` layer groups about this many times the size of the one before (`KVSpec.layer_groups`).
    """

    keys: tuple[BlockKey, ...]
    src_tiers: tuple[TierName, ...]
    src_slots: tuple[int, ...]
    dst_blocks: tuple[int, ...]
    num_groups: int = 4
    request_id: str | None = None
    command_id: int = field(default_factory=next_command_id)
    after: tuple[int, ...] = ()
    growth: float = 1.0


@dataclass(frozen=True, slots=True)
class Save:
    """Copy the engine's blocks `src_blocks` into slots of the pool tier `dst`."""

    keys: tuple[BlockKey, ...]
    src_blocks: tuple[int, ...]
    dst: TierName
    dst_slots: tuple[int, ...]
    request_id: str | None = None
    command_id: int = field(default_factory=next_command_id)


@dataclass(frozen=True, slots=True)
class Evict:
    """Forget blocks in a tier: pool slots are freed by the decision half's books; disk values deleted."""

    tier: TierName
    keys: tuple[BlockKey, ...]
    request_id: str | None = None
    command_id: int = field(default_factory=next_command_id)


Command = Move | Load | Save | Evict


@dataclass(frozen=True, slots=True)
class Completion:
    """The outcome of one command: `ok` keys arrived, `failed` ones did not; `error` if it failed whole."""

    command_id: int
    request_id: str | None
    ok: tuple[BlockKey, ...]
    failed: tuple[BlockKey, ...] = ()
    error: str | None = None
