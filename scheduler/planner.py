"""Planner: for one request, which cached prefix blocks to restore and which to recompute.

Primitives (`Plan`, the decision for one request, is in `kvtier.scheduler.plan`):
- `Planner(cost_model, disk_codec="none")`: `plan(tiers, num_tokens)` chooses s and r minimising
      total(s, r) = max(compute [0, s), load [s, r)) + compute [r, n)
  over every 0 <= s <= r <= k ("restore nothing" is r = 0, "restore everything" s = 0, r = k).

Load model (the assumption `load [s, r)` rests on): the blocks of [s, r) move in one batched transfer per
tier, the tiers in parallel; a disk block goes disk -> host -> GPU pipelined, so it occupies the disk
(its path's cost: slowest stage) and the host link too. Three links work in parallel and the load ends
when the slowest finishes: the host link (host and disk blocks, host path cost), the disk (disk blocks,
disk or disk_zstd path cost), the GPU copy engine (gpu blocks, gpu path cost); each link pays its latency
once when it carries any block. A path with a ramp (a calibrated cold disk: small reads slower per byte,
`PathCost`) costs its `effective_blocks`; the crossing below is then searched with its bulk per-block
cost and the candidates it gives are evaluated exactly, so every plan's predicted times are the cost
model's, and its choice is within a block or so of the exact optimum.

Why front recompute, back restore: recompute of a block costs more the deeper it is (attention grows with
position) while its restore costs the same, so the cheap-to-recompute front is computed while the back
loads. Cached blocks after r are recomputed when restoring them would cost more than computing them
(e.g. an MHA model whose deep blocks sit on a slow disk).

Speed: O(k log k) in numpy, no Python loop over blocks. For each r the best s is where compute [0, s)
(rising) crosses load [s, r) (falling); that crossing is a `searchsorted` per link, so all r are handled
at once and the plan for 2,048 blocks takes well under a millisecond. Short prompts (k <= `SMALL_K`
blocks, most requests of a trace) take a pure-Python path with the very same arithmetic in the same order
(`bisect` for `searchsorted`), so its plans are identical; there numpy's per-call overhead (~0.2 ms a plan)
would dominate.

Invariants: 0 <= s <= r <= k; k x block_tokens < n (the last prompt token is always computed: the engine
needs its logits, so a fully cached prompt recomputes its last block); total_s <= recompute_all_s and
total_s <= restore_all_s; no torch import.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import Counter
from typing import Sequence

import numpy as np

from kvtier.tiers.codecs import Codec
from kvtier.tiers.errors import ConfigError
from kvtier.tiers.tier import TierName

from kvtier.scheduler.cost.model import CostModel
from kvtier.scheduler.cost.parts import PathCost
from kvtier.scheduler.plan import TIERS as _TIERS, Plan

#: tier codes of the fast input form (a numpy integer array): TierName.rank
_CODES = {TierName.GPU: 0, TierName.HOST: 1, TierName.DISK: 2, TierName.REMOTE: 3, "gpu": 0, "host": 1, "disk": 2,
          "remote": 3}
#: plans of at most this many matched blocks take the pure-Python path (module docstring)
SMALL_K = 32
#: how many recent plans a planner keeps for questions asked again (the same prefix tiers and prompt
#: length: a queued request is planned at each prefetch round that changes nothing, and when it starts)
MEMO_PLANS = 4096
#: the most one layer group of a load outsizes the one before (or the least, inverted): at 2, the first of 4
#: groups is 2 of 30 layers (reads of ~0.2 MB a block); beyond it groups get small enough to cost more
#: in requests and waits than they save
MAX_GROUP_GROWTH = 2.0
#: below this ratio of the predicted compute after a load to the load, a load with disk blocks is read whole
#: (one layer group): a read by layer groups skips bytes, which costs the kernel's sequential readahead
#: (here 1.3-1.6x the time and 2.5x the CPU of one stream over the same bytes, docs/disk-reads.md), more
#: than overlapping so little compute with the read wins back
WHOLE_READ_BELOW = 1 / MAX_GROUP_GROWTH


class Planner:
    """Chooses restore vs recompute for requests under one cost model.

    Args:
        cost_model: the model and machine.
        disk_codec: the disk tier's codec: "none" restores over the `disk` path, a compressing one
            ("zstd", "zstd-shuffle") over `disk_zstd`.

    Raises:
        ConfigError: an unknown codec.
    """

    def __init__(self, cost_model: CostModel, *, disk_codec: Codec | str = Codec.NONE) -> None:
        self.cost_model = cost_model
        self.disk_path = "disk" if Codec.parse(disk_codec) is Codec.NONE else "disk_zstd"
        self._links: dict[int, tuple] = {}
        self._memo: dict[tuple, Plan] = {}  # (tiers, num_tokens, block_tokens) -> plan; emptied when full

    def forget(self) -> None:
        """Empties the memo of recent plans (a benchmark timing the planning itself)."""
        self._memo.clear()

    def _coefficients(self, block_tokens: int) -> tuple:
        cached = self._links.get(block_tokens)
        if cached is None:
            model = self.cost_model.with_block_tokens(block_tokens)
            # link: (tier codes it carries, latency, seconds per block)
            # the host link carries every block from host, disk and remote (codes >= 1); the network only
            # remote blocks (a cost model without a remote path never sees one)
            remote = ((3,), model.path("remote")) if "remote" in model.paths else ()
            links = tuple((codes, cost.latency_s, cost.block_s, cost if cost.ramp_blocks else None)
                          for codes, cost in (
                ((0,), model.path("gpu")), ((1, 2, 3), model.path("host")), ((2,), model.path(self.disk_path)),
                *((remote,) if remote else ())))
            cached = self._links[block_tokens] = (model.recompute, links)
        return cached

    def plan(self, tiers: Sequence[TierName | str] | np.ndarray, num_tokens: int, *,
             block_tokens: int | None = None) -> Plan:
        """Plans one request.

        Args:
            tiers: the tier of each matched prefix block, in order (the fastest tier holding it): tier
                names, or a numpy integer array of `TierName.rank` codes (0 gpu, 1 host, 2 disk, 3 remote; fastest).
            num_tokens: the prompt's total tokens n.
            block_tokens: tokens per block; by default the cost model's.

        Returns:
            The plan with the smallest predicted time.

        Raises:
            ConfigError: an unknown tier, more matched tokens than the prompt has, or a bad count.
        """
        bt = self.cost_model.spec.block_tokens if block_tokens is None else block_tokens
        memo_key = ((tiers.dtype.str, tiers.shape, tiers.tobytes()) if isinstance(tiers, np.ndarray) else tuple(tiers),
                    num_tokens, bt)
        try:
            plan = self._memo.get(memo_key)
        except TypeError:  # an unhashable tier or count: `_plan` names it
            return self._plan(tiers, num_tokens, bt, block_tokens)
        if plan is None:
            plan = self._plan(tiers, num_tokens, bt, block_tokens)
            if len(self._memo) >= MEMO_PLANS:
                self._memo.clear()
            self._memo[memo_key] = plan
        return plan

    def layer_groups(self, tiers: Sequence[TierName | str], stop_tokens: int, num_tokens: int,
                     num_groups: int) -> tuple[int, float]:
        """How a load is cut into layer groups (`KVSpec.layer_groups`): (groups, growth), growth being how many
        times the size of the one before each group is.

        The ratio r of the predicted compute of what the engine computes after the load (tokens
        [stop_tokens, num_tokens), at least one) to the predicted load of blocks in `tiers` (the load model
        of `plan`) sets both: an engine computing more slowly than its KV arrives gets a small first group
        (it starts early); one waiting for its KV gets a small last group; growth is r within
        [1 / MAX_GROUP_GROWTH, MAX_GROUP_GROWTH]. A load with disk blocks and r below WHOLE_READ_BELOW is
        one group (whole values read in file order): `num_groups` otherwise.
        """
        _, links = self._coefficients(self.cost_model.spec.block_tokens)
        counts = Counter(_as_code_list(tiers))
        # each link's blocks as a count from 0 to n, so `_load` prices all of them (blocks [0, 1) of it)
        load = _load([((0, sum(counts[c] for c in carried)), *cost) for carried, *cost in links], 0, 1)
        compute = self.cost_model.recompute_s(stop_tokens, max(1, num_tokens - stop_tokens))
        ratio = compute / load if load > 0 else MAX_GROUP_GROWTH
        if counts[_CODES[TierName.DISK]] and ratio < WHOLE_READ_BELOW:
            return 1, 1.0
        return num_groups, min(MAX_GROUP_GROWTH, max(1 / MAX_GROUP_GROWTH, ratio))

    def _plan(self, tiers: Sequence[TierName | str] | np.ndarray, num_tokens: int, bt: int,
              block_tokens: int | None) -> Plan:
        if not isinstance(bt, (int, np.integer)) or bt <= 0:
            raise ConfigError(f"block_tokens: expected a positive int, got {block_tokens!r}")
        if not isinstance(num_tokens, (int, np.integer)) or num_tokens <= 0:
            raise ConfigError(f"num_tokens: expected a positive int, got {num_tokens!r}")
        found = len(tiers)
        if found * bt > num_tokens:
            _as_codes(tiers)  # a bad tier is the first error to report
            raise ConfigError(f"tiers: {found} matched blocks of {bt} tokens exceed the prompt's "
                              f"num_tokens={num_tokens}")
        k = min(found, (num_tokens - 1) // bt)
        recompute, links = self._coefficients(int(bt))
        if k <= SMALL_K:
            return self._plan_small(_as_code_list(tiers), k, found, int(num_tokens), int(bt), recompute, links)
        codes = _as_codes(tiers)[:k]
        f0, a, b = recompute.fixed_s, recompute.per_token_s, recompute.per_token_ctx_s

        t = np.arange(k + 1, dtype=np.float64) * bt                  # tokens before block i
        front = t * (a + b * t / 2) + f0                              # compute [0, s)
        front[0] = 0.0
        rest = num_tokens - t
        suffix = rest * (a + b * (t + rest / 2)) + f0                 # compute [r, n); rest >= 1 always

        used, first_of_count = [], []
        for link_codes, latency, per_block, ramp in links:
            mask = codes == link_codes[0] if len(link_codes) == 1 else codes >= link_codes[0]
            cnt = np.zeros(k + 1, dtype=np.int64)
            np.cumsum(mask, out=cnt[1:])
            if cnt[-1]:
                used.append((cnt, latency, per_block, ramp))
                # the first i with cnt[i] == cnt[r], for every r: searchsorted(cnt, cnt) by a gather (cnt
                # steps up by one after each of the link's blocks)
                starts = np.empty(int(cnt[-1]) + 1, dtype=np.int64)
                starts[0] = 0
                starts[1:] = np.flatnonzero(mask) + 1
                first_of_count.append(starts[cnt])
        r_all = np.arange(k + 1)
        if used:
            s_star = np.zeros(k + 1, dtype=np.int64)
            for (cnt, latency, per_block, _), first in zip(used, first_of_count):
                crossing = np.searchsorted(front + per_block * cnt, latency + per_block * cnt, side="left")
                np.maximum(s_star, np.minimum(crossing, first), out=s_star)
            s_prev = np.maximum(s_star - 1, 0)
            best_front = np.minimum(_overlap(front, used, s_star, r_all), _overlap(front, used, s_prev, r_all))
        else:
            s_star = s_prev = r_all * 0
            best_front = np.zeros(k + 1)
        total = best_front + suffix
        r = k - int(np.argmin(total[::-1]))                           # ties: restore more, compute less
        s = _smallest_split(front, used, r, float(best_front[r]))
        load = _load(used, s, r)
        restored = [(tier, int(np.count_nonzero(codes[s:r] == i))) for i, tier in enumerate(_TIERS)]
        return Plan(num_tokens=int(num_tokens), block_tokens=int(bt), num_matched_blocks=k, num_found_blocks=found,
                    tier_codes=codes.astype(np.int8, copy=False).tobytes(), split=s, restore_stop=r,
                    restored_by_tier=tuple((tier, n) for tier, n in restored if n),
                    disk_path=self.disk_path, front_compute_s=float(front[s]), load_s=load,
                    suffix_compute_s=float(suffix[r]), total_s=max(float(front[s]), load) + float(suffix[r]),
                    recompute_all_s=float(suffix[0]), restore_all_s=_load(used, 0, k) + float(suffix[k]))


    def _plan_small(self, codes: list[int], k: int, found: int, num_tokens: int, bt: int, recompute: object,
                    links: tuple) -> Plan:
        """`plan` in pure Python for small k: the numpy path's arithmetic, element by element."""
        codes = codes[:k]
        f0, a, b = recompute.fixed_s, recompute.per_token_s, recompute.per_token_ctx_s
        front, suffix = [], []
        for i in range(k + 1):
            t = float(i) * bt
            front.append(t * (a + b * t / 2) + f0)
            rest = num_tokens - t
            suffix.append(rest * (a + b * (t + rest / 2)) + f0)
        front[0] = 0.0
        used = []
        for link_codes, latency, per_block, ramp in links:
            lo, single = link_codes[0], len(link_codes) == 1
            cnt, c = [0], 0
            for code in codes:
                if code == lo if single else code >= lo:
                    c += 1
                cnt.append(c)
            if c:
                used.append((cnt, latency, per_block, ramp))
        if used:
            keyed = [([f + per_block * n for f, n in zip(front, cnt)], cnt, latency, per_block)
                     for cnt, latency, per_block, _ in used]
            best_front = []
            for r in range(k + 1):
                s_star = 0
                for arr, cnt, latency, per_block in keyed:
                    crossing = bisect_left(arr, latency + per_block * cnt[r])
                    s_star = max(s_star, min(crossing, bisect_left(cnt, cnt[r])))
                best_front.append(min(_overlap_at(front, used, s_star, r),
                                      _overlap_at(front, used, max(s_star - 1, 0), r)))
        else:
            best_front = [0.0] * (k + 1)
        total = [x + y for x, y in zip(best_front, suffix)]
        low = min(total)
        r = k - total[::-1].index(low)                                 # ties: restore more, compute less
        s = _smallest_split(front, used, r, best_front[r])
        load = _load(used, s, r)
        part = codes[s:r]
        restored = [(tier, part.count(i)) for i, tier in enumerate(_TIERS)]
        return Plan(num_tokens=num_tokens, block_tokens=bt, num_matched_blocks=k, num_found_blocks=found,
                    tier_codes=bytes(codes), split=s, restore_stop=r,
                    restored_by_tier=tuple((tier, n) for tier, n in restored if n),
                    disk_path=self.disk_path, front_compute_s=front[s], load_s=load,
                    suffix_compute_s=suffix[r], total_s=max(front[s], load) + suffix[r],
                    recompute_all_s=suffix[0], restore_all_s=_load(used, 0, k) + suffix[k])


