"""Real S3 over HTTP for tests: moto's server as a subprocess, and a fault-injecting proxy in front of it.

Both listen on 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

BIN = Path(sys.executable).parent
ACCESS_KEY = "AKIAORCHESTRATORTEST1"
SECRET_KEY = "orchestrator-test-secret-do-not-log-9f3b"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """`moto_server` on 127.0.0.1:<free port>, started and stopped by the test."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> "MotoServer":
        self.process = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("moto_server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)


class FaultyProxy:
    """HTTP proxy to an S3 endpoint that answers 503 to writes whose path matches `fail_writes` (a regex).

    Everything else is forwarded unchanged, so a checkpoint upload can be cut off half-way.
    `bytes_served` counts the body bytes of every GET answer by request path (query dropped), so a
    test can see how often an object was downloaded.
    """

    def __init__(self, upstream_port: int, fail_writes: Optional[str] = None) -> None:
        self.upstream_port = upstream_port
        self.fail_writes = re.compile(fail_writes) if fail_writes else None
        self.failed: list[str] = []
        self.bytes_served: dict[str, int] = {}
        self.gets: list[tuple] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self) -> None:
                body = self._body()
                if (self.command in ("PUT", "POST") and proxy.fail_writes is not None
                        and proxy.fail_writes.search(self.path)):
                    proxy.failed.append(self.path)
                    payload = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(key, value)
                # HEAD answers carry the object's size, not the (empty) body's
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                if self.command == "GET":
                    with proxy.lock:
                        key = self.path.split("?", 1)[0]
                        proxy.bytes_served[key] = proxy.bytes_served.get(key, 0) + len(data)
                        proxy.gets.append((time.time(), key, len(data), self.headers.get("User-Agent", "")[:40]))
                upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def served_under(self, prefix: str) -> int:
        """GET body bytes served for object paths starting with `prefix` (e.g. "/bucket/run/base/")."""
        with self.lock:
            return sum(n for path, n in self.bytes_served.items() if path.startswith(prefix))

    def start(self) -> "FaultyProxy":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
