"""The HTTP layer of dsserve against FakeEngine (tests/fakes/engine.py), which implements
the Engine contract in-process: OpenAI shapes (checked with the official client),
validation, limits, auth, disconnects, slow readers, faults and metrics, in seconds.

Every server here is real uvicorn on 127.0.0.1, run on a thread; every wait has a
deadline (DEADLINE_S), and nothing sleeps to synchronise.
"""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import httpx
import jinja2
import openai
import pytest

from conftest import TOKENIZER_DIR, require_shared
from fakes.engine import FakeEngine, fake_token
from dsflow.runtime import SamplingParams, WorkerError
from dsflow.runtime.server.openai_api import ServerOptions
from dsflow.runtime.server.cli import bind
from dsflow.runtime.server.lifecycle import DsserveServer, build_server
from dsflow.runtime.server.supervisor import RestartPolicy

DEADLINE_S = 20.0


@dataclass
class Served:
    url: str
    engine: FakeEngine
    server: DsserveServer
    thread: threading.Thread

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"),
                             max_retries=0, timeout=DEADLINE_S, **kw)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=DEADLINE_S)


@contextlib.contextmanager
def serving(engine: FakeEngine, policy: RestartPolicy = RestartPolicy(backoff_s=0.01,
                                                                       poll_s=0.02),
            shutdown_timeout: float = 5.0, sndbuf: int = 0, **options) -> Iterator[Served]:
    server = build_server(engine, ServerOptions(model_name=engine.model_name, **options),
                          policy, shutdown_timeout)
    sock = bind("127.0.0.1", 0)
    if sndbuf:  # inherited by accepted connections; fixes the kernel's send buffer
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert server.listening.wait(DEADLINE_S), "server did not start"
    try:
        yield Served(f"http://127.0.0.1:{sock.getsockname()[1]}", engine, server, thread)
    finally:
        server.should_exit = True
        thread.join(DEADLINE_S)
        assert not thread.is_alive(), "server did not stop"


def fake_engine(**kw) -> FakeEngine:
    require_shared()
    return FakeEngine(TOKENIZER_DIR, **kw)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    engine = fake_engine(max_seq_len=4096)
    with serving(engine, max_prompts=8) as s:
        yield s
    engine.close()


def expected_ids(engine: FakeEngine, prompt: str, count: int) -> list[int]:
    ids = engine.tokenizer.encode(prompt)
    return [fake_token(engine.words, ids, i) for i in range(count)]


def sse_events(body: str) -> list[str]:
    return [block[len("data: "):] for block in body.split("\n\n") if block.startswith("data: ")]


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# ---- OpenAI shapes, through the official client -------------------------------------------
def test_models_list_and_get(served):
    client = served.client()
    assert [m.id for m in client.models.list()] == ["fake-model"]
    assert client.models.retrieve("fake-model").owned_by == "dsflow"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_shape_and_tokens(served):
    r = served.client().completions.create(model="fake-model", prompt="def add(a, b):",
                                           max_tokens=7)
    ids = expected_ids(served.engine, "def add(a, b):", 7)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.created > 0
    assert r.choices[0].text == served.engine.tokenizer.decode(ids)
    assert r.choices[0].model_extra["token_ids"] == ids
    assert r.choices[0].finish_reason == "length"
    prompt_len = len(served.engine.tokenizer.encode("def add(a, b):"))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (prompt_len, 7, prompt_len + 7)


def test_completion_default_max_tokens_is_openais_16(served):
    r = served.client().completions.create(model="fake-model", prompt="x")
    assert r.usage.completion_tokens == 16


def test_prompt_list_and_n_number_choices_prompt_major(served):
    r = served.client().completions.create(model="fake-model", prompt=["a = 1", "b = 2"],
                                           n=2, max_tokens=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        prompt = ["a = 1", "b = 2"][c.index // 2]
        assert c.model_extra["token_ids"] == expected_ids(served.engine, prompt, 3)
    assert r.usage.completion_tokens == 12


def test_token_id_prompts(served):
    ids = served.engine.tokenizer.encode("print(")
    r = served.client().completions.create(model="fake-model", prompt=[ids, ids], max_tokens=2)
    assert len(r.choices) == 2 and r.usage.prompt_tokens == 2 * len(ids)


def test_chat_multi_turn_and_text_parts(served):
    client = served.client()
    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": [{"type": "text", "text": "Reverse"},
                                             {"type": "text", "text": "a list"}]},
                {"role": "assistant", "content": "Use [::-1]."},
                {"role": "user", "content": "And a string?"}]
    r = client.chat.completions.create(model="fake-model", messages=messages, max_tokens=5)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    tok = served.engine.tokenizer
    rendered = tok.apply_chat_template([{"role": "system", "content": "You write Python."},
                                        {"role": "user", "content": "Reverse\na list"},
                                        {"role": "assistant", "content": "Use [::-1]."},
                                        {"role": "user", "content": "And a string?"}])
    assert served.engine.submitted[-1].prompt_token_ids == tok.encode(rendered, add_bos=False)


