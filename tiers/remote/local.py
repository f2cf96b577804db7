"""Local Redis servers for tests and benchmarks: one node, or a cluster of masters, on 127.0.0.1.

Primitives:
- `LocalRedis(num_masters=0, password=None, maxmemory=None)`: `start()` launches `redis-server` processes
  on free loopback ports in a temporary directory (0 masters: one plain node; 3 or more: a cluster made
  with `redis-cli --cluster create`), `url` names them (`redis://` or `redis+cluster://`), `kill(i)`
  SIGKILLs node i, `restart(i)` starts it again on the same port (a cluster node rejoins from its
  nodes.conf), `stop()` ends every process and removes the directory. A context manager.
- `redis_server_path()`: the `redis-server` binary, or a `RemoteError` saying how to install it.

Invariants: every wait is on an event set by the line the server prints ("Ready to accept connections",
"Cluster state changed: ok") with a deadline, never a sleep loop; every process is ended by `stop()`
(also after a failed start); the servers keep no data on disk (a cache: no RDB, no AOF).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

from ..errors import RemoteError

log = logging.getLogger(__name__)

#: how long a start, a cluster creation or a restart may take
START_TIMEOUT_S = 30.0


def redis_server_path() -> str:
    """The `redis-server` binary.

    Raises:
        RemoteError: none on PATH (install: `apt-get install redis-server`).
    """
    path = shutil.which("redis-server")
    if path is None:
        raise RemoteError("redis-server not found on PATH; install it (Debian/Ubuntu: apt-get install redis-server)")
    return path


def _free_port(cluster: bool) -> int:
    """A free loopback port (and, for a cluster node, its bus port + 10000 free too)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not cluster:
            return port
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    continue
    raise RemoteError("no free loopback port pair for a cluster node")


