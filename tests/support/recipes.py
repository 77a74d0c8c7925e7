"""The README's by-hand restore recipes, read from the README itself and filled in."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def recipes() -> list[str]:
    section = README.read_text().split("## Restoring by hand", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```sh\n(.*?)^```", section, flags=re.S | re.M)


def fill(script: str, **values: str) -> str:
    for name, value in values.items():
        script, n = re.subn(rf"^{name}=\S+", f"{name}={value}", script, flags=re.M)
        assert n == 1, name
    return script
