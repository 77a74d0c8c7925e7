#!/usr/bin/env bash
# Run Safehold for real: API + worker in one process on ./safehold.toml, or the built-in
# default config (target `example`: a bundled SQLite database in ./data/example.db, backups
# in ./backups). Starts a private redis-server when none answers on 127.0.0.1:6379.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check uv \
    || python3 -m pip install --quiet --user --break-system-packages uv
  export PATH="$HOME/.local/bin:$PATH"
fi
# one environment with the tests' (a --no-dev sync here would remove pytest, and every
# later `uv run` would put 30 packages back)
uv sync --frozen --quiet
exec uv run --frozen safehold "$@" run
