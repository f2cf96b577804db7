"""`kvtier bench remote`: the remote tier's restore and save bandwidth against the client's own limit,
and the probe latency of a 2k-token prefix.

On a local 3-master Redis Cluster started for the run (or `--url`), with SmolLM2-135M's 64-token blocks:
- `remote_read_ratio`: `RemoteTier.get_many` of n blocks into host blocks (checked: header, checksum) vs
  pipelined GETs of the same values with the same client (redis-py, the same connection pools, one
  pipeline per node, nodes in parallel) copied into preallocated memory; time of the limit / time of
  the tier, median of interleaved repeats (tier, limit, tier, limit, ...) with min-max;
- `remote_write_ratio`: `RemoteTier.save_many` (header, checksum, acknowledged on reply) vs pipelined SETs of
  values of the same size with the same client;
- `probe_ms_2k`: `RemoteTier.probe` of a 2k-token prefix (32 keys), median over repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

PROBE_TOKENS = 2048


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per figure (default 5)")
    parser.add_argument("--blocks", type=int, default=64, help="blocks moved per measurement (default 64)")
    parser.add_argument("--url", default=None, help="an existing remote (default: a 3-master cluster on "
                        "loopback started for the run, which needs redis-server)")
    parser.add_argument("--model", default="smollm2-135m", help="preset whose block geometry is moved")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from kvtier.scheduler.bench import common as bu
    from kvtier.tiers.keys import KeyChain
    from kvtier.tiers.remote import RemoteTier
    from kvtier.tiers.remote.local import LocalRedis
    from kvtier.tiers.spec import KVSpec

    if args.quick:
        args.repeats, args.blocks = min(args.repeats, 3), min(args.blocks, 16)
    spec = KVSpec.from_preset(args.model, block_tokens=64, weights_revision="bench-remote")
    cluster = None if args.url else LocalRedis(3).start()
    try:
        url = args.url or cluster.url
        tier = RemoteTier(spec, url, timeout_s=10.0)
        try:
            results = _measure(tier, spec, args, np, torch, KeyChain)
        finally:
            tier.close()
    finally:
        if cluster is not None:
            cluster.stop()
    results.update(machine=bu.machine(), loadavg=os.getloadavg(), remote=url if args.url else "local 3-master cluster",
                   model=args.model, block_bytes=spec.bytes_per_block, blocks=args.blocks, repeats=args.repeats)
    bu.print_table(results["rows"], ["path", "ratio", "ratio_min", "ratio_max", "path_ms", "limit_ms", "path_gbps",
                                     "limit"], "kvtier bench remote: tier vs the same client's pipelined GET/SET "
                                               "(ratio = limit time / tier time)")
    print(f"\nprobe of a {PROBE_TOKENS}-token prefix: median {results['probe_ms_2k']} ms "
          f"(min {results['probe_ms_2k_min']}, max {results['probe_ms_2k_max']})")
    print(f"machine: {results['machine']}  loadavg: {results['loadavg']}")
    bu.write_json(args.json, results)
    return 0


def _measure(tier: Any, spec: Any, args: argparse.Namespace, np: Any, torch: Any, KeyChain: Any) -> dict[str, Any]:
    from kvtier.scheduler.bench import common as bu
    from kvtier.tiers.codecs import Codec
    from kvtier.tiers.disk.format import HEADER_BYTES, checksum, encode_header

    n, bpb = args.blocks, spec.bytes_per_block
    rng = np.random.default_rng(0)
    keys = KeyChain.for_spec(spec).keys(rng.integers(0, 49152, n * spec.block_tokens))
    blocks = [torch.from_numpy(rng.integers(0, 256, bpb, dtype=np.uint8)) for _ in range(n)]
    outs = [torch.empty(bpb, dtype=torch.uint8) for _ in range(n)]
    limit_outs = [np.empty(HEADER_BYTES + bpb, dtype=np.uint8) for _ in range(n)]
    names = [tier.redis_key(k) for k in keys]
    # the limit writes and reads the very values the tier does (same keys, same bytes, same nodes)
    values = [encode_header(spec.fingerprint_bytes, k, Codec.NONE, bpb, bpb, checksum(b.numpy())) + b.numpy().tobytes()
              for k, b in zip(keys, blocks)]
    raw_names, (raw_groups, nowhere) = names, tier.nodes.route(names)
    if nowhere:
        raise SystemExit("kvtier bench remote: some keys have no reachable node")
    import redis

    def raw_set() -> None:
        def on_node(node: Any, idx: list[int]) -> None:
            pipe = redis.Redis(connection_pool=node.pool).pipeline(transaction=False)
            for i in idx:
                pipe.set(raw_names[i], values[i])
            pipe.execute()
        _raise_any(tier.nodes.run(raw_groups, on_node, time.monotonic() + 600))

    def raw_get() -> None:
        def on_node(node: Any, idx: list[int]) -> None:
            pipe = redis.Redis(connection_pool=node.pool).pipeline(transaction=False)
            for i in idx:
                pipe.get(raw_names[i])
            for i, value in zip(idx, pipe.execute()):
                limit_outs[i][:] = np.frombuffer(value, dtype=np.uint8)
        _raise_any(tier.nodes.run(raw_groups, on_node, time.monotonic() + 600))

    def tier_set() -> None:
        failed = tier.save_many(keys, blocks)
        if failed:
            raise SystemExit(f"kvtier bench remote: {len(failed)} saves failed")

    def tier_get() -> None:
        if not all(tier.get_many(keys, outs)):
            raise SystemExit("kvtier bench remote: a load missed")

    write = bu.interleave({"tier": tier_set, "limit": raw_set}, args.repeats)
    read = bu.interleave({"tier": tier_get, "limit": raw_get}, args.repeats)
    if not all(torch.equal(o, b) for o, b in zip(outs, blocks)):
        raise SystemExit("kvtier bench remote: restored blocks differ from the saved ones")
    rows = []
    for path, times, limit in (("remote save", write, "pipelined SET, same client"),
                               ("remote restore", read, "pipelined GET into preallocated memory, same client")):
        r = bu.ratio(times["limit"], times["tier"])
        rows.append({"path": path, **r.as_dict(), "path_gbps": round(n * bpb / r.path_s / 1e9, 3),
                     "limit_gbps": round(n * bpb / r.limit_s / 1e9, 3), "limit": limit})
    probe_keys = keys[:PROBE_TOKENS // spec.block_tokens] if n * spec.block_tokens >= PROBE_TOKENS else keys
    probes = []
    for _ in range(max(20, 10 * args.repeats)):
        start = time.perf_counter()
        found = tier.probe(probe_keys)
        probes.append((time.perf_counter() - start) * 1e3)
        if found != len(probe_keys):
            raise SystemExit("kvtier bench remote: the probe missed saved blocks")
    return {"rows": rows, "remote_write_ratio": rows[0]["ratio"], "remote_read_ratio": rows[1]["ratio"],
            "remote_write_ratio_min": rows[0]["ratio_min"], "remote_write_ratio_max": rows[0]["ratio_max"],
            "remote_read_ratio_min": rows[1]["ratio_min"], "remote_read_ratio_max": rows[1]["ratio_max"],
            "probe_ms_2k": round(statistics.median(probes), 3), "probe_ms_2k_min": round(min(probes), 3),
            "probe_ms_2k_max": round(max(probes), 3), "probe_keys": len(probe_keys)}


def _raise_any(results: dict[Any, Any]) -> None:
    for node, result in results.items():
        if isinstance(result, BaseException):
            raise SystemExit(f"kvtier bench remote: node {node.name} failed: {result}")
