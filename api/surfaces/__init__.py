"""The ways in: each surface turns its protocol into calls of api.operations (which checks
the role and writes the audit) and answers in its own shape.

- `rest`: REST v1 (`/api/v1/…`);
- `seed`: the seed-compatible `/backup/*` surface;
- `mcp`: the MCP server at `/mcp` (tools and resources, two-step restores);
- `web`: the web page, its tickets and SSO login;
- `events`: server-sent events of one job or all;
- `uploads`: streamed uploads, validated before they are listed;
- `metrics`: Prometheus `/metrics`.
"""