def test_chat_default_max_tokens_is_the_rest_of_the_context(served):
    served.client().chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}],
        stop=["zzzz"], extra_body={"stop_token_ids": [served.engine.words[0]]}, n=1,
        max_tokens=None)
    h = served.engine.submitted[-1]
    assert h.params.max_new_tokens == 4096 - len(h.prompt_token_ids)


def test_chat_stream_chunks(served):
    stream = served.client().chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.id == chunks[0].id and c.id.startswith("chatcmpl-") for c in chunks)
    assert all(c.object == "chat.completion.chunk" and c.created > 0 and c.model == "fake-model"
               for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    # one chunk per token, or fewer: a consumer that lags gets the tokens merged
    assert 1 <= len(content) <= 4
    assert sum(len(c.choices[0].model_extra["token_ids"]) for c in content) == 4
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_raw_sse(served):
    with served.http() as http:
        r = http.post("/v1/completions", json={"prompt": "x = [", "max_tokens": 5,
                                               "stream": True})
    events = sse_events(r.text)
    assert r.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == \
        served.engine.tokenizer.decode(expected_ids(served.engine, "x = [", 5))
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_logprobs_completion_and_chat(served):
    client = served.client()
    r = client.completions.create(model="fake-model", prompt="a", max_tokens=3, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(len(top) <= 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0
    assert "".join(lp.tokens) == r.choices[0].text
    c = client.chat.completions.create(model="fake-model", max_tokens=3, logprobs=True,
                                       top_logprobs=3,
                                       messages=[{"role": "user", "content": "a"}])
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 3 for t in content)
    assert served.engine.submitted[-1].params.logprobs == 3


def test_fim_suffix_and_echo(served):
    client = served.client()
    client.completions.create(model="fake-model", prompt="def f(x):\n    ",
                              suffix="\n    return y", max_tokens=2)
    ids = served.engine.submitted[-1].prompt_token_ids
    tok = served.engine.tokenizer
    assert ids == tok.encode("<｜fim▁begin｜>def f(x):\n    <｜fim▁hole｜>\n    return y"
                             "<｜fim▁end｜>")
    r = client.completions.create(model="fake-model", prompt="abc", echo=True, max_tokens=2)
    assert r.choices[0].text.startswith("abc") and len(r.choices[0].text) > 3


def test_seed_reproducible_and_stop(served):
    client = served.client()
    runs = [client.completions.create(model="fake-model", prompt="p", temperature=1.0, seed=7,
                                      max_tokens=6).choices[0].text for _ in range(2)]
    assert runs[0] == runs[1]
    text = client.completions.create(model="fake-model", prompt="p", max_tokens=6).choices[0].text
    stop = text.split()[1]
    r = client.completions.create(model="fake-model", prompt="p", max_tokens=6, stop=stop)
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text


# ---- malformed input: a 4xx in OpenAI's shape, never a dropped connection --------------
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path, body, status, param", [
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                        "image_url": {"url": "x"}}]}]},
     400, "messages[0].content"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": USER, "tools": [{"type": "function"}]}, 400, "tools"),
    (CHAT, {"messages": USER, "suffix": "x"}, 400, "suffix"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {"messages": USER, "max_tokens": 3, "max_completion_tokens": 4}, 400,
     "max_completion_tokens"),
    (COMP, {"prompt": "x", "seed": -1}, 400, "seed"),
    (COMP, {"prompt": "x", "unknown_field": 1}, 400, "unknown_field"),
    (COMP, {"prompt": "x", "n": 0}, 400, "n"),
    (COMP, {"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    (COMP, {"prompt": "x", "logprobs": True}, 400, "logprobs"),
    (COMP, {"prompt": "x", "logprobs": 1, "echo": True}, 400, "echo"),
    (COMP, {"prompt": ["a", "b"], "suffix": "x"}, 400, "suffix"),
    (COMP, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    (COMP, {"prompt": "x", "max_tokens": "16"}, 400, "max_tokens"),
    (COMP, {"prompt": "x", "temperature": -1}, 400, "temperature"),
    (COMP, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    (COMP, {"prompt": "x", "stop": ""}, 400, "stop"),
    (COMP, {"prompt": "x", "stop": [1]}, 400, "stop"),
    (COMP, {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (COMP, {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    (COMP, {"prompt": "x", "best_of": 3}, 400, "best_of"),
    (COMP, {"prompt": 42}, 400, "prompt"),
    (COMP, {"prompt": []}, 400, "prompt"),
    (COMP, {"prompt": [1.5]}, 400, "prompt"),
    (COMP, {}, 400, "prompt"),
    (COMP, {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    (COMP, {"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    (COMP, {"prompt": ["a"] * 9}, 400, "prompt"),
    (COMP, {"prompt": "x", "n": 9}, 400, "n"),
])
def test_invalid_requests(served, path, body, status, param):
    with served.http() as http:
        error = assert_openai_error(http.post(path, json=body), status)
    assert error["param"] == param, error


@pytest.mark.parametrize("raw, fragment", [
    (b'{"prompt": "x", "temperature": NaN}', "NaN"),
    (b'{"prompt": "x", "temperature": 1e999}', "temperature"),
    (b'{"prompt": "\\ud800"}', "surrogate"),
    (b'{"prompt": "x",', "not valid JSON"),
    (b'[1, 2]', "JSON object"),
    (b'\xff\xfe', "not valid JSON"),
])
def test_invalid_bodies(served, raw, fragment):
    with served.http() as http:
        r = http.post(COMP, content=raw, headers={"Content-Type": "application/json"})
    assert fragment in assert_openai_error(r, 400)["message"]


def raw_http(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=DEADLINE_S) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_non_numeric_content_length_gets_a_json_400(served):
    reply = raw_http(served.url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Length: abc\r\n\r\n{}")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(body)["error"]["code"] == "invalid_http"


def test_a_template_that_refuses_the_messages_is_a_400(served, monkeypatch):
    def refuse(messages):
        raise jinja2.TemplateError("Conversation roles must alternate")
    monkeypatch.setattr(served.engine.tokenizer, "apply_chat_template", refuse)
    with served.http() as http:
        error = assert_openai_error(http.post(CHAT, json={"messages": USER}), 400)
    assert error["param"] == "messages" and "alternate" in error["message"]


def test_bad_request_error_in_the_client(served):
    with pytest.raises(openai.BadRequestError) as e:
        served.client().completions.create(model="fake-model", prompt="x", n=0)
    assert e.value.body["param"] == "n"


def test_unknown_route_and_method(served):
    with served.http() as http:
        assert_openai_error(http.get("/v1/nothing"), 404)
        assert_openai_error(http.get(COMP), 405)


# ---- limits ---------------------------------------------------------------------------------
def test_body_size_cap():
    engine = fake_engine()
    with serving(engine, max_body_bytes=1000) as s, s.http() as http:
        r = http.post(COMP, json={"prompt": "x" * 2000})
        assert assert_openai_error(r, 413)["code"] == "body_too_large"

        def chunked():  # no Content-Length: counted while reading
            for _ in range(20):
                yield b" " * 100
        r = http.post(COMP, content=chunked())
        assert assert_openai_error(r, 413)["code"] == "body_too_large"
    engine.close()


def test_full_queue_is_429_with_retry_after():
    engine = fake_engine(max_queue=1)
    engine.gate.clear()  # nothing is admitted: the first request waits in the queue
    with serving(engine) as s, s.http() as http:
        first = threading.Thread(target=lambda: http.post(COMP, json={"prompt": "a"}))
        first.start()
        engine.wait_until(lambda: len(engine.submitted) == 1)
        r = http.post(COMP, json={"prompt": "b"})
        assert assert_openai_error(r, 429)["code"] == "queue_full"
        assert r.headers["retry-after"] == "1"
        with pytest.raises(openai.RateLimitError):
            s.client().completions.create(model="fake-model", prompt="c")
        engine.gate.set()
        first.join(DEADLINE_S)
    engine.close()


def test_auth():
    engine = fake_engine()
    with serving(engine, api_key="s3cret") as s, s.http() as http:
        assert http.get("/health").status_code == 200  # probes need no key
        assert_openai_error(http.get("/v1/models"), 401)
        r = http.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert assert_openai_error(r, 401)["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        assert [m.id for m in s.client(api_key="s3cret").models.list()] == ["fake-model"]
    engine.close()


# ---- clients that stop reading or leave -----------------------------------------------
def open_stream(url: str, body: dict, rcvbuf: int = 0) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(DEADLINE_S)
    s.connect((host, int(port)))
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return s


def test_a_client_that_stops_reading_does_not_block_others():
    engine = fake_engine(max_seq_len=10_000)
    with serving(engine, sndbuf=4096) as s:
        # 3000 chunks of ~200 bytes, 600 kB: far more than the small socket buffers on
        # both sides plus the transport's 64 kB high-water mark hold, so the server's
        # writes to this client block (uvicorn pauses it) while the others are served
        stalled = open_stream(s.url, {"prompt": "a", "max_tokens": 3000, "stream": True},
                              rcvbuf=4096)
        engine.wait_until(lambda: len(engine.submitted) == 1)
        others = [s.client().completions.create(model="fake-model", prompt=f"p{i}", max_tokens=5)
                  for i in range(5)]
        assert all(o.usage.completion_tokens == 5 for o in others)
        # the stalled request's sequence ran to the end in the engine, unread
        engine.wait_until(lambda: all(q.c.finish_reason for q in engine.submitted[0].seqs))
        data = b""
        while not data.endswith(b"\r\n0\r\n\r\n"):  # the last chunk of the body
            chunk = stalled.recv(1 << 20)
            assert chunk, "stream closed early"
            data += chunk
        stalled.close()
        # the tokens produced while it did not read come merged, none lost
        chunks = [json.loads(line[len(b"data: "):]) for line in data.split(b"\n")
                  if line.startswith(b"data: {")]
        assert sum(len(c["choices"][0]["token_ids"]) for c in chunks) == 3000
        assert [c["choices"][0]["finish_reason"] for c in chunks].count(None) == \
            len(chunks) - 1 < 3000
        assert b"data: [DONE]" in data
    engine.close()


def test_disconnect_cancels_streaming_and_waiting_requests():
    engine = fake_engine(max_seq_len=200_000, step_s=0.001)
    with serving(engine) as s:
        streaming = open_stream(s.url, {"prompt": "a", "max_tokens": 100_000, "stream": True})
        assert streaming.recv(4096).startswith(b"HTTP/1.1 200")
        streaming.close()
        engine.wait_until(lambda: engine.submitted[0].cancelled)
        engine.gate.clear()  # the next request stays queued: no token is ever written
        waiting = open_stream(s.url, {"prompt": "b", "max_tokens": 10})
        engine.wait_until(lambda: len(engine.submitted) == 2)
        waiting.close()
        engine.wait_until(lambda: engine.submitted[1].cancelled)
        assert engine.health()["waiting"] == 0
        engine.gate.set()
    engine.close()


def test_request_timeout_cancels():
    engine = fake_engine()
    engine.gate.clear()
    with serving(engine, request_timeout_s=0.3) as s, s.http() as http:
        r = http.post(COMP, json={"prompt": "a"})
        assert assert_openai_error(r, 504)["code"] == "request_timeout"
        r = http.post(COMP, json={"prompt": "b", "stream": True})
        assert json.loads(sse_events(r.text)[0])["error"]["code"] == "request_timeout"
        assert all(h.cancelled for h in engine.submitted)
    engine.close()


# ---- faults ----------------------------------------------------------------------------
def test_worker_failure_errors_in_flight_then_restart():
    engine = fake_engine(max_seq_len=200_000, step_s=0.001)
    with serving(engine) as s, s.http() as http:
        client = s.client()
        stream = client.completions.create(model="fake-model", prompt="a", max_tokens=100_000,
                                           stream=True)
        next(iter(stream))
        engine.fail()
        with pytest.raises(openai.APIError, match="rank 0 exited"):
            for _ in stream:
                pass
        # the supervisor restarts the fake at once (test_health_reports_the_failed_engine
        # shows /health in between)
        deadline = time.monotonic() + DEADLINE_S
        while http.get("/health").status_code != 200:
            assert time.monotonic() < deadline
        assert engine.restarts == 1
        r = client.completions.create(model="fake-model", prompt="b", max_tokens=2)
        assert r.usage.completion_tokens == 2
        assert 'dsflow_engine_restarts_total 1.0' in http.get("/metrics").text
    engine.close()


def test_a_restart_ends_in_flight_requests_with_the_failure_that_caused_it():
    """A supervisor can notice a dead rank (health()) and restart before the engine
    thread's next step sees it: the request still learns that the rank died."""
    engine = fake_engine()
    engine.gate.clear()  # no step runs: only health() can notice the failure
    handle = engine.submit("a", SamplingParams(max_tokens=4))
    engine.fail()
    assert engine.health()["state"] == "failed"
    engine.restart()
    with pytest.raises(WorkerError, match="rank 0 exited"):
        handle.result(DEADLINE_S)
    engine.gate.set()
    assert len(engine.generate("b", SamplingParams(max_tokens=2))[0].token_ids) == 2
    engine.close()


def test_health_reports_the_failed_engine():
    engine = fake_engine()
    engine.restart_failures = 100
    policy = RestartPolicy(max_restarts=2, backoff_s=0.01, poll_s=60)  # no polling: /health
    with serving(engine, policy=policy) as s, s.http() as http:
        assert http.get("/health").json()["status"] == "ok"
        engine.fail("rank 1 exited unexpectedly (code -9)")
        r = http.get("/health")
        assert r.status_code == 503 and "rank 1" in r.json()["detail"]
        s.thread.join(DEADLINE_S)  # two failed restarts: the server gives up
        assert not s.thread.is_alive() and s.server.exit_code == 3
    engine.close()


def test_sigterm_drains_in_flight_requests():
    engine = fake_engine(step_s=0.002)
    with serving(engine, shutdown_timeout=DEADLINE_S) as s:
        client = s.client()
        results = []
        worker = threading.Thread(target=lambda: results.append(client.completions.create(
            model="fake-model", prompt="a", max_tokens=300)))
        worker.start()
        engine.wait_until(lambda: engine.submitted and engine.submitted[0].seqs[0].c.token_ids)
        # SIGTERM (handle_exit) drains, then tells uvicorn to stop listening, which its
        # loop does within 0.1 s: drain first, so that the draining server is observed
        # for certain, then the rest of what the signal does
        s.server.supervisor.drain()
        with s.http() as http:
            health = http.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "draining"
            late = http.post("/v1/completions", json={"model": "fake-model", "prompt": "b"})
            assert late.status_code == 503
            assert late.json()["error"]["code"] == "shutting_down"
        s.server.handle_exit(15, None)  # what SIGTERM does
        worker.join(DEADLINE_S)
        s.thread.join(DEADLINE_S)
        assert results[0].usage.completion_tokens == 300 and s.server.exit_code == 0
    engine.close()


# ---- metrics ---------------------------------------------------------------------------
def test_metrics(served):
    client = served.client()
    client.completions.create(model="fake-model", prompt="abc", max_tokens=4)
    list(client.completions.create(model="fake-model", prompt="abc", max_tokens=4, stream=True))
    with served.http() as http:
        http.post(COMP, json={"prompt": "x", "n": 0})
        text = http.get("/metrics").text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line and not line.startswith("#")}
    assert samples['dsflow_requests_total{route="/v1/completions",status="200"}'] >= 2
    assert samples['dsflow_requests_total{route="/v1/completions",status="400"}'] >= 1
    assert samples["dsflow_generation_tokens_total"] >= 8
    assert samples["dsflow_prompt_tokens_total"] >= 2
    assert samples["dsflow_time_to_first_token_seconds_count"] >= 2
    assert samples["dsflow_inter_token_latency_seconds_count"] >= 6
    assert samples["dsflow_queue_depth"] == 0 and samples["dsflow_slots"] == 8
    assert "dsflow_running_sequences" in samples and samples["dsflow_engine_ready"] == 1


# ---- the command line -------------------------------------------------------------------
def dsserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsflow.runtime.server.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_warns_without_key_off_loopback_and_fails_in_one_line(tmp_path):
    r = dsserve("--host", "0.0.0.0", "--port", "0", "--artifacts", str(tmp_path / "none"))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert "without --api-key" in lines[0] and lines[1].startswith("dsserve: error:")
    assert len(lines) == 2  # no traceback


def test_cli_taken_port_fails_before_starting_workers(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = dsserve("--port", str(taken.getsockname()[1]), "--artifacts", str(tmp_path))
    assert r.returncode == 1 and "cannot listen" in r.stderr and "warning" not in r.stderr
    assert dsserve("--max-queue", "0").returncode == 2  # a bad option value: usage
