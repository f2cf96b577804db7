"""`Plan`: the restore-vs-recompute decision for one request, as the planner made it.

The matched blocks [0, k) and their tiers (as runs), the split s and the restore end r: recompute blocks
[0, s) while loading [s, r) in parallel, then compute tokens [r x block_tokens, n) (the cached blocks
[r, k) recomputed with the uncached suffix), with the predicted seconds of each part and of the
alternatives. `explain()` says why, in ms. Frozen; no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvtier.tiers.errors import ConfigError
from kvtier.tiers.tier import TierName

#: tier of each tier code (TierName.rank): gpu 0, host 1, disk 2
TIERS = (TierName.GPU, TierName.HOST, TierName.DISK, TierName.REMOTE)


@dataclass(frozen=True, slots=True)
class Plan:
    """How one request's prompt is made ready: restored, recomputed, computed.

    Attributes:
        num_tokens: the prompt's tokens n.
        block_tokens: tokens per block.
        num_matched_blocks: k, the cached prefix blocks the plan may use (see `num_found_blocks`).
        num_found_blocks: cached prefix blocks found (k, or one more when the whole prompt was cached).
        tier_codes: the matched blocks' tiers, one byte per block (`TierName.rank`: 0 gpu, 1 host, 2 disk);
            `tiers` and `tier_runs` give them as names.
        split: s; blocks [0, s) are recomputed while [s, restore_stop) load.
        restore_stop: r; blocks [s, r) are restored, blocks [r, k) recomputed with the suffix.
        restored_by_tier: (tier, blocks) restored from each tier, fastest tier first.
        disk_path: the restore path of the disk tier ("disk" or "disk_zstd").
        front_compute_s: predicted compute of [0, s).
        load_s: predicted load of [s, r).
        suffix_compute_s: predicted compute of tokens [r x block_tokens, n).
        total_s: max(front_compute_s, load_s) + suffix_compute_s.
        recompute_all_s: predicted time restoring nothing.
        restore_all_s: predicted time restoring every matched block (s = 0, r = k).
    """

    num_tokens: int
    block_tokens: int
    num_matched_blocks: int
    num_found_blocks: int
    tier_codes: bytes
    split: int
    restore_stop: int
    restored_by_tier: tuple[tuple[TierName, int], ...]
    disk_path: str
    front_compute_s: float
    load_s: float
    suffix_compute_s: float
    total_s: float
    recompute_all_s: float
    restore_all_s: float

    @property
    def tiers(self) -> tuple[TierName, ...]:
        """The tier of each matched block, in order."""
        return tuple(TIERS[c] for c in self.tier_codes)

    @property
    def tier_runs(self) -> tuple[tuple[TierName, int, int], ...]:
        """The matched blocks' tiers as runs (tier, first block, stop block), covering [0, k)."""
        codes = self.tier_codes
        if not codes:
            return ()
        array = np.frombuffer(codes, dtype=np.int8)
        bounds = [0, *(np.flatnonzero(array[1:] != array[:-1]) + 1).tolist(), len(codes)]
        return tuple((TIERS[codes[a]], a, b) for a, b in zip(bounds, bounds[1:]))

    @property
    def restored_blocks(self) -> range:
        """Indices of the blocks restored from a tier."""
        return range(self.split, self.restore_stop)

    @property
    def whole_block_stop(self) -> int:
        """Where a load stops for an engine that loads the prompt's last full block whole (its last token
        recomputed on top, as vLLM's connector does) when the plan restores every block before it."""
        return self.num_found_blocks if self.restore_stop == self.num_matched_blocks else self.restore_stop

    @property
    def num_restored_blocks(self) -> int:
        """Blocks restored."""
        return self.restore_stop - self.split

    @property
    def recomputed_blocks(self) -> tuple[range, range]:
        """The cached blocks recomputed: the front [0, s) and the back [r, k)."""
        return range(0, self.split), range(self.restore_stop, self.num_matched_blocks)

    @property
    def num_computed_tokens(self) -> int:
        """Tokens the engine computes: the front plus everything from r on."""
        return self.split * self.block_tokens + self.num_tokens - self.restore_stop * self.block_tokens

    @property
    def saved_s(self) -> float:
        """Predicted seconds saved against recomputing the whole prompt."""
        return self.recompute_all_s - self.total_s

    def tier_of(self, block: int) -> TierName:
        """The tier matched block `block` is restored from.

        Raises:
            ConfigError: the block is not in [0, k).
        """
        if isinstance(block, (int, np.integer)) and 0 <= block < self.num_matched_blocks:
            return TIERS[self.tier_codes[block]]
        raise ConfigError(f"block: {block!r} is not a matched block; expected 0..{self.num_matched_blocks - 1}")

    def explain(self) -> str:
        """A paragraph saying what the plan does and why, with the predicted times in ms."""
        bt, k, s, r = self.block_tokens, self.num_matched_blocks, self.split, self.restore_stop
        all_runs = self.tier_runs
        runs = ", ".join(f"[{a}, {b}) in {t.value}" for t, a, b in all_runs[:6]) or "none"
        if len(all_runs) > 6:
            runs += f", ... ({len(all_runs)} runs of tiers in all)"
        parts = [f"Request of {self.num_tokens} tokens, {k} cached blocks of {bt} tokens matched ({runs})"]
        if self.num_found_blocks > k:
            parts[-1] += "; the last block is computed anyway, for the last token's logits"
        parts[-1] += "."
        if r == 0:
            parts.append(f"Plan: recompute all {self.num_tokens} tokens ({_ms(self.total_s)}), since restoring "
                         f"would take longer: restoring every matched block then computing the rest is "
                         f"predicted at {_ms(self.restore_all_s)}." if k else
                         f"Plan: compute all {self.num_tokens} tokens ({_ms(self.total_s)}): nothing is cached.")
            return " ".join(parts)
        src = ", ".join(f"{n} from {t.value}" for t, n in self.restored_by_tier)
        load = f"loading blocks [{s}, {r}) ({src}{'; disk via ' + self.disk_path if self.disk_path != 'disk' else ''}) " \
               f"in {_ms(self.load_s)}"
        if s:
            parts.append(f"Plan: recompute blocks [0, {s}) ({s * bt} tokens, {_ms(self.front_compute_s)}) while "
                         f"{load}: the front is cheapest to recompute and overlapping it shortens the load.")
        else:
            parts.append(f"Plan: {load[0].upper()}{load[1:]}.")
        tail = f"then compute tokens [{r * bt}, {self.num_tokens}) in {_ms(self.suffix_compute_s)}"
        if r < k:
            tail += (f", recomputing cached blocks [{r}, {k}) there because restoring them "
                     f"({self.tier_of(r).value}) costs more than computing them")
        parts.append(tail[0].upper() + tail[1:] + ".")
        parts.append(f"Predicted total {_ms(self.total_s)}, against {_ms(self.recompute_all_s)} recomputing "
                     f"everything and {_ms(self.restore_all_s)} restoring every matched block.")
        return " ".join(parts)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 0.01 else f"{seconds * 1e3:.1f} ms"
