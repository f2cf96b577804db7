"""An LMCache multiprocess server owned by a benchmark: started on free loopback ports, stopped after.

LMCache 0.5.6 (the `lmcache` extra) runs beside vLLM on a CPU-only host only in its multiprocess mode:
the server (`python -m lmcache.v1.multiprocess.http_server`) keeps L1 in DRAM and L2 on local disk (its
`fs_native` adapter: one file per 256-token chunk), and vLLM's `LMCacheMPConnector` talks to it over
ZMQ. On CPU the connector's worker copies KV itself (`engine_driven` transfer), through a POSIX shared
memory segment when the server names one (`--shm-name`), else by pickling each chunk over ZMQ; the
server here always names one (its fastest CPU path).

Primitives:
- `lmcache_available()`: whether the `lmcache` package is installed (found without importing it).
- `LMCacheServerConfig`: the L1 and L2 sizes, the chunk size, the L2 directory and the log file.
- `LMCacheServer`: `start()` (waits for the HTTP frontend, which comes up after the cache engine),
  `connector_fields()` (the `EngineConfig` fields of an engine that uses it), `clear_l1()`,
  `wait_stored()` (L2 writes finished), `make_l2_cold()` (L1 emptied, every L2 file evicted from the page
  cache, residency returned), `close()`.

Invariants:
- The server is this process's child; its stdout and stderr go, merged, to `config.log_path` (a reader
  thread tees them and notices readiness); `close()` stops it (SIGTERM, then SIGKILL after a timeout),
  joins the thread and removes the shared memory segment if the server left it.
- `make_l2_cold()` refuses (StoreError) while the server holds an L2 file open or mapped: a mapped page
  cannot be evicted, and the figure would not be cold.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtier.tiers.coldcache import evict_file, resident_bytes
from kvtier.tiers.errors import ClosedError, ConfigError, StoreError

log = logging.getLogger(__name__)

GIB = 1 << 30
#: LMCache's chunk, in tokens (its default; the issue's setting): a 2,048-token prompt is 8 chunks
CHUNK_TOKENS = 256
SERVER_MODULE = "lmcache.v1.multiprocess.http_server"
#: vLLM's name for the multiprocess connector (vLLM resolves it to LMCache's own class when installed)
CONNECTOR_CLASS = "LMCacheMPConnector"
#: a line the server prints once its HTTP frontend listens (after the cache engine is up)
_READY_MARK = "Uvicorn running on"
#: seconds a connector waits for the server before failing (LMCache's default is 300)
MQ_TIMEOUT_S = 60.0


def lmcache_available() -> bool:
    """Whether the optional `lmcache` package is installed (the `lmcache` extra)."""
    return importlib.util.find_spec("lmcache") is not None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class LMCacheServerConfig:
    """How to start one LMCache server.

    Attributes:
        l2_dir: the `fs_native` L2 directory (created).
        log_path: where the server's output goes (kept with the results).
        l1_bytes: L1 (DRAM) capacity; whole GiB are not required.
        l2_bytes: L2 (disk) capacity, enforced by LMCache's LRU L2 eviction.
        chunk_tokens: LMCache's chunk size.
        python: the interpreter that runs the server (this one: the extra installs beside kvtier).
        start_timeout_s: how long `start()` waits for the server.
    """

    l2_dir: Path
    log_path: Path
    l1_bytes: int = GIB
    l2_bytes: int = 4 * GIB
    chunk_tokens: int = CHUNK_TOKENS
    python: str = sys.executable
    start_timeout_s: float = 180.0

    def __post_init__(self) -> None:
        if self.l1_bytes <= 0 or self.l2_bytes <= 0:
            raise ConfigError(f"LMCache sizes: l1_bytes={self.l1_bytes}, l2_bytes={self.l2_bytes}; both must be "
                              f"positive")
        if self.chunk_tokens < 16:
            raise ConfigError(f"chunk_tokens: {self.chunk_tokens} is too small; expected at least 16")

    def argv(self, port: int, http_port: int, shm_name: str) -> list[str]:
        """The server's command line."""
        l2 = {"type": "fs_native", "base_path": str(self.l2_dir), "max_capacity_gb": self.l2_bytes / GIB,
              "eviction": {"eviction_policy": "LRU"}}
        return [self.python, "-m", SERVER_MODULE, "--host", "127.0.0.1", "--port", str(port),
                "--http-host", "127.0.0.1", "--http-port", str(http_port), "--chunk-size", str(self.chunk_tokens),
                "--l1-size-gb", repr(self.l1_bytes / GIB), "--eviction-policy", "LRU",
                "--supported-transfer-mode", "engine_driven", "--shm-name", shm_name,
                "--l2-adapter", json.dumps(l2)]


