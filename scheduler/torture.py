"""Crash-consistency torture of the disk tier: kill a real writer process with SIGKILL, again and again.

Each cycle starts a writer process that saves blocks through `DiskTier.put_async` and prints one
`ack <key>` line per block after the transaction holding it has committed (docs/design.md: acknowledged
means durable). Once the writer has acknowledged at least one block, it is killed with SIGKILL at a
random moment during its saves. The store is then reopened, and:
- every acknowledged block must read back byte-exact (else `acknowledged_blocks_lost`);
- every block the store serves must have exactly the content its key was written with (else
  `wrong_blocks_served`); a block that fails its checks is a miss (counted), never data;
- the store must open without repair (else `reopen_failures`).
A block's content is derived from its key, so the checker knows what each served block must hold.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from kvtier.tiers.spec import KVSpec

#: a small geometry whose blocks span several LMDB pages (overflow values), as real KV blocks do
SPEC = KVSpec(model_id="kvtier/torture", num_layers=4, num_kv_heads=2, head_dim=64, dtype="float16",
              block_tokens=32, weights_revision="torture-1")


def block_key(cycle: int, n: int) -> bytes:
    """The key of the n-th block written in a cycle."""
    return cycle.to_bytes(8, "little") + n.to_bytes(8, "little")


def block_content(key: bytes) -> np.ndarray:
    """The bytes a block with this key was written with."""
    return np.random.default_rng(int.from_bytes(key, "little")).integers(0, 256, SPEC.bytes_per_block, dtype=np.uint8)


@dataclass
class TortureResult:
    """The figures of a torture run (the `--json` keys)."""

    kills: int = 0
    acknowledged_blocks: int = 0
    acknowledged_blocks_lost: int = 0
    wrong_blocks_served: int = 0
    reopen_failures: int = 0
    blocks_checked: int = 0
    corrupt_detected: int = 0
    cycles_without_ack: int = 0
    corruptions_injected: int = 0
    corruptions_detected: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


def writer_main(path: str, cycle: int, seed: int) -> None:
    """The writer process: saves batches of blocks forever, acknowledging each committed block on stdout."""
    import torch

    from kvtier.tiers.disk.store import DiskTier

    rng = random.Random(seed)
    disk = DiskTier(path, SPEC, 1 << 34, batch_max_blocks=rng.choice([1, 4, 16]))
    out = sys.stdout

    def ack(keys: list[bytes]) -> None:
        out.write("".join(f"ack {k.hex()}\n" for k in keys))
        out.flush()

    n = 0
    while True:
        batch = rng.randint(1, 8)
        keys = [block_key(cycle, n + i) for i in range(batch)]
        blocks = [torch.from_numpy(block_content(k)) for k in keys]
        disk.put_async(keys, blocks, on_commit=ack)
        n += batch
        if rng.random() < 0.3:
            disk.flush(60)


def run_torture(kills: int, store: Path, seed: int = 0, max_wait_s: float = 0.3,
                progress: Callable[[int, TortureResult], None] | None = None) -> TortureResult:
    """Runs `kills` kill cycles against the store at `store` (created if missing)."""
    from kvtier.tiers.disk.store import DiskTier

    rng = random.Random(seed)
    result = TortureResult()
    acked: set[bytes] = set()
    start = time.monotonic()
    for cycle in range(kills):
        cmd = [sys.executable, "-c", f"from kvtier.scheduler.torture import writer_main; "
                                     f"writer_main({str(store)!r}, {cycle + 1}, {rng.randrange(1 << 30)})"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
        got = _read_acks(proc, until_first=True, timeout_s=120)
        # then a random moment during the saves
        got += _read_acks(proc, until_first=False, timeout_s=rng.uniform(0, max_wait_s))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        got += _drain(proc)
        proc.stdout.close()
        if not got:
            result.cycles_without_ack += 1
            result.failures.append(f"cycle {cycle + 1}: the writer acknowledged nothing before the kill")
        acked.update(got)
        result.kills += 1
        _check(store, acked, result, DiskTier)
        if progress:
            progress(cycle + 1, result)
    result.acknowledged_blocks = len(acked)
    result.seconds = round(time.monotonic() - start, 2)
    return result


def _read_acks(proc: subprocess.Popen, until_first: bool, timeout_s: float) -> list[bytes]:
    """Reads `ack` lines until the first one (until_first) or for `timeout_s` seconds."""
    keys: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    buf = b""
    fd = proc.stdout.fileno()
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or (until_first and keys):
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        keys += [bytes.fromhex(line[4:].decode()) for line in lines if line.startswith(b"ack ")]
    if buf:  # a partial line: put it back by reading the rest later (acks are whole lines)
        proc._kvtier_partial = buf  # type: ignore[attr-defined]
    return keys


def _drain(proc: subprocess.Popen) -> list[bytes]:
    data = getattr(proc, "_kvtier_partial", b"") + proc.stdout.read()
    return [bytes.fromhex(line[4:].decode()) for line in data.split(b"\n") if line.startswith(b"ack ") and len(line) == 36]


def _check(store: Path, acked: set[bytes], result: TortureResult, disk_cls) -> None:
    import torch

    try:
        disk = disk_cls(store, SPEC, 1 << 34)
    except Exception as err:  # the store must reopen without repair
        result.reopen_failures += 1
        result.failures.append(f"reopen failed: {err!r}")
        return
    try:
        listed = set(disk.keys())
        out = torch.empty(SPEC.bytes_per_block, dtype=torch.uint8)
        before = disk.stats().corrupt if callable(getattr(disk, "stats", None)) else 0
        for key in listed | acked:
            got = disk.get(key, out)
            result.blocks_checked += 1
            if got is None:
                if key in acked:
                    result.acknowledged_blocks_lost += 1
                    result.failures.append(f"acknowledged block {key.hex()} lost")
                continue
            if not np.array_equal(out.numpy(), block_content(key)):
                result.wrong_blocks_served += 1
                result.failures.append(f"block {key.hex()} served with wrong content")
        after = disk.stats().corrupt if callable(getattr(disk, "stats", None)) else 0
        result.corrupt_detected += after - before
    finally:
        disk.close()


#: ways a stored value is damaged in place (as a bad disk, a bug or a stray writer would)
DAMAGES = ("flip-payload", "flip-header", "truncate", "swap-values", "zero-page")


def corrupt_store(store: Path, num: int, result: TortureResult, seed: int = 0) -> None:
    """Damages `num` stored values in place, then reads every block back: each damaged value must be a
    miss (detected), never data; every other block must still read back exactly."""
    import lmdb
    import torch

    from kvtier.tiers.disk.store import DiskTier
    from kvtier.tiers.disk.env import BLOCKS_DB

    rng = random.Random(seed)
    env = lmdb.open(str(store), max_dbs=8, map_size=max(2 * os.path.getsize(store / "data.mdb"), 1 << 30))
    try:
        db = env.open_db(BLOCKS_DB, create=False)
        with env.begin(write=True, db=db) as txn:
            items = [(bytes(k), bytes(v)) for k, v in txn.cursor()]
            chosen = rng.sample(range(len(items)), min(num, len(items)))
            damaged: set[bytes] = set()
            for n, i in enumerate(chosen):
                key, value = items[i]
                value = bytearray(value)
                how = DAMAGES[n % len(DAMAGES)]
                if how == "flip-payload":
                    value[rng.randrange(64, len(value))] ^= 1 << rng.randrange(8)
                elif how == "flip-header":
                    value[rng.randrange(0, 64)] ^= 1 << rng.randrange(8)
                elif how == "truncate":
                    value = value[:rng.randrange(1, len(value))]
                elif how == "swap-values":  # another block's intact value under this key
                    value = bytearray(items[(i + 1) % len(items)][1])
                else:
                    start = rng.randrange(64, len(value) - 4096)
                    value[start:start + 4096] = bytes(4096)
                if bytes(value) != items[i][1]:
                    txn.put(key, bytes(value))
                    damaged.add(key[16:])
    finally:
        env.close()
    result.corruptions_injected += len(damaged)
    disk = DiskTier(store, SPEC, 1 << 34)
    try:
        out = torch.empty(SPEC.bytes_per_block, dtype=torch.uint8)
        for key in disk.keys():
            got = disk.get(key, out)
            if got is None:
                result.corruptions_detected += key in damaged
                if key not in damaged:
                    result.failures.append(f"intact block {key.hex()} lost after the corruption pass")
            elif not np.array_equal(out.numpy(), block_content(key)):
                result.wrong_blocks_served += 1
                result.failures.append(f"damaged block {key.hex()} served as data")
    finally:
        disk.close()


def result_json(result: TortureResult) -> dict:
    data = asdict(result)
    data["failures"] = data["failures"][:20]
    return data


if __name__ == "__main__":  # python -m kvtier.scheduler.torture STORE KILLS
    print(json.dumps(result_json(run_torture(int(sys.argv[2]), Path(sys.argv[1]))), indent=2))
