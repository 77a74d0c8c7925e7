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

install_venv() {  # install_venv NAME PYTHON_VERSION IMPORT_NAME PIP_SPEC
  local venv=".standins/$1"
  "$venv/bin/python" -c "import $3" 2>/dev/null && return 0
  local py
  py=$(find_python "$2")
  if [ -z "$py" ]; then
    echo "standins: no Python $2 found for $4" >&2
    return 0
  fi
  "$py" -m venv "$venv" && "$venv/bin/pip" install -q "$4" 2>>.standins/install.log \
    || echo "standins: $4 install FAILED (see .standins/install.log)" >&2
}

install_venv mongo-venv 3.13 mongoeco 'mongoeco[wire]==4.11.0'
install_venv arcade-venv 3.12 arcadedb_embedded 'arcadedb-embedded==26.10.2.post1'
exit 0
