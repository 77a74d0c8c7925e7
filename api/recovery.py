"""Point-in-time recovery as the API sees it: a PITR target's window (from its archive on
every destination, with its streamer's state from Redis), and the one check of an instant
against it — REST, MCP and the CLI all go through `api.operations`, which uses these."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from api.context import Services
from shared import binlog_window, naming, rcmd
from shared.config import TargetConfig
from shared.errors import BadRequest, Conflict, OutsideWindow
from shared.formats.binlog import BINLOG_AT
from shared.pitr_window import window

STREAMING_KEYS = ("streamer", "started_at", "updated_at", "shipped_lsn", "server_lsn",
                  "error", "error_at", "last_gap", "last_gap_at")


async def window_of(s: Services, target: TargetConfig) -> dict[str, object]:
    """The window (`shared.pitr_window.window`); a destination that does not answer is
    named in `unavailable`; 409 pitr_not_enabled for a target without PITR."""
    if target.pitr is None or not target.pitr.enabled:
        raise Conflict(f"target '{target.id}' has no point-in-time recovery (set "
                       f"[targets.{target.id}.pitr] enabled = true)", code="pitr_not_enabled")
    listing, unavailable = await s.catalog.listing(target.id + naming.PITR_SUFFIX)
    state = await rcmd.hgetall_text(s.redis, s.keys.pitr(target.id, "state"))
    streaming: dict[str, object] = {k: state.get(k) or None for k in STREAMING_KEYS}
    if target.engine == "mysql":  # binlog: positions file:offset, the bases its backups
        backups, missing = await s.catalog.listing(target.id)
        streaming["shipped"] = streaming.pop("shipped_lsn")
        streaming["server"] = streaming.pop("server_lsn")
        streaming["unarchived_bytes"] = int(state["slot_bytes"]) if state.get(
            "slot_bytes", "").isdigit() else None
        return {"target": target.id,
                **binlog_window.window(listing, backups, datetime.now(UTC),
                                       binlog_window.said_of(state)),
                "streaming": streaming,
                "unavailable": sorted(set(unavailable) | set(missing))}
    streaming["slot"] = target.pitr.slot
    streaming["slot_bytes"] = int(state["slot_bytes"]) if state.get(
        "slot_bytes", "").isdigit() else None
    return {"target": target.id, **window(listing, datetime.now(UTC)),
            "streaming": streaming, "unavailable": unavailable}


def within(window: Mapping[str, object], point_in_time: str) -> str | None:
    """`point_in_time` as the worker takes it (UTC, microseconds; None for "latest"), once
    it is an instant with its zone inside the recovery window: else 400
    invalid_point_in_time, or 422 outside_window with the window. A MySQL/MariaDB target
    also takes a binlog position (`binlog.000042:1234`: replayed up to the event there,
    not including it — where the bad statement starts) or a MariaDB GTID
    (`gtid:0-1-42`: replayed through that transaction, its commit included)."""
    if window.get("engine") == "mysql" and (m := BINLOG_AT.fullmatch(point_in_time)):
        return _within_binlog(window, point_in_time, int(m[2]), int(m[3]))
    if window.get("engine") == "mysql" and point_in_time.startswith("gtid:"):
        return _within_gtid(window, point_in_time)
    try:
        at = None if point_in_time == "latest" else datetime.fromisoformat(
            point_in_time.replace("Z", "+00:00"))
    except ValueError:
        at = None
        point_in_time = ""
    if point_in_time != "latest" and (at is None or at.tzinfo is None):
        raise BadRequest("point_in_time is an RFC 3339 instant with its zone "
                         "(2026-12-07T10:15:00Z) or \"latest\"", code="invalid_point_in_time")
    earliest, latest = window.get("earliest"), window.get("latest")
    when = None if at is None else at.astimezone(UTC)

    def instant(text: object) -> datetime | None:
        return datetime.fromisoformat(text.replace("Z", "+00:00")) \
            if isinstance(text, str) else None
    first, last = instant(earliest), instant(latest)
    if first is None or last is None or when is not None and not first <= when <= last:
        raise OutsideWindow(
            f"{point_in_time} is outside the recovery window of '{window.get('target')}' "
            f"({earliest or 'no base yet'} .. {latest or 'nothing archived'})",
            {k: window.get(k) for k in ("earliest", "latest", "gaps")})
    return None if when is None else when.isoformat(timespec="microseconds").replace(
        "+00:00", "Z")


def _within_binlog(window: Mapping[str, object], text: str, number: int, offset: int
                   ) -> str:
    """A binlog position inside the archived binlog, after a usable base's."""
    from shared.formats.binlog import parse_position, position

    at = position(number, offset)
    binlog = window.get("binlog")
    start = parse_position(str(binlog.get("from"))) if isinstance(binlog, Mapping) else None
    end = parse_position(str(binlog.get("to"))) if isinstance(binlog, Mapping) else None
    listed = window.get("bases")
    bases = [parse_position(str(b.get("position"))) for b in
             (listed if isinstance(listed, list) else []) if isinstance(b, Mapping)
             and b.get("usable")]
    named = text.rsplit(".", 1)[0]
    if offset < 4 or offset >= 1 << 32 or named != window.get("basename") or \
            start is None or end is None or not start <= at <= end or not any(
            b is not None and b <= at for b in bases):
        raise OutsideWindow(
            f"{text} is outside the archived binlog of '{window.get('target')}' after a "
            f"usable base ({binlog.get('from') if isinstance(binlog, Mapping) else '-'} .. "
            f"{binlog.get('to') if isinstance(binlog, Mapping) else '-'})",
            {k: window.get(k) for k in ("earliest", "latest", "gaps")})
    return text


def _within_gtid(window: Mapping[str, object], text: str) -> str:
    """One GTID the archived binlog reaches in its domain, with a usable base from before
    it (where exactly it is, the worker finds in the staged binlog)."""
    from shared.formats.binlog import parse_gtids

    asked = parse_gtids(text[5:]) if len(text) < 80 else None
    if asked is None or len(asked) != 1:
        raise BadRequest("a GTID is gtid:domain-server-seq (one of them, as "
                         "@@gtid_binlog_pos or mariadb-binlog shows it)",
                         code="invalid_point_in_time")
    [(domain, (_server, seq))] = asked.items()
    span = window.get("gtid")
    reached = parse_gtids(span.get("to")) if isinstance(span, Mapping) else None
    listed = window.get("bases")
    before = [held for b in (listed if isinstance(listed, list) else [])
              if isinstance(b, Mapping) and b.get("usable")
              and (held := parse_gtids(b.get("gtid"))) is not None
              and held.get(domain, (0, -1))[1] < seq]
    if reached is None or domain not in reached or reached[domain][1] < seq or not before:
        raise OutsideWindow(
            f"{text} is outside the archived GTIDs of '{window.get('target')}' after a "
            f"usable base ({span.get('from') if isinstance(span, Mapping) else '-'} .. "
            f"{span.get('to') if isinstance(span, Mapping) else '-'})",
            {k: window.get(k) for k in ("earliest", "latest", "gaps", "gtid")})
    return text
