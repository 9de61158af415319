"""An HB46PP provisioning server (and an IPIP provider's update endpoint) for the lab: HTTP(S) over
IPv6 answering from a JSON file the test rewrites ({path: {"status": int, "body": str, "location":
str}}; an unknown path is a 404), and logging every request's path and query, Host, Authorization
and source address. The TXT record that points at it is dnsmasq's
(tests/lab/pki.py makes the lab CA and the server's certificate)."""

from __future__ import annotations

import json
import socket
import ssl
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit


def dnsmasq(listen: str, *args: str) -> list[str]:
    """A line's resolver: dnsmasq on `listen` alone, answering only from `args` (its records)."""
    return ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--pid-file=", "--port=53", "--bind-interfaces",
            f"--listen-address={listen}", "--no-resolv", "--no-hosts", "--user=root", *args]  # fmt: skip


class _Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def serve(address: str, port: int, answers: str, log: str, cert: str | None = None, key: str | None = None) -> None:
    """Until killed. `cert`/`key`: HTTPS with them; without: plain HTTP."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with open(log, "a") as f:
                f.write(
                    json.dumps(
                        {
                            "path": self.path,
                            "host": self.headers.get("Host"),
                            "auth": self.headers.get("Authorization"),
                            "from": self.client_address[0],
                        }
                    )
                    + "\n"
                )
            table = json.loads(Path(answers).read_text())
            a = table.get(urlsplit(self.path).path, {"status": 404, "body": "not here"})
            body = a.get("body", "").encode()
            self.send_response(a["status"])
            if "location" in a:
                self.send_header("Location", a["location"])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = _Server((address, port), Handler)
    if cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.serve_forever()
