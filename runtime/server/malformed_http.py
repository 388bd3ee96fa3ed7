"""uvicorn's HTTP/1.1 protocol (h11), answering malformed HTTP in OpenAI's error shape.

A request the HTTP parser itself rejects (a non-numeric Content-Length, a broken
request line) never reaches the app: uvicorn answers it with a text/plain 400. Clients
of an OpenAI-style API parse error bodies as JSON, so that one answer is replaced here.
"""
from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from dsflow.runtime.server.errors import bad_request


class OpenAIErrorH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        body = json.dumps(bad_request(f"malformed HTTP request: {msg}",
                                      code="invalid_http").body()).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode())]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
