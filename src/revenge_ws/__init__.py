"""revenge-ws: the real-time hub of a self-hosted media server."""

__version__ = "0.1.0"
