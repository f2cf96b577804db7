"""The remote tier: KV blocks on a Redis / Valkey node or Redis Cluster shared by serving replicas.

Modules: `settings` (the URL: nodes, TLS, credentials), `nodes` (connections, hash-slot routing, health,
calls bounded in time), `wire` (pipelined GET / SET / EXISTS on one connection), `tier` (`RemoteTier`:
probe, load, save in the disk tier's value format), `stats` (counters, the guard of a load's destinations), `local` (redis-server processes on loopback for tests
and benchmarks). Needs the optional extra `kvtier[remote]` (redis-py with hiredis).
"""

from .settings import RemoteMode, RemoteSettings, parse_remote_url
from .stats import RemoteStats
from .tier import RemoteTier

__all__ = ["RemoteMode", "RemoteSettings", "RemoteStats", "RemoteTier", "parse_remote_url"]
