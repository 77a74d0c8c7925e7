"""Every Redis key and stream name Safehold uses, under one configurable prefix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "safehold"

    @property
    def queue(self) -> str:
        """The arq queue (a sorted set arq owns)."""
        return f"{self.prefix}:queue"

    def queued(self, job_id: str) -> str:
        """The job's id in the arq queue: arq's own keys (`arq:job:<this>`,
        `arq:in-progress:<this>`, `arq:retry:<this>`, `arq:result:<this>`) have a fixed
        `arq:` start, so they carry the prefix inside."""
        return f"{self.prefix}:{job_id}"

    @staticmethod
    def job_of_queued(queued_id: str) -> str:
        """Our job id from an arq queue member (older members are the bare job id)."""
        return queued_id.rsplit(":", 1)[-1]

    @property
    def doorbell(self) -> str:
        """A short list an idle worker blocks on between polls of the queue: one entry per
        job queued wakes a worker at once instead of at its next poll."""
        return f"{self.prefix}:doorbell"

    @property
    def job_index(self) -> str:
        """Sorted set of job ids scored by creation time."""
        return f"{self.prefix}:jobs"

    @property
    def running(self) -> str:
        """Set of job ids currently `running` (what the reaper inspects)."""
        return f"{self.prefix}:running"

    @property
    def global_events(self) -> str:
        return f"{self.prefix}:events"

    @property
    def workers(self) -> str:
        """Sorted set of worker ids scored by their last heartbeat (unix time)."""
        return f"{self.prefix}:workers"

    @property
    def audit(self) -> str:
        """Capped stream of audit entries."""
        return f"{self.prefix}:audit"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    @property
    def worker_keys(self) -> str:
        """Hash: worker id -> its ephemeral age public key (identities are sealed to it)."""
        return f"{self.prefix}:worker_keys"

    def metric(self, name: str) -> str:
        """Hashes and counters behind /metrics (shared/stats.py)."""
        return f"{self.prefix}:metric:{name}"

    def counter(self, name: str) -> str:
        """A plain counter for /metrics (e.g. notifications_failed)."""
        return f"{self.prefix}:counter:{name}"

    def schedule(self, target: str) -> str:
        """Hash: first_seen, last_slot, last_job of a target's schedule."""
        return f"{self.prefix}:schedule:{target}"

    def name_claim(self, target: str, filename: str) -> str:
        """Held by whoever is writing a backup of that name (no two writers, ever)."""
        return f"{self.prefix}:name:{target}:{filename}"

    def sealed_identity(self, job_id: str) -> str:
        """A restore's age identity, encrypted to the live workers' ephemeral keys."""
        return f"{self.prefix}:job:{job_id}:sealed_identity"

    def heartbeat(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:heartbeat"

    def idempotency(self, key: str) -> str:
        return f"{self.prefix}:idempotency:{key}"

    def lock(self, target: str) -> str:
        return f"{self.prefix}:lock:{target}"

    def pitr(self, target: str, what: str) -> str:
        """A target's WAL archive: `lease` (the streaming worker), `fence` (the lease's
        counter), `state` (what the streamer does now), `gaps_said` (every gap alerted)."""
        return f"{self.prefix}:pitr:{target}:{what}"
