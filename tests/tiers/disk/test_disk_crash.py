"""A writer process killed with SIGKILL mid-save leaves a store that reopens with every acknowledged block.

A small version of `kvtier torture`: each cycle starts a real writer process that saves blocks with
`put_async` and prints each key after its transaction committed (`on_commit`); the parent kills it with
SIGKILL after a random number of acknowledgements, reopens the store and checks every acknowledged block
byte for byte, and that no stored block reads back with other content.
"""

from __future__ import annotations

import os
import random
import selectors
import signal
import subprocess
import sys
import textwrap

import numpy as np
import torch

from kvtier.tiers.disk.store import DiskTier
from kvtier.tiers.spec import KVSpec

SPEC = KVSpec(model_id="test", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", block_tokens=16,
              weights_revision="random-0")
CAPACITY = 4096 * SPEC.bytes_per_block

_WRITER = textwrap.dedent("""
    import sys, numpy as np, torch
    from kvtier.tiers.disk.store import DiskTier
    from kvtier.tiers.spec import KVSpec
    spec = KVSpec(model_id="test", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", block_tokens=16,
                  weights_revision="random-0")
    path, first = sys.argv[1], int(sys.argv[2])
    tier = DiskTier(path, spec, 4096 * spec.bytes_per_block, batch_max_blocks=4)

    def on_commit(keys):
        sys.stdout.write("".join(k.hex() + "\\n" for k in keys))
        sys.stdout.flush()

    print("ready", flush=True)
    i, in_flight = first, []
    while True:  # until killed; a few saves always queued or committing
        if len(in_flight) >= 4:
            in_flight.pop(0).wait(60)
        keys = [(i + j).to_bytes(16, "little") for j in range(3)]
        blocks = [torch.from_numpy(np.random.default_rng(i + j).integers(0, 256, spec.bytes_per_block,
                                                                          dtype=np.uint8)) for j in range(3)]
        in_flight.append(tier.put_async(keys, blocks, on_commit=on_commit))
        i += 3
""")


def expected(k: bytes) -> torch.Tensor:
    i = int.from_bytes(k, "little")
    return torch.from_numpy(np.random.default_rng(i).integers(0, 256, SPEC.bytes_per_block, dtype=np.uint8))


def run_and_kill(path: str, first: int, kill_after: int) -> list[bytes]:
    """Starts a writer, kills it after `kill_after` acknowledged blocks; returns the acknowledged keys."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, path, str(first)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    acked: list[bytes] = []
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    try:
        while len(acked) < kill_after:
            if not sel.select(timeout=120):
                raise AssertionError(f"writer acknowledged {len(acked)} blocks in 120 s; stderr: "
                                     f"{proc.stderr.read1(4000)!r}")
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"writer exited early: {proc.wait(30)}; {proc.stderr.read()[-2000:]!r}")
            buf += chunk
            *lines, buf = buf.split(b"\n")
            acked += [bytes.fromhex(line.decode()) for line in lines if line and line != b"ready"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        # acknowledgements printed before the kill landed count too
        rest = buf + proc.stdout.read()
        acked += [bytes.fromhex(line.decode()) for line in rest.split(b"\n") if line and line != b"ready"]
    finally:
        sel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return acked


def test_sigkill_mid_writes_loses_no_acknowledged_block(tmp_path):
    path = str(tmp_path / "store")
    rng = random.Random(7)
    acknowledged: set[bytes] = set()
    for cycle in range(3):
        # kill at a random moment: after 1 to 30 acknowledged blocks, while saves are queued and in flight
        acked = run_and_kill(path, first=cycle * 1_000_000, kill_after=rng.randint(1, 30))
        assert acked, "every cycle acknowledges at least one block before its kill"
        acknowledged |= set(acked)
        with DiskTier(path, SPEC, CAPACITY) as tier:  # reopens without repair
            stored = set(tier.keys())
            assert acknowledged <= stored, f"lost {len(acknowledged - stored)} acknowledged blocks"
            out = torch.empty(SPEC.bytes_per_block, dtype=torch.uint8)
            for k in stored:  # every stored block, acknowledged or not, is either right or a miss
                got = tier.get(k, out)
                if k in acknowledged:
                    assert got is not None
                if got is not None:
                    assert torch.equal(out, expected(k)), f"wrong bytes for block {k.hex()}"
            assert tier.stats().corrupt == 0 and tier.num_used == len(stored)
