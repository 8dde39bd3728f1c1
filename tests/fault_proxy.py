"""A fault-injecting HTTP proxy for the S3-protocol test server, on loopback.

Each request draws one outcome from a seeded generator, at the configured rates:

- error: 500 InternalError, request not forwarded;
- throttle: 503 SlowDown, request not forwarded;
- reset: the connection is reset (TCP RST) before any response;
- timeout: no response until the client's read timeout has passed, then a reset;
- slow: forwarded, answered after a delay;
- lost: forwarded (a write lands), then answered 500: the client must not write twice;
- ok: forwarded.

`counts` tells which faults were injected, so a test can prove that retries happened.
Run as a script (`python tests/fault_proxy.py UPSTREAM [RATE]`) it serves until killed
and prints its port, for the soak benchmark."""
from __future__ import annotations

import http.client
import random
import socket
import struct
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("error", "throttle", "reset", "timeout", "slow", "lost")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}
_S3_ERRORS = {"error": (500, "InternalError", "We encountered an internal error. Please try again."),
              "throttle": (503, "SlowDown", "Please reduce your request rate."),
              "lost": (500, "InternalError", "We encountered an internal error. Please try again.")}


class FaultProxy:
    def __init__(self, upstream: str, rates: dict[str, float], seed: int = 0, hang_s: float = 2.0,
                 slow_s: float = 0.2):
        unknown = set(rates) - set(FAULTS)
        if unknown or sum(rates.values()) > 1:
            raise ValueError(f"bad fault rates {rates}")
        self.upstream = urlsplit(upstream)
        self.rates, self.hang_s, self.slow_s = rates, hang_s, slow_s
        self.rng, self.lock, self.counts = random.Random(seed), threading.Lock(), Counter()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.proxy = self
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    @property
    def injected(self) -> int:
        return sum(n for fault, n in self.counts.items() if fault not in ("ok", "slow"))

    def draw(self) -> str:
        with self.lock:
            x, fault = self.rng.random(), "ok"
            for name, rate in self.rates.items():
                if x < rate:
                    fault = name
                    break
                x -= rate
            self.counts[fault] += 1
            return fault

    def forward(self, method: str, path: str, headers, body: bytes) -> tuple[int, list, bytes]:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            conn.request(method, path, body=body,
                         headers={k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP})
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()  # headers and body go out in two writes: without this, Nagle waits 40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy
        body = self._body()
        fault = proxy.draw()
        if fault in ("reset", "timeout"):
            if fault == "timeout":
                time.sleep(proxy.hang_s)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if fault in ("error", "throttle"):
            return self._s3_error(fault)
        if fault == "slow":
            time.sleep(proxy.slow_s)
        status, headers, data = proxy.forward(self.command, self.path, self.headers, body)
        if fault == "lost":
            return self._s3_error(fault)
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
        self.send_header("Content-Length", length if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _s3_error(self, fault: str) -> None:
        status, code, message = _S3_ERRORS[fault]
        data = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>" \
               f"<Message>{message}</Message></Error>".encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


if __name__ == "__main__":
    rate = float(sys.argv[2]) if len(sys.argv) > 2 else 0.1
    proxy = FaultProxy(sys.argv[1], {f: rate / len(FAULTS) for f in FAULTS}, hang_s=1.5)
    print(proxy.server.server_port, flush=True)
    threading.Event().wait()
