"""The measuring rigs of `kvtier calibrate`: real tier restores and a real prefill, one timed call each.

Primitives:
- `RestoreRig(spec, max_blocks, disk_dir)`: a `HostTier`, a `Transferer` and a `BlockKVBuffer` (the engine's
  KV), plus a disk store holding `max_blocks` blocks. Each method returns the mean of `repeat` runs, each
  timed alone (setup between them untimed):
  - `host(n, repeat)`: seconds of `Transferer.load` of n host blocks (shuffled slots: one copy per block,
    as in a long-running cache; bytes not in a CPU cache) into the buffer, in layer groups, until the
    handle completes;
  - `disk(n, repeat)`: seconds of `Transferer.move(disk -> host)` of n blocks with a truly cold page cache
    (docs/design.md "Cold page cache"): every DiskTier on the store closed, `evict_file`, `resident_bytes == 0`
    checked, the store reopened and the read-ahead of its opening dropped again (residency checked: only the
    pages LMDB maps itself stay), all untimed; then the read is timed until the handle completes.
- `RecomputeRig(config, threads)`: a transformers causal LM built from the config with random weights,
  float32 on CPU; `run(start, n, repeat)` builds a KV cache already holding `start` tokens (not timed), then times
  the prefill of n more tokens (last-token logits only, as an engine computes them).

Invariants:
- setup (allocation, cache building, eviction, reopening) is never inside the timer;
- a restore that misses a block, or a disk read that is not cold, raises instead of reporting a time;
- every thread and store the rigs open is closed by `close()` (the rigs are context managers).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
import time
from typing import Any, Mapping

import torch

from kvtier.tiers.coldcache import evict_file, resident_bytes
from kvtier.tiers.disk.store import DiskTier
from kvtier.tiers.errors import ConfigError, StoreError
from kvtier.tiers.pool import HostTier
from kvtier.tiers.spec import KVSpec
from kvtier.tiers.tier import TierName
from kvtier.tiers.kvbuffer import BlockKVBuffer
from kvtier.tiers.transfer import Transferer

log = logging.getLogger(__name__)

#: longest wait for one timed transfer
TRANSFER_TIMEOUT_S = 120.0

#: page-cache bytes an open store may keep: the meta and root pages LMDB maps (64 KiB measured here)
MAPPED_SLACK_BYTES = 256 << 10

#: evictions tried before a disk sample is given up as not cold
EVICT_ATTEMPTS = 20

#: scratch rewritten before each restore sample: larger than this machine's last-level cache
CACHE_FLUSH_BYTES = 64 << 20


def _drop_unmapped(path: str) -> None:
    """posix_fadvise(DONTNEED) over the whole file: drops its cached pages that no process has mapped."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class RestoreRig:
    """Host and cold-disk restores of up to `max_blocks` blocks of `spec` (see the module docstring).

    Host restores read from a pool of 2 x `max_blocks` blocks in a shuffled order and write into an engine
    buffer of as many blocks, each timed restore starting where the previous one stopped, and the CPU caches
    are flushed (a scratch buffer rewritten) before each sample: every restore moves bytes that are not in
    a CPU cache, as a real restore of blocks saved long ago does.

    Args:
        spec: the KV geometry (the model's, at its block size).
        max_blocks: the largest restore measured.
        disk_dir: where the disk store goes (a temporary directory inside it, removed on close); None:
            no disk measurements.
        num_groups: layer groups of a host load (as an engine loads).
        seed: shuffles the source slots and fills the blocks.
    """

    def __init__(self, spec: KVSpec, max_blocks: int, disk_dir: str | os.PathLike[str] | None, *,
                 num_groups: int = 4, seed: int = 0) -> None:
        if not isinstance(max_blocks, int) or max_blocks < 1:
            raise ConfigError(f"max_blocks: expected a positive int, got {max_blocks!r}")
        self.spec = spec
        self.max_blocks = max_blocks
        self.num_groups = num_groups
        rng = random.Random(seed)
        self.ring = ring = 2 * max_blocks
        self.keys = [i.to_bytes(16, "little") for i in range(ring)]
        # host slots [0, ring) are the host copies, restored in `src_order`; [ring, ring + max) take disk reads
        self.host_tier = HostTier(spec, (ring + max_blocks) * spec.bytes_per_block)
        self.src_order = list(range(ring))
        rng.shuffle(self.src_order)
        self.disk_slots = [ring + s for s in range(max_blocks)]
        rng.shuffle(self.disk_slots)
        self.buffer = BlockKVBuffer(spec, ring)
        self._pos = 0
        gen = torch.Generator().manual_seed(seed)
        data = self.host_tier.pool.data
        data[:ring] = torch.randint(0, 256, (ring, spec.bytes_per_block), dtype=torch.uint8, generator=gen)
        data[ring:].zero_()  # touch every page once, outside any timer
        self._scratch = torch.zeros(CACHE_FLUSH_BYTES, dtype=torch.uint8)
        self.transferer = Transferer({TierName.HOST: self.host_tier})
        self._work: str | None = None
        self._disk_args: dict[str, Any] | None = None
        self.data_file = ""
        if disk_dir is not None:
            self._make_store(disk_dir)

    def _make_store(self, disk_dir: str | os.PathLike[str]) -> None:
        try:
            os.makedirs(disk_dir, exist_ok=True)
            self._work = tempfile.mkdtemp(prefix="kvtier-calibrate-", dir=disk_dir)
        except OSError as err:
            raise ConfigError(f"--disk-dir: cannot create a store under {os.fspath(disk_dir)!r}: {err}") from None
        nbytes = self.max_blocks * self.spec.bytes_per_block
        self._disk_args = dict(path=os.path.join(self._work, "store"), spec=self.spec, capacity_bytes=nbytes)
        with DiskTier(**self._disk_args) as tier:
            tier.put_many(self.keys[:self.max_blocks], [self.host_tier.pool.block(s) for s in range(self.max_blocks)])
            self.data_file = tier.data_file

    @property
    def has_disk(self) -> bool:
        """Whether disk restores can be measured."""
        return self._disk_args is not None

    def flush_caches(self) -> None:
        """Rewrites a scratch buffer larger than the CPU's last-level cache (untimed setup)."""
        self._scratch.add_(1)

    def host(self, num_blocks: int, repeat: int = 1) -> float:
        """Mean seconds of `repeat` loads of `num_blocks` host blocks into the engine buffer (layer groups,
        each timed until its handle completes; consecutive loads touch different memory)."""
        self._check(num_blocks)
        self.flush_caches()
        n, total = num_blocks, 0.0
        for _ in range(repeat):
            idx = [(self._pos + i) % self.ring for i in range(n)]
            self._pos = (self._pos + n) % self.ring
            keys = [self.keys[i] for i in idx]
            slots = [self.src_order[i] for i in idx]
            start = time.perf_counter()
            handle = self.transferer.load(keys, [TierName.HOST] * n, slots, self.buffer, idx,
                                          num_groups=self.num_groups)
            handle.wait(TRANSFER_TIMEOUT_S)
            total += time.perf_counter() - start
            if handle.failed:
                raise StoreError(f"host restore of {n} blocks: {len(handle.failed)} blocks failed")
        return total / repeat

    def disk(self, num_blocks: int, repeat: int = 1) -> float:
        """Mean seconds of `repeat` reads of `num_blocks` blocks from a cold disk store into host slots
        (each timed until its handle completes; the store evicted and reopened before each, untimed).

        Raises:
            StoreError: no disk store, pages still resident after eviction, or a block missed.
        """
        self._check(num_blocks)
        if self._disk_args is None:
            raise StoreError("disk restore: no disk store (pass a disk directory)")
        return sum(self._cold_read(num_blocks) for _ in range(repeat)) / repeat

    def _cold_read(self, n: int) -> float:
        # the previous read's asynchronous read-ahead may still be landing pages: evict until none stay
        for _ in range(EVICT_ATTEMPTS):
            evict_file(self.data_file)
            left = resident_bytes(self.data_file)
            if not left:
                break
        else:
            raise StoreError(f"{self.data_file}: {left} bytes still in the page cache after {EVICT_ATTEMPTS} "
                             f"evictions; the disk figure would not be cold")
        disk = DiskTier(**self._disk_args)
        transferer = Transferer({TierName.HOST: self.host_tier, TierName.DISK: disk})
        try:
            # opening reads the meta pages, and the kernel's read-ahead (8 MiB on this virtio disk) pulls in
            # the first blocks with them: drop every page LMDB has not mapped (mapped ones cannot go)
            for _ in range(EVICT_ATTEMPTS):
                _drop_unmapped(self.data_file)
                left = resident_bytes(self.data_file)
                if left <= MAPPED_SLACK_BYTES:
                    break
            else:
                raise StoreError(f"{self.data_file}: {left} bytes resident right after opening (more than the "
                                 f"{MAPPED_SLACK_BYTES} LMDB maps for its meta pages); not a cold read")
            start = time.perf_counter()
            handle = transferer.move(TierName.DISK, TierName.HOST, self.keys[:n], dst_slots=self.disk_slots[:n])
            handle.wait(TRANSFER_TIMEOUT_S)
            seconds = time.perf_counter() - start
        finally:
            transferer.close()
            disk.close()
        if handle.failed:
            raise StoreError(f"disk restore of {n} blocks: {len(handle.failed)} blocks missed")
        return seconds

    def verify(self) -> None:
        """Restores `max_blocks` blocks from each tier and checks every byte (untimed).

        Raises:
            StoreError: a restored block differs from its source.
        """
        self._pos = 0
        self.host(self.max_blocks)
        pool = self.host_tier.pool
        for i in range(self.max_blocks):
            if not torch.equal(self.buffer.data[i].reshape(-1).view(torch.uint8), pool.block(self.src_order[i])):
                raise StoreError(f"host restore delivered wrong bytes for block {i}")
        if self.has_disk:
            self.disk(self.max_blocks)
            for i in range(self.max_blocks):
                if not torch.equal(pool.block(self.disk_slots[i]), pool.block(i)):
                    raise StoreError(f"disk restore delivered wrong bytes for block {i}")

    def _check(self, num_blocks: int) -> None:
        if not isinstance(num_blocks, int) or not 1 <= num_blocks <= self.max_blocks:
            raise ConfigError(f"num_blocks: expected 1..{self.max_blocks}, got {num_blocks!r}")

    def close(self) -> None:
        """Joins the transfer workers and removes the disk store (idempotent)."""
        self.transferer.close()
        self.host_tier.close()
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None

    def __enter__(self) -> "RestoreRig":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RecomputeRig:
    """A real prefill of a transformers model built from a config (random weights, float32, CPU).

    Args:
        config: the HF style config dict (`model_type` names the architecture).
        threads: torch intra-op threads while measuring (restored on close).
        max_tokens: the largest start + n measured (the size of the random token ids and cached KV).
        seed: weights, token ids and cache contents.

    Raises:
        ConfigError: the config names no architecture transformers can build.
    """

    def __init__(self, config: Mapping[str, Any], threads: int = 2, max_tokens: int = 4096, seed: int = 0) -> None:
        import transformers

        cfg = dict(config)
        model_type = cfg.pop("model_type", None)
        if not model_type:
            raise ConfigError("model config: missing 'model_type', needed to build the model for recompute timing")
        for drop in ("_name_or_path", "torch_dtype", "dtype", "architectures", "transformers_version",
                     "quantization_config"):
            cfg.pop(drop, None)
        try:
            hf_config = transformers.AutoConfig.for_model(model_type, **cfg)
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"model config: transformers cannot build model_type {model_type!r}: {err}") from None
        hf_config._attn_implementation = "sdpa"
        self._threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        try:
            self.model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
        except (ValueError, KeyError, TypeError) as err:
            torch.set_num_threads(self._threads)
            raise ConfigError(f"model config: cannot build a causal LM of type {model_type!r}: {err}") from None
        self.config = hf_config
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        self.num_layers = int(text.num_hidden_layers)
        heads = int(text.num_attention_heads)
        self.kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        self.head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        gen = torch.Generator().manual_seed(seed)
        self.max_tokens = max_tokens
        self.ids = torch.randint(0, int(text.vocab_size), (1, max_tokens), generator=gen)
        # cached KV of the first max_tokens tokens: its values do not change the time, so random ones
        # stand in for a real prefill of the prefix (which would cost minutes at 2k tokens here)
        self.kv = [(torch.randn(1, self.kv_heads, max_tokens, self.head_dim, generator=gen) * 0.5,
                    torch.randn(1, self.kv_heads, max_tokens, self.head_dim, generator=gen) * 0.5)
                   for _ in range(self.num_layers)]

    def _cache(self, start: int) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        if start:
            for layer, (k, v) in enumerate(self.kv):
                cache.update(k[:, :, :start].clone(), v[:, :, :start].clone(), layer)
        return cache

    def run(self, start_tokens: int, num_tokens: int, repeat: int = 1) -> float:
        """Mean seconds of `repeat` prefills of tokens [start, start + n), each on top of a fresh cache
        of the first `start` tokens (built untimed)."""
        return sum(self._run(start_tokens, num_tokens) for _ in range(repeat)) / repeat

    def _run(self, start_tokens: int, num_tokens: int) -> float:
        if not (isinstance(start_tokens, int) and isinstance(num_tokens, int) and start_tokens >= 0
                and num_tokens >= 1 and start_tokens + num_tokens <= self.max_tokens):
            raise ConfigError(f"recompute point ({start_tokens!r}, {num_tokens!r}): expected start >= 0, n >= 1, "
                              f"start + n <= {self.max_tokens}")
        cache = self._cache(start_tokens)
        ids = self.ids[:, start_tokens:start_tokens + num_tokens]
        with torch.inference_mode():
            start = time.perf_counter()
            self.model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            seconds = time.perf_counter() - start
        if cache.get_seq_length() != start_tokens + num_tokens:
            raise RuntimeError(f"recompute: cache holds {cache.get_seq_length()} tokens after the prefill, "
                               f"expected {start_tokens + num_tokens}")
        return seconds

    def close(self) -> None:
        """Restores the thread count (the model is freed with the rig)."""
        torch.set_num_threads(self._threads)

    def __enter__(self) -> "RecomputeRig":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