def _overlap_at(front: list[float], used: list, s: int, r: int) -> float:
    """max(compute [0, s), load [s, r)) for one (s, r): `_overlap` of the pure-Python path."""
    out = front[s]
    for cnt, latency, per_block, ramp in used:
        blocks = cnt[r] - cnt[s]
        if blocks > 0:
            out = max(out, latency + per_block * (ramp.effective_blocks(blocks) if ramp else blocks))
    return out


def _overlap(front: np.ndarray, used: list, s: np.ndarray, r: np.ndarray) -> np.ndarray:
    """max(compute [0, s), load [s, r)) for arrays of (s, r)."""
    out = front[s].copy()
    for cnt, latency, per_block, ramp in used:
        blocks = cnt[r] - cnt[s]
        np.maximum(out, np.where(blocks > 0, latency + per_block * _effective(ramp, blocks), 0.0), out=out)
    return out


def _effective(ramp: PathCost | None, blocks: np.ndarray) -> np.ndarray:
    """`PathCost.effective_blocks` of an array of block counts (the counts themselves without a ramp)."""
    if ramp is None:
        return blocks
    r = ramp.ramp_blocks
    return np.where(blocks < r, r * (np.maximum(blocks, 1) / r) ** ramp.ramp_exponent, blocks)


def _smallest_split(front: np.ndarray, used: list, r: int, best: float) -> int:
    """The smallest s <= r with max(compute [0, s), load [s, r)) == best: among equal plans, compute least.

    Load [s, r) falls as s grows, so per link the first s whose load fits in `best` is a `searchsorted`.
    """
    limit = best * (1 + 1e-12) + 1e-15
    s = 0
    for cnt, latency, per_block, ramp in used:
        blocks = cnt[r] - cnt[0]
        if blocks and latency + per_block * (ramp.effective_blocks(blocks) if ramp else blocks) > limit:
            # blocks this link may carry within the limit
            fits = 0
            if per_block > 0:
                within = (limit - latency) / per_block
                fits = max(0, math.floor(ramp.blocks_within(within) if ramp else within))
            s = max(s, bisect_left(cnt, cnt[r] - fits))
    if front[s] > limit:  # rounding: fall back to the crossing itself
        s = bisect_right(front, limit) - 1
    return min(s, r)


