"""How to start ArcadeDB's server with its Bolt plugin (the Neo4j stand-in), shared by the
test fixture and bench/neo4j_backup.py. Stdlib only."""

from __future__ import annotations

import glob
from pathlib import Path

STANDINS = Path(__file__).resolve().parents[2] / ".standins"


def arcadedb_home() -> Path | None:
    """The installed arcadedb_embedded package (JRE + jars), or None."""
    found = glob.glob(str(STANDINS / "arcade-venv/lib/python3*/site-packages/arcadedb_embedded"))
    return Path(found[0]) if found else None


def arcadedb_command(home: Path, root: Path, http_port: int, bolt_port: int,
                     password: str, heap: str = "512m") -> list[str]:
    """argv of a server with database `neo4j`, Bolt on loopback, data under `root`."""
    return [
        str(home / "jre/bin/java"), f"-Xmx{heap}", "-cp", f"{home / 'jars'}/*",
        f"-Darcadedb.server.rootPath={root}",
        f"-Darcadedb.server.databaseDirectory={root / 'databases'}",
        f"-Darcadedb.server.rootPassword={password}",
        "-Darcadedb.server.httpIncomingHost=127.0.0.1",
        f"-Darcadedb.server.httpIncomingPort={http_port}",
        "-Darcadedb.server.plugins=Bolt:com.arcadedb.bolt.BoltProtocolPlugin",
        "-Darcadedb.bolt.host=127.0.0.1", f"-Darcadedb.bolt.port={bolt_port}",
        "-Darcadedb.server.defaultDatabases=neo4j[root]",
        "com.arcadedb.server.ArcadeDBServer"]
