"""OffloadConfig: everything an OffloadManager needs, in one dataclass or a TOML file.

Capacities accept human sizes ("64GiB", "512MiB") or bytes; 0 turns a tier off. Unknown keys in a
TOML file or dict are an error naming the key (never silently dropped).
"""

from __future__ import annotations

import enum
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from kvtier.tiers.codecs import Codec
from kvtier.tiers.errors import ConfigError
from kvtier.tiers.tier import parse_size

from kvtier.scheduler.policies import ONLINE, policy_name


class WriteMode(str, enum.Enum):
    """How saved blocks reach the disk."""

    #: every block saved to a memory tier is also written to disk at once; victims are simply dropped
    WRITE_THROUGH = "write-through"
    #: blocks reach the disk only when evicted from host memory (demotion)
    WRITE_BACK = "write-back"


@dataclass(frozen=True, slots=True)
class OffloadConfig:
    """Capacities, paths and policies of one OffloadManager.

    Attributes:
        gpu_bytes: kvtier's own GPU pool (0: none, as under vLLM whose paged KV is the GPU tier).
        host_bytes: pinned host pool.
        disk_bytes: disk store capacity for this model (0: no disk tier).
        disk_path: directory of the LMDB store (needed when disk_bytes > 0).
        codec: disk codec: "none", "zstd" or "zstd-shuffle".
        disk_read_threads: reader threads of a large disk read (a restore cut into that many contiguous
            ranges of the store's file, read at once; 1: one sequential stream).
        disk_uncached_reads: those readers read around the page cache (O_DIRECT) when the bytes are not in it
            (less CPU per byte; see docs/disk-reads.md); False: always through the page cache.
        policy: eviction policy name for every tier (see `kvtier.scheduler.policies`).
        write_mode: "write-through" or "write-back".
        prefetch: whether queued requests' blocks are promoted (disk -> host) in the background.
        prefetch_window: how many queued requests ahead the prefetcher looks.
        prefetch_budget_bytes: bytes of promotions in flight at most (with `prefetch_inflight_blocks`).
        prefetch_inflight_blocks: promoted blocks in flight at most (the link-time budget: a running
            request's load waits behind at most the piece of a promotion being read, never its queue).
        prefetch_room_share: share of the host tier that queued requests' protected blocks may hold.
        prefetch_min_blocks: smallest promotion worth a move (unless it is the request's whole disk run).
        prefetch_gpu: also copy queued requests' host blocks into kvtier's own GPU pool while it has free
            slots (never evicting for it); needs `gpu_bytes` and `host_bytes` > 0 and `prefetch`.
        num_layer_groups: layer groups of a load at most (the engine waits for each in turn; the planner reads
            a disk load with little to compute after it whole, in one group).
        hardware: cost-model profile name or JSON path (None: this machine's calibrated profile if
            present, else a built-in default).
        salt: cache salt that keeps tenants apart (part of every key).
        load_timeout_s: longest wait on a load before the engine gives up and recomputes.
        remote_url: the remote tier shared by serving replicas, below the disk (None: none):
            `redis://host:port`, `rediss://...` (TLS), `redis+cluster://host:port[,host:port...]` or a
            comma-separated seed list; a password absent from the URL comes from `$KVTIER_REMOTE_PASSWORD`.
        remote_timeout_s: the longest a remote call waits on a silent node (a node that fails or overruns
            turns its blocks into misses).
        remote_bytes: what the decision half assumes the remote keeps for this model (its books of remote
            blocks); the server's maxmemory and LRU decide what it really keeps.
        remote_codec: codec of values written to the remote ("none", "zstd", "zstd-shuffle").
        remote_ttl_s: expiry of saved values in seconds (0: none, the server's LRU evicts).
    """

    gpu_bytes: int = 0
    host_bytes: int = 1 << 30
    disk_bytes: int = 0
    disk_path: str | None = None
    codec: str = "none"
    disk_read_threads: int = 4
    disk_uncached_reads: bool = True
    policy: str = "auto"
    write_mode: WriteMode = WriteMode.WRITE_THROUGH
    prefetch: bool = True
    prefetch_window: int = 16
    prefetch_budget_bytes: int = 1 << 30
    prefetch_inflight_blocks: int = 64
    prefetch_room_share: float = 0.5
    prefetch_min_blocks: int = 4
    prefetch_gpu: bool = False
    num_layer_groups: int = 4
    hardware: str | None = None
    salt: str = ""
    load_timeout_s: float = 30.0
    remote_url: str | None = None
    remote_timeout_s: float = 1.0
    remote_bytes: int = 64 << 30
    remote_codec: str = "none"
    remote_ttl_s: int = 0

    def __post_init__(self) -> None:
        for name in ("gpu_bytes", "host_bytes", "disk_bytes", "prefetch_budget_bytes", "remote_bytes"):
            object.__setattr__(self, name, parse_size(getattr(self, name), name))
        try:
            object.__setattr__(self, "write_mode", WriteMode(self.write_mode))
        except ValueError:
            raise ConfigError(f"write_mode: {self.write_mode!r}; expected 'write-through' or 'write-back'") from None
        try:
            Codec.parse(self.codec)
        except (KeyError, ValueError):
            raise ConfigError(f"codec: {self.codec!r}; expected one of none, zstd, zstd-shuffle") from None
        if policy_name(self.policy) not in ONLINE:  # an unknown name raises here, naming the policies
            raise ConfigError(f"policy: {self.policy!r} reads the future (replay only); a tier takes one of "
                              f"{', '.join(p.value for p in ONLINE)}")
        if self.disk_bytes and not self.disk_path:
            raise ConfigError("disk_path: required when disk_bytes > 0")
        if self.gpu_bytes == 0 and self.host_bytes == 0:
            raise ConfigError("host_bytes: at least one memory tier (gpu_bytes or host_bytes) must be > 0")
        if not isinstance(self.disk_read_threads, int) or self.disk_read_threads < 1:
            raise ConfigError(f"disk_read_threads: expected a positive int, got {self.disk_read_threads!r}")
        if not isinstance(self.disk_uncached_reads, bool):
            raise ConfigError(f"disk_uncached_reads: expected true or false, got {self.disk_uncached_reads!r}")
        if self.num_layer_groups < 1:
            raise ConfigError(f"num_layer_groups: expected >= 1, got {self.num_layer_groups}")
        if self.prefetch_window < 0:
            raise ConfigError(f"prefetch_window: expected >= 0, got {self.prefetch_window}")
        if self.prefetch_inflight_blocks < 1 or self.prefetch_min_blocks < 1:
            raise ConfigError(f"prefetch_inflight_blocks / prefetch_min_blocks: expected >= 1, got "
                              f"{self.prefetch_inflight_blocks} / {self.prefetch_min_blocks}")
        if not 0.0 <= self.prefetch_room_share <= 1.0:
            raise ConfigError(f"prefetch_room_share: expected 0 <= share <= 1, got {self.prefetch_room_share}")
        if self.prefetch_gpu and not (self.prefetch and self.gpu_bytes and self.host_bytes):
            raise ConfigError(f"prefetch_gpu: promotes host -> gpu, so it needs prefetch on and both gpu_bytes and "
                              f"host_bytes > 0; got prefetch={self.prefetch}, gpu_bytes={self.gpu_bytes}, "
                              f"host_bytes={self.host_bytes}")
        if self.load_timeout_s <= 0:
            raise ConfigError(f"load_timeout_s: expected > 0, got {self.load_timeout_s}")
        if self.remote_url is not None:
            from kvtier.tiers.remote.settings import parse_remote_url

            parse_remote_url(self.remote_url, self.remote_timeout_s, env={})  # a bad URL fails here, named
        if not isinstance(self.remote_timeout_s, (int, float)) or not self.remote_timeout_s > 0:
            raise ConfigError(f"remote_timeout_s: expected > 0, got {self.remote_timeout_s!r}")
        try:
            Codec.parse(self.remote_codec)
        except (KeyError, ValueError):
            raise ConfigError(f"remote_codec: {self.remote_codec!r}; expected one of none, zstd, zstd-shuffle") from None
        if not isinstance(self.remote_ttl_s, int) or self.remote_ttl_s < 0:
            raise ConfigError(f"remote_ttl_s: expected a non-negative int, got {self.remote_ttl_s!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "OffloadConfig":
        """Builds a config from a mapping; an unknown key is an error naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")
        return cls(**dict(data))

    @classmethod
    def from_toml(cls, path: str | Path) -> "OffloadConfig":
        """Reads a TOML file (top-level keys, or a [kvtier] table)."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"{path}: cannot read the config: {err}") from err
        return cls.from_dict(data.get("kvtier", data), str(path))

    def with_(self, **changes: Any) -> "OffloadConfig":
        """A copy with some fields changed."""
        return replace(self, **changes)
