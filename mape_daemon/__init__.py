"""mape-daemon: IPv4 over IPv6 by MAP-E (RFC 7597) for Linux routers, kept converged."""

__version__ = "0.1.0"
