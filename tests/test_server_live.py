"""A real `dsserve` process on the tiny model, driven by the official `openai` client:
what an editor plugin or a service would see, faults included.

Each server binds 127.0.0.1 on a free port; every wait has a deadline, every process
started here is stopped (SIGTERM, then SIGKILL) whatever happens.
"""
from __future__ import annotations

import json
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
# a test's time limit covers its module server's start-up (fixture setup) too
pytestmark = pytest.mark.timeout(START_S + 2 * REQUEST_S)


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

    def metrics(self) -> dict[str, float]:
        """/metrics as sample name (with labels) -> value."""
        from prometheus_client.parser import text_string_to_metric_families
        out = {}
        for family in text_string_to_metric_families(self.get("/metrics").text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        return out

    def wait_metrics(self, check, deadline_s: float = REQUEST_S) -> dict[str, float]:
        """Poll /metrics until `check(samples)` holds (a counter or gauge reached its
        value: the event waited for); the deadline only bounds a failure."""
        deadline = time.monotonic() + deadline_s
        while True:
            samples = self.metrics()
            if check(samples):
                return samples
            assert time.monotonic() < deadline, f"/metrics never satisfied the check: {samples}"
            time.sleep(0.05)  # the poll interval of a probe, not a synchronisation

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


def test_out_of_vocabulary_token_ids_get_a_400(live):
    """The real engine's vocabulary (32256 rows): an id past it is the client's error."""
    client = live.client()
    for bad in (32256, 10**9):
        with pytest.raises(openai.BadRequestError, match=f"token id {bad} is outside the "
                                                         "vocabulary") as e:
            client.completions.create(model=MODEL, prompt=[1, bad], **greedy(2))
        assert e.value.status_code == 400
    # the last row is in the vocabulary: accepted
    ok = client.completions.create(model=MODEL, prompt=[1, 32255], **greedy(2))
    assert ok.usage.completion_tokens == 2 and ok.usage.prompt_tokens == 2


# ---- limits on the real engine: one slot, one queued request -----------------------------
LONG = 480  # tokens: seconds of decoding for the tiny model, so a slot stays taken


class Stream:
    """A streamed completion read on its own thread; events say how far it got."""

    def __init__(self, server: Dsserve, prompt: str, max_tokens: int = LONG,
                 stop_after: Optional[int] = None):
        self.stop_after = stop_after  # events read before hanging up (a client gone)
        self.first, self.done = threading.Event(), threading.Event()
        self.hang_up = threading.Event()  # set: the client leaves at its next event
        self.tokens, self.events, self.error, self.error_event = 0, 0, None, None
        self.http = httpx.Client(base_url=server.url, timeout=REQUEST_S)
        self._request = dict(model=MODEL, prompt=prompt, max_tokens=max_tokens, stream=True,
                             temperature=0, ignore_eos=True)
        self.status: Optional[int] = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            with self.http.stream("POST", "/v1/completions", json=self._request) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[len("data: "):])
                    if "error" in event:
                        self.error_event = event["error"]
                    for choice in event.get("choices", []):
                        self.tokens += len(choice.get("token_ids") or [])
                    self.first.set()
                    self.events += 1
                    if self.events == self.stop_after or self.hang_up.is_set():
                        break  # leaving the block closes the connection mid-body
        except httpx.HTTPError as e:
            self.error = e
        finally:
            self.first.set()
            self.done.set()

    def close(self) -> None:
        """Hang up (if still reading) and wait for the reader to end."""
        self.hang_up.set()
        self.thread.join(REQUEST_S)
        self.http.close()


@pytest.fixture(scope="module")
def narrow(export_tiny):
    """dsserve with one slot and a queue of one."""
    server = Dsserve(export_tiny(1), "--max-batch", "1", "--max-queue", "1")
    yield server
    assert server.stop() == 0, "".join(server.lines[-30:])


def test_full_queue_gets_429_with_retry_after(narrow):
    for attempt in range(3):
        holder = Stream(narrow, "while True:")  # takes the one slot
        assert holder.first.wait(REQUEST_S) and holder.status == 200
        queued = Stream(narrow, "x =", max_tokens=2)  # waits for it
        narrow.wait_metrics(lambda m: m["dsflow_queue_depth"] == 1)
        r = httpx.post(narrow.url + "/v1/completions", timeout=REQUEST_S,
                       json={"model": MODEL, "prompt": "y =", "max_tokens": 2})
        still_holding = not holder.done.is_set()
        holder.close()  # hangs up: the queued request gets the slot
        assert queued.done.wait(REQUEST_S)
        queued.close()
        if r.status_code != 429 and not still_holding:
            continue  # the holder ended before the third request came: not the case
        assert r.status_code == 429, r.text
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "queue_full"
        assert holder.tokens < LONG and holder.error is None
        assert (queued.status, queued.tokens, queued.error) == (200, 2, None)
        samples = narrow.metrics()
        assert samples['dsflow_requests_total{route="/v1/completions",status="429"}'] >= 1
        return
    pytest.fail("the slot holder never outlived the queue filling up (3 attempts)")


