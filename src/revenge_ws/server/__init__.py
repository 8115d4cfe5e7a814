"""I/O adapters: aiohttp WebSocket and HTTP endpoints over the transport-free core."""
