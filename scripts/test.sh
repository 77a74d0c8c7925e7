#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs uv and the locked dependencies,
# starts every database server the tests use that is not answering, then runs pytest.
# Usage: ./scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m[test.sh]\033[0m %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# --- uv and the locked dependencies -----------------------------------------------------
if ! command -v uv >/dev/null 2>&1; then
  log "installing uv from PyPI"
  python3 -m pip install --quiet --disable-pip-version-check uv \
    || python3 -m pip install --quiet --user --break-system-packages uv
  export PATH="$HOME/.local/bin:$PATH"
fi
log "syncing locked dependencies ($(uv --version))"
uv sync --frozen --quiet

# --- database servers (see ../shared/SERVICES.md) ---------------------------------------
need_pkgs=()
command -v pg_dump >/dev/null 2>&1 || need_pkgs+=(postgresql postgresql-client)
command -v redis-server >/dev/null 2>&1 || need_pkgs+=(redis-server redis-tools)
command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || need_pkgs+=(mariadb-server mariadb-client)
# stock `age` and `zstd` prove encrypted backups open without Safehold (README recipe)
command -v age >/dev/null 2>&1 || need_pkgs+=(age)
command -v zstd >/dev/null 2>&1 || need_pkgs+=(zstd)
command -v ssh-keygen >/dev/null 2>&1 || need_pkgs+=(openssh-client)
# the README's recipes read manifests with jq
command -v jq >/dev/null 2>&1 || need_pkgs+=(jq)
# the web page is tested in a real browser: Debian's chromium, driven by Playwright
command -v chromium >/dev/null 2>&1 || need_pkgs+=(chromium)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]} with apt"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

wait_for() {  # wait_for NAME CMD...
  local name=$1; shift
  for _ in $(seq 1 60); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  log "ERROR: $name did not come up"; return 1
}

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  log "starting PostgreSQL"
  as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start \
    || as_root service postgresql start
  wait_for PostgreSQL pg_isready -q -h 127.0.0.1 -p 5432
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  log "starting Redis"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for Redis redis-cli -h 127.0.0.1 -p 6379 ping
fi
if ! mariadb-admin ping >/dev/null 2>&1; then
  log "starting MariaDB"
  as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd \
    || as_root service mariadb start
  wait_for MariaDB mariadb-admin ping
fi

# The tests connect as the local superuser `postgres` over TCP (trust auth on these
# machines); a new contributor's machine may use peer/md5 for TCP: allow it for loopback.
if ! psql -h 127.0.0.1 -U postgres -tAc 'select 1' >/dev/null 2>&1; then
  log "PostgreSQL refuses postgres@127.0.0.1; set SAFEHOLD_TEST_PGUSER or allow trust on loopback"
  exit 1
fi

# --- stand-ins for MongoDB and Neo4j (own venvs under .standins/) ---------------------------
log "installing the MongoDB/Neo4j stand-ins if missing"
./scripts/standins.sh

# --- the suite ----------------------------------------------------------------------------
log "running pytest"
exec uv run --frozen pytest "$@"