def test_disconnecting_mid_stream_frees_the_slot(narrow):
    before = narrow.wait_metrics(lambda m: m["dsflow_running_sequences"] == 0
                                 and m["dsflow_queue_depth"] == 0)
    holder = Stream(narrow, "for i in range(", stop_after=3)  # then hangs up
    assert holder.done.wait(REQUEST_S) and holder.status == 200 and holder.events == 3
    assert holder.error is None
    # the slot is free again long before the 480 tokens could have been generated: the
    # sequence was cancelled, which the token counter shows
    after = narrow.wait_metrics(lambda m: m["dsflow_running_sequences"] == 0)
    generated = after["dsflow_generation_tokens_total"] - before["dsflow_generation_tokens_total"]
    assert 1 <= generated < LONG, generated
    r = narrow.client().completions.create(model=MODEL, prompt="z =", **greedy(3))
    assert r.usage.completion_tokens == 3  # and the one slot serves the next request
    final = narrow.metrics()
    assert final["dsflow_generation_tokens_total"] - after["dsflow_generation_tokens_total"] == 3


@pytest.fixture(scope="module")
def hasty(export_tiny):
    """dsserve whose requests may take 0.5 s: the tiny model needs over 1 ms a token
    (3-20 ms measured here), so LONG tokens take well over that on any machine."""
    server = Dsserve(export_tiny(1), "--request-timeout", "0.5", "--max-batch", "1")
    yield server
    assert server.stop() == 0, "".join(server.lines[-30:])


def test_request_timeout_cancels_and_frees_the_slot(hasty):
    before = hasty.metrics()
    r = httpx.post(hasty.url + "/v1/completions", timeout=REQUEST_S,
                   json={"model": MODEL, "prompt": "while True:", "max_tokens": LONG,
                         "temperature": 0, "ignore_eos": True})
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "request_timeout"
    after = hasty.wait_metrics(lambda m: m["dsflow_running_sequences"] == 0)
    generated = after["dsflow_generation_tokens_total"] - before["dsflow_generation_tokens_total"]
    assert generated < LONG  # cancelled, not run to the end
    # a stream that outlives it ends with an error event, not a truncated success
    stream = Stream(hasty, "for x in")
    stream.thread.join(REQUEST_S)
    assert stream.status == 200 and stream.tokens < LONG
    assert stream.error_event and stream.error_event["code"] == "request_timeout"
    hasty.wait_metrics(lambda m: m["dsflow_running_sequences"] == 0)
    assert hasty.client().completions.create(model=MODEL, prompt="a", **greedy(2)) \
        .usage.completion_tokens == 2
    stream.close()


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
        # events, not windows: the restart counter, then /health back to ok (the 503
        # window in between may be shorter than any poll interval)
        server.wait_metrics(lambda m: m["dsflow_engine_restarts_total"] == 1, START_S)
        r = server.wait_health(ok=True, deadline_s=START_S)
        assert r.json()["status"] == "ok"
        new = server.ranks()
        assert sorted(new) == [0, 1] and not any(alive(p) for p in old.values())
        assert not set(new.values()) & set(old.values())
        out = client.completions.create(model=MODEL, prompt="y =", **greedy(4))
        assert out.usage.completion_tokens == 4
        assert server.metrics()["dsflow_engine_restarts_total"] == 1
        # a rank that dies while nothing runs: the server notices without a request
        # (its supervisor polls the engine), restarts, and says why in its log
        os.kill(new[0], signal.SIGKILL)
        server.wait_metrics(lambda m: m["dsflow_engine_restarts_total"] == 2, START_S)
        server.wait_health(ok=True, deadline_s=START_S)
        failures = [line for line in server.lines if "engine failed (" in line]
        assert len(failures) == 2 and all("rank" in line for line in failures), failures
        assert sorted(server.ranks()) == [0, 1] and not alive(new[0])
    finally:
        assert server.stop() == 0, "".join(server.lines[-30:])


def test_supervisor_gives_up_with_exit_3(export_tiny):
    """--max-restarts 0: the first engine failure is the last; dsserve exits 3 (for its
    own supervisor, systemd or Kubernetes, to restart) and leaves no worker behind."""
    server = Dsserve(export_tiny(1), "--max-restarts", "0")
    try:
        workers = server.ranks()
        assert sorted(workers) == [0]
        os.kill(workers[0], signal.SIGKILL)
        assert server.proc.wait(REQUEST_S) == 3, "".join(server.lines[-30:])
        assert any("exiting with code 3" in line for line in server.lines), server.lines
        assert not any(alive(p) for p in workers.values())
    finally:
        server.stop()


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

