"""An idle MySQL/MariaDB server writes no binlog: the window's end comes from its
streamer's word (Redis state) only when that word is about the archive's own end and
stretch — never a stale or foreign one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from shared.binlog_window import Run, Said, _extended, said_of

T0 = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)
RUN = Run("1:binlog:5", 1 << 32, (1 << 32) | 900, T0, {1: 5})


def test_the_streamers_word_carries_the_window_on() -> None:
    said = said_of({"identity": "1:binlog:5", "shipped_lsn": "000001:900",
                    "covers_until": "2026-12-07T10:05:00.000Z"})
    assert said == Said("1:binlog:5", (1 << 32) | 900, T0 + timedelta(minutes=5))
    assert _extended([RUN], said)[-1].covers_until == T0 + timedelta(minutes=5)


def test_a_word_about_another_end_or_stretch_or_an_older_instant_is_not_taken() -> None:
    later = T0 + timedelta(minutes=5)
    for said in (Said("1:binlog:5", (1 << 32) | 800, later),  # shipped more since
                 Said("1:binlog:6", (1 << 32) | 900, later),  # another stretch
                 Said("1:binlog:5", (1 << 32) | 900, T0 - timedelta(minutes=1))):
        assert _extended([RUN], said) == [RUN], said
    assert _extended([], Said("1:binlog:5", 900, later)) == []
    for state in ({}, {"identity": "x", "shipped_lsn": "junk", "covers_until": "2026"},
                  {"identity": "", "shipped_lsn": "000001:900",
                   "covers_until": "2026-12-07T10:05:00Z"},
                  {"identity": "x", "shipped_lsn": "000001:900", "covers_until": ""}):
        assert said_of(state) is None, state
