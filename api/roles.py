"""Roles, ordered: a higher role includes the lower ones."""

from __future__ import annotations

import enum


class Role(enum.IntEnum):
    PUBLIC = 0
    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3
