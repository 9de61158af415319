"""The HTTP listener of /metrics (prometheus_client's WSGI app on a threading server, IPv4 or IPv6).

It sleeps in select() until a request comes: socketserver's default wakes every 0.5 s to look for
a shutdown, which on an idle router was most of the daemon's CPU. Closing wakes it with a
connection of its own instead."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import make_server

from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler


class Listener:
    def __init__(self, address: tuple[str, int], app: Callable[..., Any]) -> None:
        """Bound and serving in a thread of its own; OSError when the address cannot be had."""
        host, port = address

        class Server(ThreadingWSGIServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self.address = address
        self.server = make_server(host, port, app, Server, handler_class=_SilentHandler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(None,), name="metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        stopper = threading.Thread(target=self.server.shutdown, daemon=True)
        stopper.start()
        deadline = time.monotonic() + 5
        while self.thread.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(OSError):  # a connection wakes select() to see the shutdown
                socket.create_connection(self.address, timeout=1).close()
            self.thread.join(0.05)
        self.server.server_close()
