"""Progress of one job: engines and the pipeline update it, a loop publishes it.

`phase_percent` is the current phase's own share done; `percent` is the whole job's and
never goes backwards: a procedure may give its phases ranges of the job (`plan`; a restore:
verify, safety backup, load), and a phase outside the plan (an engine's sub-phase such as
`dumping` inside `safety_backup`) moves within the range of the planned phase it is part of.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from shared.jobs import Phase, RestoreStage


async def _no_stage(stage: RestoreStage) -> None:
    return None


@dataclass
class Progress:
    phase: Phase = Phase.STARTING
    bytes_done: int = 0
    bytes_total: int | None = None
    items_done: int = 0
    items_total: int | None = None
    item_kind: str = "tables"
    _started: float = field(default_factory=time.monotonic)
    _phase_started: float = field(default_factory=time.monotonic)
    _last_bytes: int = 0
    _last_time: float = field(default_factory=time.monotonic)
    _rate: float = 0.0
    # phase and log events not yet published, in the order they happened (one queue, so a
    # log line never overtakes the phase it belongs to)
    outbox: list[tuple[str, dict[str, object]]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # restore stages (e.g. "committing") are written to the job record before they happen,
    # so whoever finds the job orphaned can say what state the database is in
    on_stage: Callable[[RestoreStage], Awaitable[None]] = _no_stage
    stages: list[RestoreStage] = field(default_factory=list)
    _last_percent: float = 0.0
    plan: dict[Phase, tuple[float, float]] = field(default_factory=dict)
    _range: tuple[float, float] = (0.0, 100.0)
    _job_percent: float = 0.0
    # sessions of the application holding locks the restore waits for (engines' watchers)
    waiting_for: Sequence[Mapping[str, object]] | None = None  # engines.Blocker
    # a dump's size: the engine estimates on-disk bytes; the procedure knows how many dump
    # bytes the last backup made per estimated byte. Applied as the phase starts, so no
    # progress event ever shows the unscaled estimate.
    estimate_scale: float = 1.0
    estimated_bytes: int | None = None  # the engine's own estimate, unscaled

    def set_phase(self, phase: Phase, *, bytes_total: int | None = None,
                  items_total: int | None = None) -> None:
        """Start a new phase; counters restart. Every phase is published, however short."""
        self.phase = phase
        self.outbox.append(("phase", {"phase": phase}))
        self.bytes_done = 0
        self.bytes_total = bytes_total
        if phase == Phase.DUMPING:
            self.estimated_bytes = bytes_total
            if bytes_total:
                self.bytes_total = max(1, int(bytes_total * self.estimate_scale))
        self.items_done = 0
        self.items_total = items_total
        self._phase_started = self._last_time = time.monotonic()
        self._last_bytes = 0
        self._rate = 0.0
        self._last_percent = 0.0
        if phase in self.plan:
            self._range = self.plan[phase]

    async def enter_stage(self, stage: RestoreStage) -> None:
        """Record a stage durably (awaited: it is in the job record before we go on)."""
        self.stages.append(stage)
        await self.on_stage(stage)

    def stage_reached(self, stage: RestoreStage) -> bool:
        return stage in self.stages

    def warn(self, message: str) -> None:
        """Something the operator must know (published as a `log` event, kept in results)."""
        self.warnings.append(message)
        self.outbox.append(("log", {"level": "warning", "message": message}))

    def log(self, message: str) -> None:
        """A line for whoever follows the job (published in order with the phases)."""
        self.outbox.append(("log", {"message": message}))

    def add_bytes(self, n: int) -> None:
        self.bytes_done += n

    def snapshot(self) -> dict[str, object]:
        now = time.monotonic()
        dt = now - self._last_time
        if dt >= 0.2:
            inst = (self.bytes_done - self._last_bytes) / dt
            # smooth the rate so the ETA does not jump around
            self._rate = inst if self._rate == 0 else 0.6 * self._rate + 0.4 * inst
            self._last_bytes, self._last_time = self.bytes_done, now
        if self.bytes_total is not None and self.bytes_done > self.bytes_total:
            self.bytes_total = self.bytes_done  # an estimate was low: re-base, never overrun
        percent: float | None = None
        if self.bytes_total:
            percent = min(99.0, 100.0 * self.bytes_done / self.bytes_total)
        elif self.items_total:
            percent = min(99.0, 100.0 * self.items_done / self.items_total)
        if percent is not None:  # never backwards within a phase
            percent = self._last_percent = max(percent, self._last_percent)
        lo, hi = self._range
        overall = lo + (hi - lo) * (percent or 0.0) / 100.0
        self._job_percent = min(99.0, max(self._job_percent, overall))
        eta = None
        if self.bytes_total and self._rate > 0:
            eta = max(0.0, (self.bytes_total - self.bytes_done) / self._rate)
        snap: dict[str, object] = {
            "phase": self.phase,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "items_done": self.items_done,
            "items_total": self.items_total,
            "item_kind": self.item_kind,
            "percent": round(self._job_percent, 1),
            "phase_percent": None if percent is None else round(percent, 1),
            "rate_bps": round(self._rate),
            "eta_s": None if eta is None else round(eta, 1),
            "elapsed_s": round(now - self._phase_started, 1),
        }
        if self.waiting_for:
            snap["waiting_for"] = self.waiting_for
        return snap
