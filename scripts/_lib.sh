# Shared by scripts/demo and scripts/test: a virtualenv with the project installed, and a
# PostgreSQL to talk to. Sourced, not run.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DATALAYER_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

log() { echo "[datalayer] $*" >&2; }

# Create .venv and install the project with its dev extras; reinstall when pyproject.toml
# changes (a stamp holds its hash), so a fresh checkout needs nothing done by hand.
ensure_venv() {
  local want have
  if [ ! -x "$PY" ]; then
    log "creating virtualenv in $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
  want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
  have="$(cat "$VENV/.datalayer-installed" 2>/dev/null || true)"
  if [ "$want" != "$have" ]; then
    log "installing datalayer and its dependencies into $VENV"
    "$PY" -m pip install --quiet --upgrade pip >&2
    "$PY" -m pip install --quiet -e "$ROOT[dev]" >&2
    echo "$want" > "$VENV/.datalayer-installed"
  fi
}

port_open() {  # host port
  "$PY" -c "import sys; from datalayer.devdb import port_open; \
sys.exit(0 if port_open(sys.argv[1], int(sys.argv[2])) else 1)" "$1" "$2"
}

# Echo an admin URL: the server on 127.0.0.1:5432 if one answers, else the embedded one.
local_admin_url() {
  if port_open 127.0.0.1 5432; then
    echo "postgresql://postgres@127.0.0.1:5432/postgres"
  else
    log "nothing answers on 127.0.0.1:5432; starting the embedded development database"
    "$VENV/bin/datalayer" dev-db start
  fi
}

# ensure_database ADMIN_URL NAME: create database NAME next to ADMIN_URL's; echo its URL.
ensure_database() {
  "$PY" - "$1" "$2" <<'PYEOF'
import sys
from urllib.parse import urlsplit, urlunsplit
import psycopg
from psycopg import sql
admin, name = sys.argv[1], sys.argv[2]
with psycopg.connect(admin, autocommit=True) as c:
    if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
print(urlunsplit(urlsplit(admin)._replace(path="/" + name)))
PYEOF
}
