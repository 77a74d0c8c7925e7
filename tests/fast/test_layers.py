"""The fast layer holds what needs no server: a test there that reaches for one fails
loudly (issue 22, item 2) instead of quietly making `pytest -m fast` take minutes."""

from __future__ import annotations

import socket
import subprocess

import pytest

from tests.conftest import NotFast


def test_a_fast_test_cannot_reach_a_server_or_start_a_process(
        request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("fast") is not None
    with pytest.raises(NotFast, match="opens a connection"):
        socket.create_connection(("127.0.0.1", 6379), timeout=1)
    with pytest.raises(NotFast, match="starts a process"):
        subprocess.run(["redis-server", "--version"], check=False)


def test_slow_tests_are_never_fast(request: pytest.FixtureRequest) -> None:
    items = [i for i in request.session.items if i.get_closest_marker("slow")]
    assert not [i.nodeid for i in items if i.get_closest_marker("fast")]
