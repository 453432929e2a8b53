"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 endpoint (the moto server), for tests.

Every `every`-th request is not forwarded: it is answered `503 SlowDown` (S3's throttling reply) or its
connection is reset (alternating), as S3 and the networks in front of it do. Faults happen *before*
forwarding, so the server never sees a failed request: a retried conditional PUT cannot find its own
first attempt. Everything else is relayed as is. `counts` says what was injected, by method.

Run it in a thread (`FaultProxy(upstream, every).start()`) or as a process
(`python tests/faultproxy.py UPSTREAM EVERY` prints the proxy's URL, then serves until killed)."""

from __future__ import annotations

import http.client
import http.server
import socket
import struct
import sys
import threading
import urllib.parse
from collections import Counter

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    def __init__(self, upstream: str, every: int = 9, host: str = "127.0.0.1", port: int = 0):
        u = urllib.parse.urlsplit(upstream)
        self.upstream = (u.hostname, u.port or 80)
        self.every = every
        self.counts: Counter = Counter()  # "requests", "503 GET", "reset PUT", ...
        self._lock = threading.Lock()
        self._n = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the SDKs expect

            def log_message(self, *a):  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _relay(self):
                body = self._body()
                fault = proxy._next_fault()
                if fault == "503":
                    proxy._count(f"503 {self.command}")
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOW_DOWN)
                    return
                if fault == "reset":
                    proxy._count(f"reset {self.command}")
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()  # an RST, no reply
                    return
                conn = getattr(self, "_up", None) or http.client.HTTPConnection(*proxy.upstream, timeout=120)
                self._up = conn
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                except (ConnectionError, http.client.HTTPException):
                    self._up = None
                    raise
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                cl = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", cl or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def _next_fault(self) -> str | None:
        with self._lock:
            self._n += 1
            self.counts["requests"] += 1
            if self.every and self._n % self.every == 0:
                return "503" if (self._n // self.every) % 2 else "reset"
        return None

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    @property
    def faults(self) -> int:
        return sum(v for k, v in self.counts.items() if k != "requests")

    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


if __name__ == "__main__":
    p = FaultProxy(sys.argv[1], int(sys.argv[2]))
    print(p.url, flush=True)
    try:
        p.server.serve_forever()
    finally:
        print(dict(p.counts), file=sys.stderr, flush=True)
