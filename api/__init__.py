"""The HTTP API (aiohttp), its route table, SSE, OpenAPI, and the `safehold` CLI."""
