"""A real `python -m ember serve` process on a free port, shared by the server tests (loading costs seconds)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

MODEL_NAME = "smollm2"
# Batch-invariant mode: the tests compare concurrent requests with the same request sent alone.
SMALL = ["--max-model-len", "2048", "--kv-cache-memory-gib", "0.25", "--batch-invariant"]


class EmberServer:
    scheme = "http"
    verify = True  # httpx's `verify` for the health checks (an SSL context for a server with a test certificate)

    def __init__(self, *args: str, log_path: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        command = [sys.executable, "-m", "ember", "serve", "--port", str(self.port), "--served-model-name", MODEL_NAME, *SMALL, *args]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._wait_healthy(timeout=180)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ember serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1, verify=self.verify).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"ember serve did not become healthy in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path) as f:
            return f.read()[-5000:]

    def metric(self, name: str) -> float:
        """The value of one unlabelled-by-reason sample in /metrics (summed over its label sets)."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        total, found = 0.0, False
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        if not found:
            raise KeyError(name)
        return total

    def wait_until(self, predicate, timeout: float = 20.0) -> None:
        """Polls `predicate` (e.g. on `metric`) until it holds; fails the test after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture(scope="package")
def server(tmp_path_factory):
    """The shared server: default settings, the embedded model served as `smollm2`."""
    ember = EmberServer(log_path=str(tmp_path_factory.mktemp("server") / "ember.log"))
    yield ember
    ember.stop()


@pytest.fixture(scope="package")
def base_url(server) -> str:
    return server.url
