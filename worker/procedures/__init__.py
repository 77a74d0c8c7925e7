"""The backup and restore procedures, each readable top to bottom.

Backup:  dump -> codec chain (gzip|zstd, age) -> sha256 -> every destination of the target
         at once -> read-back check -> manifests last.
Restore: verify (checksum, inflation bound, content) -> safety backup -> load -> on failure,
         say exactly what state the database is in, rolling back from the safety backup
         when the engine cannot promise the database was left unchanged.

The job lifecycle around them (transitions, heartbeat, cancel) lives in `worker.runner`.
One module per procedure: `backup` (and prune), `verify` (and drill), `restore`; what they
share in `base`.
"""

from __future__ import annotations

from worker.procedures.base import DRILL_NOT_RUN, ProcedureBase
from worker.procedures.pitr import PitrRestores
from worker.procedures.preview import Previews


class Procedures(PitrRestores, Previews):
    """Every procedure a job runs: backup, prune, verify (with its drill), restore."""


__all__ = ["DRILL_NOT_RUN", "ProcedureBase", "Procedures"]
