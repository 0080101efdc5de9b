"""Queue overflow (503 + Retry-After) and SIGTERM (drain, clean ends, exit 0), on a server of their own:
two running slots, one waiting slot, a 4-second drain."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.server.conftest import EmberServer

LONG = {"model": "smollm2", "prompt": "Count to a thousand:", "max_tokens": 1000, "temperature": 0, "ignore_eos": True, "stream": True}
SHORT = {**LONG, "max_tokens": 6}


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    ember = EmberServer("--max-num-seqs", "2", "--max-queued-requests", "1", "--drain-timeout", "4",
                        log_path=str(tmp_path_factory.mktemp("lifecycle") / "ember.log"))
    yield ember
    ember.stop()


class StreamReader(threading.Thread):
    """Reads one SSE response in the background, keeping every `data:` payload, until it ends or `stop` is set."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.events: list = []
        self.first_token = threading.Event()
        self.stop = threading.Event()
        self.error: Exception | None = None
        self.start()

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=self.body, timeout=60) as response:
                self.status_code = response.status_code
                for line in response.iter_lines():
                    if self.stop.is_set():
                        break  # closes the connection: the server aborts the request
                    if line.startswith("data: "):
                        payload = line[len("data: "):]
                        self.events.append(payload if payload == "[DONE]" else json.loads(payload))
                        if self.events[-1] != "[DONE]" and self.events[-1].get("choices"):
                            self.first_token.set()
        except Exception as exc:  # a cut connection: what the SIGTERM test must never see
            self.error = exc
        self.first_token.set()

    @property
    def ended_cleanly(self) -> bool:
        """Completed with a finish reason, or ended with an error event; either way then [DONE]."""
        if self.error is not None or len(self.events) < 2 or self.events[-1] != "[DONE]":
            return False
        last = self.events[-2]
        return "error" in last or last["choices"][0]["finish_reason"] is not None

    @property
    def completed(self) -> bool:
        return self.ended_cleanly and "error" not in self.events[-2]



def test_queue_overflow_gets_503(small_server):
    url = small_server.url
    running = [StreamReader(url, LONG), StreamReader(url, LONG)]
    assert all(r.first_token.wait(30) for r in running)
    waiting = StreamReader(url, LONG)
    small_server.wait_until(lambda: small_server.metric("ember:num_requests_waiting") == 1)
    refused = httpx.post(url + "/v1/completions", json={**LONG, "stream": False}, timeout=30)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["type"] == "server_overloaded"
    for reader in running + [waiting]:
        reader.stop.set()
    small_server.wait_until(lambda: small_server.metric("ember:num_requests_running") == 0 and small_server.metric("ember:num_requests_waiting") == 0)
    assert waiting.status_code == 200  # accepted into the queue, never dropped; it ended when its client left
    ok = httpx.post(url + "/v1/completions", json={**SHORT, "stream": False}, timeout=60)
    assert ok.status_code == 200


def test_sigterm_drains_and_exits_zero(small_server):
    """Runs last: a short stream completes, a long one ends with an error event at the drain timeout."""
    short, long = StreamReader(small_server.url, SHORT), StreamReader(small_server.url, LONG)
    assert short.first_token.wait(30) and long.first_token.wait(30)
    small_server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    try:
        late = httpx.post(small_server.url + "/v1/completions", json={**SHORT, "stream": False}, timeout=10)
        assert late.status_code == 503
    except httpx.TransportError:
        pass  # the listening socket is already closed: also "not accepting"
    assert small_server.process.wait(timeout=30) == 0, small_server.log()
    short.join(5)
    long.join(5)
    assert short.completed, short.events[-3:]
    assert long.ended_cleanly and not long.completed, long.events[-3:]
    assert "shut down" in long.events[-2]["error"]["message"]
