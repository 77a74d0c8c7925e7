"""What the hostile-file tests share: a dump's head and foot around hostile content."""

from __future__ import annotations

HEADER = b"--\n-- PostgreSQL database dump\n--\n\n\\restrict abc123\n\nSET lock_timeout = 0;\n"


FOOTER = b"\n--\n-- PostgreSQL database dump complete\n--\n\n\\unrestrict abc123\n"
