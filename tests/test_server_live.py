"""A real `dsserve` process on the tiny model, driven by the official `openai` client:
what an editor plugin or a service would see, faults included.

Each server binds 127.0.0.1 on a free port; every wait has a deadline, every process
started here is stopped (SIGTERM, then SIGKILL) whatever happens.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import httpx
import openai
import pytest

from dsflow.runtime import SamplingParams

START_S = 300.0     # worker start-up on 2 busy cores, tp=2 included
REQUEST_S = 120.0
MODEL = "tiny-coder"


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (the rank workers and the scheduler)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Dsserve:
    """`dsserve` as a subprocess; the URL comes from its start-up line."""

    def __init__(self, artifacts: Path, *args: str):
        cmd = [sys.executable, "-m", "dsflow.runtime.server.cli", "--artifacts", str(artifacts),
               "--port", "0", "--served-model-name", MODEL, *args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.url: Optional[str] = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(START_S) or self.url is None:
            self.stop()
            pytest.fail("dsserve did not start:\n" + "".join(self.lines[-30:]))

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if "serving" in line and "http://" in line:
                self.url = "http://" + line.split("http://", 1)[1].split()[0]
                self._ready.set()
        self._ready.set()  # exited before serving

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0,
                             timeout=REQUEST_S, **kw)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=REQUEST_S)

    def ranks(self) -> dict[int, int]:
        """rank -> pid of the worker processes."""
        out = {}
        for pid in children(self.proc.pid):
            args = cmdline(pid)
            if "dsflow.runtime.worker" in args and "--rank" in args:
                out[int(args[args.index("--rank") + 1])] = pid
        return out

    def wait_health(self, ok: bool, deadline_s: float) -> httpx.Response:
        """Poll /health until it is (non-)200; polling, with a deadline, is the test."""
        deadline = time.monotonic() + deadline_s
        while True:
            r = self.get("/health")
            if (r.status_code == 200) == ok:
                return r
            assert time.monotonic() < deadline, f"/health stayed {r.status_code}: {r.text}"
            time.sleep(0.2)  # the poll interval of a probe, not a synchronisation

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout)


@pytest.fixture(scope="module")
def live(export_tiny):
    server = Dsserve(export_tiny(1), "--shutdown-timeout", "120")
    yield server
    assert server.stop() == 0, "".join(server.lines[-30:])  # also when already stopped


def join_all(threads: list[threading.Thread], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "requests did not finish in time"


def greedy(max_tokens: int) -> dict:
    return {"max_tokens": max_tokens, "temperature": 0, "extra_body": {"ignore_eos": True}}


# ---- the OpenAI API, live ----------------------------------------------------------------
def test_models_and_completion_equal_the_engine(live, engine_for):
    client = live.client()
    assert [m.id for m in client.models.list()] == [MODEL]
    r = client.completions.create(model=MODEL, prompt="def add(a, b):", **greedy(8))
    expected = engine_for(1).generate("def add(a, b):", SamplingParams(max_new_tokens=8,
                                                                        ignore_eos=True))[0]
    assert r.choices[0].model_extra["token_ids"] == expected.token_ids
    assert r.choices[0].text == expected.text
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == 8 + len(
        expected.prompt_token_ids)


def test_chat_streamed_equals_not_streamed(live):
    client = live.client()
    messages = [{"role": "user", "content": "Write quick sort"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, **greedy(6))
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                 **greedy(6)))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert whole.usage.completion_tokens == 6


def test_n_and_logprobs(live):
    r = live.client().completions.create(model=MODEL, prompt="import os\n", n=2, logprobs=3,
                                         **greedy(5))
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == r.choices[1].text  # greedy samples agree
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 5 and all(len(t) == 3 for t in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)
    # the chosen token is the most likely one when greedy
    assert all(abs(max(t.values()) - v) < 1e-4 for t, v in zip(lp.top_logprobs,
                                                               lp.token_logprobs))


def test_fim_suffix_equals_the_engine(live, engine_for):
    r = live.client().completions.create(model=MODEL, prompt="def f(x):\n    ",
                                         suffix="\n    return y", **greedy(6))
    handle = engine_for(1).submit("def f(x):\n    ", SamplingParams(max_new_tokens=6,
                                                                     ignore_eos=True),
                                  suffix="\n    return y")
    assert r.choices[0].model_extra["token_ids"] == handle.result(REQUEST_S)[0].token_ids


def test_bad_requests(live):
    client = live.client()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", n=0)
    with pytest.raises(openai.BadRequestError, match="maximum|exceeds|fit"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1_000_000)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")


def test_32_concurrent_streams(live):
    results: dict[int, tuple] = {}

    def one(i: int) -> None:
        stream = live.client().completions.create(
            model=MODEL, prompt=f"# task {i}\ndef f{i}(", stream=True,
            stream_options={"include_usage": True}, **greedy(8 + i % 4))
        tokens, reasons, usage = 0, [], None
        for chunk in stream:
            for c in chunk.choices:
                tokens += len(c.model_extra["token_ids"])
                reasons.append(c.finish_reason)
            usage = chunk.usage or usage
        results[i] = (tokens, reasons[-1], usage.completion_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    join_all(threads, REQUEST_S * 2)
    assert sorted(results) == list(range(32))
    for i, (tokens, reason, usage) in results.items():
        assert (tokens, reason, usage) == (8 + i % 4, "length", 8 + i % 4)


def test_device_options_are_checked_like_dsrun(export_tiny):
    """--devices on CPU artifacts: refused before any worker starts, in one line."""
    r = subprocess.run([sys.executable, "-m", "dsflow.runtime.server.cli", "--artifacts",
                        str(export_tiny(1)), "--port", "0", "--devices", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["dsserve: error: --devices applies to --device "
                                             "ascend only"]


# ---- faults, live -----------------------------------------------------------------------
def test_rank_killed_under_load_then_recovery(export_tiny):
    server = Dsserve(export_tiny(2), "--restart-backoff", "0.5")
    try:
        client = server.client()
        old = server.ranks()
        assert sorted(old) == [0, 1]
        started = threading.Barrier(5, timeout=REQUEST_S)
        errors: list[BaseException] = []

        def load(i: int) -> None:
            stream = client.completions.create(model=MODEL, prompt=f"x{i} =", stream=True,
                                               **greedy(400))
            try:
                for n, _ in enumerate(stream):
                    if n == 0:
                        started.wait()
            except openai.APIError as e:
                errors.append(e)

        threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        started.wait()  # every request is streaming
        os.kill(old[1], signal.SIGKILL)
        join_all(threads, REQUEST_S)
        assert len(errors) == 4 and all("rank" in str(e) for e in errors), errors
        server.wait_health(ok=False, deadline_s=30)
        r = server.wait_health(ok=True, deadline_s=START_S)
        assert r.json()["status"] == "ok"
        new = server.ranks()
        assert sorted(new) == [0, 1] and not any(alive(p) for p in old.values())
        out = client.completions.create(model=MODEL, prompt="y =", **greedy(4))
        assert out.usage.completion_tokens == 4
        assert "dsflow_engine_restarts_total 1.0" in server.get("/metrics").text
        # a rank that dies while nothing runs: /health must notice without a request
        os.kill(new[0], signal.SIGKILL)
        assert "rank" in server.wait_health(ok=False, deadline_s=10).json()["detail"]
        server.wait_health(ok=True, deadline_s=START_S)
        assert "dsflow_engine_restarts_total 2.0" in server.get("/metrics").text
    finally:
        assert server.stop() == 0, "".join(server.lines[-30:])


def test_sigterm_finishes_in_flight_requests_then_exits_0(live):
    """Last in this file: it stops the module's server (saves a start-up)."""
    server = live
    try:
        client = server.client()
        workers = children(server.proc.pid)  # ranks (and a scheduler at tp > 1)
        assert workers
        started = threading.Barrier(4, timeout=REQUEST_S)
        counts: dict[int, int] = {}

        def one(i: int) -> None:
            tokens = 0
            for n, chunk in enumerate(client.completions.create(
                    model=MODEL, prompt=f"z{i} =", stream=True, **greedy(48))):
                tokens += sum(len(c.model_extra["token_ids"]) for c in chunk.choices)
                if n == 0:
                    started.wait()
            counts[i] = tokens

        threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        started.wait()
        server.proc.send_signal(signal.SIGTERM)
        join_all(threads, REQUEST_S)
        assert counts == {0: 48, 1: 48, 2: 48}
        assert server.proc.wait(REQUEST_S) == 0
        assert not any(alive(p) for p in workers), "a worker outlived dsserve"
    finally:
        server.stop()

