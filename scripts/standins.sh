#!/usr/bin/env bash
# Install the stand-in servers the MongoDB and Neo4j tests use (../shared/SERVICES.md), each
# in its own venv under .standins/ (outside the project's environment):
#   mongoeco's wire server (needs Python >= 3.13) and ArcadeDB's Bolt endpoint (bundled JRE).
# Idempotent; prints what it could not install and carries on (the tests then skip loudly).
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p .standins
PYENV_ROOT=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")

find_python() {  # find_python 3.13 -> a python of that minor version, or nothing
  for c in "$PYENV_ROOT/versions/$1".*/bin/python "$(command -v "python$1" 2>/dev/null)"; do
    [ -x "$c" ] && { echo "$c"; return 0; }
  done
  command -v uv >/dev/null && uv python find "$1" 2>/dev/null && return 0
  uv python install "$1" >/dev/null 2>&1 && uv python find "$1" 2>/dev/null
}

if [ ! -x .standins/mongo-venv/bin/python ] || ! .standins/mongo-venv/bin/python -c 'import mongoeco' 2>/dev/null; then
  py=$(find_python 3.13)
  if [ -n "$py" ]; then
    "$py" -m venv .standins/mongo-venv && .standins/mongo-venv/bin/pip install -q 'mongoeco[wire]==4.11.0' 2>>.standins/install.log \
      || echo "standins: mongoeco install FAILED" >&2
  else
    echo "standins: no Python 3.13 found for mongoeco" >&2
  fi
fi
if [ ! -x .standins/arcade-venv/bin/python ] || ! .standins/arcade-venv/bin/python -c 'import arcadedb_embedded' 2>/dev/null; then
  py=$(find_python 3.12)
  if [ -n "$py" ]; then
    "$py" -m venv .standins/arcade-venv && .standins/arcade-venv/bin/pip install -q 'arcadedb-embedded==26.10.2.post1' 2>>.standins/install.log \
      || echo "standins: arcadedb-embedded install FAILED" >&2
  else
    echo "standins: no Python 3.12 found for arcadedb-embedded" >&2
  fi
fi
exit 0