def _load(used: list, s: int, r: int) -> float:
    """Predicted load of blocks [s, r): the slowest link."""
    load = 0.0
    for cnt, latency, per_block, ramp in used:
        blocks = int(cnt[r] - cnt[s])
        if blocks:
            load = max(load, latency + per_block * (ramp.effective_blocks(blocks) if ramp else blocks))
    return load


def _as_code_list(tiers: Sequence[TierName | str] | np.ndarray) -> list[int]:
    """The tier codes as a list of ints (the pure-Python path's input), checked as `_as_codes` does."""
    if isinstance(tiers, np.ndarray):
        if tiers.ndim == 1 and tiers.dtype.kind in "iu":  # a few codes: checked in Python, not by numpy reductions
            codes = tiers.tolist()
            if all(0 <= c <= 3 for c in codes):
                return codes
        return _as_codes(tiers).tolist()  # raises the ConfigError naming the problem
    try:
        return [_CODES[t] for t in tiers]
    except (KeyError, TypeError):
        return _as_codes(tiers).tolist()  # raises the ConfigError naming the bad tier


def _as_codes(tiers: Sequence[TierName | str] | np.ndarray) -> np.ndarray:
    if isinstance(tiers, np.ndarray):
        if tiers.ndim != 1 or tiers.dtype.kind not in "iu":
            raise ConfigError(f"tiers: expected a 1-D integer array of tier codes, got {tiers.dtype} "
                              f"with shape {tiers.shape}")
        if len(tiers) and (int(tiers.min()) < 0 or int(tiers.max()) > 3):
            raise ConfigError(f"tiers: codes must be 0 (gpu), 1 (host), 2 (disk) or 3 (remote), got values in "
                              f"[{int(tiers.min())}, {int(tiers.max())}]")
        return tiers
    try:
        return np.fromiter(map(_CODES.__getitem__, tiers), dtype=np.int8, count=len(tiers))
    except (KeyError, TypeError):
        bad = next((t for t in tiers if not isinstance(t, (str, int)) or t not in _CODES), tiers)
        raise ConfigError(f"tiers: {bad!r} is not a tier; expected 'gpu', 'host', 'disk' or 'remote'") from None
