"""The `safehold` command.

- `launcher`: parses the command line; runs the server roles (`api`, `worker`, `run`,
  `config check`) with the full config, and the client commands with a URL and a token only;
- `commands`: the client commands (one or two API calls and a rendering each);
- `client`: the HTTP/SSE client of a running API, progress bars, the final line;
- `login`: where a client finds its server and token (`safehold login`'s stored login);
- `mcp_stdio`: `safehold mcp`, MCP on stdio bridged to a server's /mcp.

Nothing here is imported by the server's surfaces: the CLI is a client like any other.
"""