class LMCacheServer:
    """One LMCache multiprocess server process (a context manager)."""

    def __init__(self, config: LMCacheServerConfig) -> None:
        self.config = config
        self.port: int | None = None
        self.http_port: int | None = None
        self.shm_name = f"kvtier-lmcache-{os.getpid()}-{id(self) & 0xFFFF:x}"
        self.startup_s: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()
        self._serving = False

    def start(self) -> LMCacheServer:
        """Starts the server and waits until it serves; returns self.

        Raises:
            ConfigError: lmcache is not installed, or the server exited or did not come up in time
                (the message names the log file).
        """
        if self._proc is not None:
            return self
        if not lmcache_available():
            raise ConfigError("lmcache is not installed; install the extra: pip install 'kvtier[lmcache]'")
        cfg = self.config
        cfg.l2_dir.mkdir(parents=True, exist_ok=True)
        cfg.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.port, self.http_port = free_port(), free_port()
        env = dict(os.environ, LMCACHE_TRACK_USAGE="false", PYTHONUNBUFFERED="1")
        began = time.perf_counter()
        self._proc = subprocess.Popen(cfg.argv(self.port, self.http_port, self.shm_name), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self._reader = threading.Thread(target=self._tee, name="lmcache-server-log", daemon=True)
        self._reader.start()
        if not self._ready.wait(cfg.start_timeout_s) or not self._serving:
            self.close()
            raise ConfigError(f"LMCache server did not start within {cfg.start_timeout_s:.0f} s; see "
                              f"{cfg.log_path}")
        self.startup_s = time.perf_counter() - began
        log.info("LMCache server on 127.0.0.1:%d (http %d) in %.1f s", self.port, self.http_port, self.startup_s)
        return self

    def _tee(self) -> None:
        """Copies the server's output to the log file; marks readiness (ends when the server closes it)."""
        assert self._proc is not None and self._proc.stdout is not None, "started by start()"
        with open(self.config.log_path, "ab") as out:
            for line in self._proc.stdout:
                out.write(line)
                out.flush()
                if not self._serving and _READY_MARK.encode() in line:
                    self._serving = True
                    self._ready.set()
        self._ready.set()  # the server is gone: wake start()

    def connector_fields(self) -> dict[str, Any]:
        """`EngineConfig` fields of a vLLM engine that uses this server through `LMCacheMPConnector`."""
        self._check_started()
        return {"kv_connector": CONNECTOR_CLASS, "kv_connector_module_path": None,
                "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": self.port,
                                              "lmcache.mp.mq_timeout": MQ_TIMEOUT_S}}

    def _check_started(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            raise ClosedError(f"LMCache server is not running (see {self.config.log_path})")

    def _http(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        self._check_started()
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def status(self) -> dict[str, Any]:
        """The server's `/status` document (L1 objects, store and prefetch controllers, L2 adapters)."""
        return dict(self._http("GET", "/status"))

    def clear_l1(self) -> int:
        """Empties L1 (DRAM); returns the objects L1 still holds after (0 unless some were locked)."""
        self._http("POST", "/cache/clear", {"tier": "l1", "force": False})
        return int(self.status()["storage_manager"]["l1_manager"]["total_object_count"])

    def l2_files(self) -> list[Path]:
        """The L2 chunk files now on disk."""
        return sorted(p for p in self.config.l2_dir.rglob("*") if p.is_file())

    def wait_stored(self, timeout_s: float = 120.0) -> int:
        """Waits until the server has no L2 write pending or in flight; returns the L2 file count.

        Raises:
            StoreError: writes still pending after `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            controllers = self.status()["storage_manager"]["store_controllers"].values()
            busy = sum(int(c["pending_keys_count"]) + int(c["in_flight_task_count"]) for c in controllers)
            if busy == 0:
                return len(self.l2_files())
            if time.monotonic() > deadline:
                raise StoreError(f"LMCache: {busy} L2 writes still pending after {timeout_s:.0f} s")
            time.sleep(0.05)  # the server offers no completion event for its background L2 writes

    def held_l2_files(self) -> list[str]:
        """L2 files the server process has open or mapped now (from /proc)."""
        self._check_started()
        assert self._proc is not None, "checked above"
        root = str(self.config.l2_dir.resolve())
        held: set[str] = set()
        fd_dir = Path(f"/proc/{self._proc.pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue  # closed meanwhile
            if target.startswith(root):
                held.add(target)
        for line in Path(f"/proc/{self._proc.pid}/maps").read_text().splitlines():
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith(root):
                held.add(parts[5])
        return sorted(held)

    def make_l2_cold(self) -> int:
        """Empties L1 and evicts every L2 file from the page cache; returns the L2 bytes still resident.

        Raises:
            StoreError: L1 kept objects, or the server holds an L2 file open or mapped.
        """
        self.wait_stored()
        left = self.clear_l1()
        if left:
            raise StoreError(f"LMCache: {left} objects stayed in L1 after /cache/clear (locked)")
        held = self.held_l2_files()
        if held:
            raise StoreError(f"LMCache server holds {len(held)} L2 files open or mapped (e.g. {held[0]}); "
                             f"their pages cannot be evicted")
        for path in self.l2_files():
            evict_file(path)
        return sum(resident_bytes(p) for p in self.l2_files())

    def close(self) -> None:
        """Stops the server (SIGTERM, SIGKILL after 30 s) and its log thread; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    log.warning("LMCache server %d ignored SIGTERM for 30 s; killing it", proc.pid)
                    proc.kill()
                    proc.wait(timeout=30)
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.join(timeout=30)
        shm = Path("/dev/shm") / self.shm_name
        if shm.exists():
            shm.unlink()

    def __enter__(self) -> LMCacheServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
