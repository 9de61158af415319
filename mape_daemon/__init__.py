"""mape-daemon: MAP-E (RFC 7597) for a Linux router."""

from ._pyroute2 import register_light

register_light()  # before any module of ours imports pyroute2
