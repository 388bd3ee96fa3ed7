"""The HTTP server on a running engine: completions, streaming, chat, errors."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest

from dsflow.runtime.sampling import SamplingParams
from dsflow.runtime.server import make_server


@pytest.fixture(scope="module")
def server(engine_for):
    engine = engine_for(1)
    srv = make_server(engine, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield engine, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def post(url: str, body: dict) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_health(server):
    _, url = server
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        assert json.loads(r.read())["status"] == "ok"


def test_completion_equals_engine(server):
    engine, url = server
    expected = engine.generate("def add(a, b):", SamplingParams(max_new_tokens=8))[0]
    status, body = post(url + "/v1/completions", {"prompt": "def add(a, b):", "max_tokens": 8})
    obj = json.loads(body)
    assert status == 200
    assert obj["choices"][0]["text"] == expected.text
    assert obj["choices"][0]["token_ids"] == expected.token_ids
    assert obj["usage"]["prompt_tokens"] == len(expected.prompt_token_ids)


def test_streaming_sends_deltas_then_done(server):
    engine, url = server
    expected = engine.generate("x = [", SamplingParams(max_new_tokens=8))[0]
    status, body = post(url + "/v1/completions", {"prompt": "x = [", "max_tokens": 8,
                                                  "stream": True})
    events = [line[6:] for line in body.decode().split("\n\n") if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected.text
    assert chunks[-1]["choices"][0]["finish_reason"] == expected.finish_reason


def test_chat_uses_template(server):
    engine, url = server
    messages = [{"role": "user", "content": "hi"}]
    status, body = post(url + "/v1/chat/completions", {"messages": messages, "max_tokens": 4})
    assert status == 200
    assert json.loads(body)["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("body, fragment", [
    ({"prompt": "x", "top_p": 2}, "--top-p"),
    ({"prompt": 42}, "'prompt' must be"),
    ({"prompt": "x", "max_tokens": 100000}, "exceeds the maximum sequence length"),
])
def test_bad_requests_are_400(server, body, fragment):
    _, url = server
    status, raw = post(url + "/v1/completions", body)
    assert status == 400 and fragment in json.loads(raw)["error"]["message"]
