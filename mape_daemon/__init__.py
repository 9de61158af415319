"""mape-daemon: MAP-E (RFC 7597) for a Linux router."""