class _Server:
    """One redis-server process and the events its output sets."""

    def __init__(self, conf: Path, port: int, failover_won: threading.Event | None = None) -> None:
        self.conf, self.port = conf, port
        self.proc: subprocess.Popen | None = None
        self.ready = threading.Event()
        self.cluster_ok = threading.Event()
        #: set when this node wins a failover election (shared by a cluster's nodes)
        self.failover_won = failover_won or threading.Event()
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        self.ready.clear()
        self.cluster_ok.clear()
        self.proc = subprocess.Popen([redis_server_path(), str(self.conf)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, args=(self.proc,), name=f"redis-{self.port}", daemon=True)
        self._reader.start()

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None, "started with a pipe"
        for line in proc.stdout:
            self.lines.append(line.rstrip())
            if "Ready to accept connections" in line:
                self.ready.set()
            elif "Cluster state changed: ok" in line:
                self.cluster_ok.set()
            elif "Failover election won" in line:
                self.failover_won.set()
        self.ready.set()  # the process ended: nobody waits in vain

    def wait(self, event: threading.Event, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
        if not event.wait(timeout_s) or self.proc is None or self.proc.poll() is not None:
            tail = "\n".join(self.lines[-8:])
            raise RemoteError(f"redis-server on port {self.port}: not {what} within {timeout_s} s:\n{tail}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.join()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.join()

    def join(self) -> None:
        if self.proc is not None:
            self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(10)  # ends at the pipe's end of file
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


def _make_certificates(where: Path) -> None:
    """A throw-away CA (ca.pem) and a server certificate for 127.0.0.1 signed by it (server.pem, server.key)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RemoteError("openssl not found on PATH (needed to make the TLS test certificates)")
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=kvtier-test-ca",
         "-keyout", "ca.key", "-out", "ca.pem"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr"],
    ]
    for step in steps:
        subprocess.run([openssl, *step], cwd=where, check=True, capture_output=True, timeout=60)
    (where / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    subprocess.run([openssl, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                    "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.pem"],
                   cwd=where, check=True, capture_output=True, timeout=60)


class LocalRedis:
    """Redis servers on loopback for tests and benchmarks (see the module docstring)."""

    def __init__(self, num_masters: int = 0, *, password: str | None = None, maxmemory: str | None = None,
                 node_timeout_ms: int = 2000, tls: bool = False, replicas: int = 0) -> None:
        if num_masters not in (0,) and num_masters < 3:
            raise RemoteError(f"num_masters: a Redis Cluster needs at least 3 masters, got {num_masters}")
        if tls and num_masters:
            raise RemoteError("tls: only a single node serves TLS here (num_masters=0)")
        self.tls = tls
        if replicas and not num_masters:
            raise RemoteError("replicas: only a cluster has replicas here (num_masters >= 3)")
        self.replicas = replicas
        #: set by the node that wins a failover election
        self.failover_won = threading.Event()
        self.num_masters = num_masters
        self.password = password
        self.maxmemory = maxmemory
        self.node_timeout_ms = node_timeout_ms
        self.dir: Path | None = None
        self.servers: list[_Server] = []

    @property
    def cluster(self) -> bool:
        return self.num_masters > 0

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    @property
    def url(self) -> str:
        """The URL of the node or cluster (with the password, if any; a TLS node's names its CA file)."""
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            assert self.dir is not None, "started"
            return f"rediss://{auth}127.0.0.1:{self.ports[0]}?ssl_ca_certs={self.dir / 'ca.pem'}"
        if self.cluster:
            return f"redis+cluster://{auth}" + ",".join(f"127.0.0.1:{p}" for p in self.ports)
        return f"redis://{auth}127.0.0.1:{self.ports[0]}"

    def _conf(self, port: int) -> Path:
        assert self.dir is not None, "started"
        node_dir = self.dir / str(port)
        node_dir.mkdir(exist_ok=True)
        lines = (["port 0", f"tls-port {port}", f"tls-cert-file {self.dir / 'server.pem'}",
                  f"tls-key-file {self.dir / 'server.key'}", f"tls-ca-cert-file {self.dir / 'ca.pem'}",
                  "tls-auth-clients no"] if self.tls else [f"port {port}"]) + ["bind 127.0.0.1", "protected-mode no", f"dir {node_dir}", 'save ""',
                 "appendonly no", "logfile \"\"", "loglevel notice", "daemonize no"]
        if self.password:
            lines += [f"requirepass {self.password}", f"masterauth {self.password}"]
        if self.maxmemory:
            lines += [f"maxmemory {self.maxmemory}", "maxmemory-policy allkeys-lru"]
        if self.cluster:
            lines += ["cluster-enabled yes", "cluster-config-file nodes.conf",
                      f"cluster-node-timeout {self.node_timeout_ms}", "cluster-require-full-coverage no",
                      "cluster-allow-reads-when-down yes"]
        path = node_dir / "redis.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self) -> "LocalRedis":
        """Starts the servers (and makes the cluster); on failure every process started is ended.

        Raises:
            RemoteError: redis-server missing, a server or the cluster not up within `START_TIMEOUT_S`.
        """
        redis_server_path()
        self.dir = Path(tempfile.mkdtemp(prefix="kvtier-redis-"))
        try:
            if self.tls:
                _make_certificates(self.dir)
            for _ in range(max(1, self.num_masters * (1 + self.replicas))):
                port = _free_port(self.cluster)
                server = _Server(self._conf(port), port, self.failover_won)
                self.servers.append(server)
                server.start()
            for server in self.servers:
                server.wait(server.ready, "ready")
            if self.cluster:
                self._create_cluster()
        except BaseException:
            self.stop()
            raise
        return self

    def _create_cluster(self) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RemoteError("redis-cli not found on PATH; install it (Debian/Ubuntu: apt-get install redis-tools)")
        cmd = [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports), "--cluster-replicas", str(self.replicas),
               "--cluster-yes"]
        env = dict(os.environ, REDISCLI_AUTH=self.password) if self.password else None
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=START_TIMEOUT_S, env=env)
        if done.returncode != 0 or "[OK] All 16384 slots covered" not in done.stdout:
            raise RemoteError(f"redis-cli --cluster create failed ({done.returncode}): "
                              f"{done.stdout[-800:]} {done.stderr[-400:]}")
        for server in self.servers:
            server.wait(server.cluster_ok, "in a healthy cluster")

    def wait_failover(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Waits until a replica has won a failover election (after its master was killed).

        Raises:
            RemoteError: none within `timeout_s`.
        """
        if not self.failover_won.wait(timeout_s):
            raise RemoteError(f"no replica took over within {timeout_s} s")

    def kill(self, i: int) -> None:
        """SIGKILLs node i (no shutdown, no save)."""
        self.servers[i].kill()

    def restart(self, i: int) -> None:
        """Starts node i again on its port; a cluster node rejoins from its nodes.conf (empty: no data kept)."""
        server = self.servers[i]
        server.start()
        server.wait(server.ready, "ready after restart")
        if self.cluster:
            server.wait(server.cluster_ok, "back in the cluster")

    def stop(self) -> None:
        """Ends every server and removes the directory (idempotent)."""
        for server in self.servers:
            try:
                server.stop()
            except (OSError, subprocess.SubprocessError) as err:
                log.warning("redis-server on port %d: %s", server.port, err)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> "LocalRedis":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
