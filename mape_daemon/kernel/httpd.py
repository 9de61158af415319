"""The HTTP listener of /metrics (prometheus_client's WSGI app on a threading server, IPv4 or IPv6)."""

from __future__ import annotations

import socket
import threading
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
        threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
