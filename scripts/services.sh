#!/usr/bin/env bash
# Starts and stops the real services that tests, the demo and benchmarks use, as plain
# background processes on 127.0.0.1: PostgreSQL (throw-away cluster, wal_level=logical),
# SecantusDB (MongoDB wire protocol) and tansu (Kafka API). Each state dir
# (${SERVICES_DIR:-<repo>/.services/default}) is one independent set, on its own ports.
#
#   services.sh up [pg] [mongo] [kafka]   start (default: all); prints `export` lines
#   services.sh env | status | down
#     status and down without SERVICES_DIR act on every set this checkout started (under
#     <repo>/.services/, and those started elsewhere, which are listed there); down leaves
#     alone a set whose owner (SERVICES_OWNER_PID at `up`: test.sh, bench.sh, a test) runs.
#   services.sh pg-stop [fast|immediate] | pg-start | pg-restart [fast|immediate]
#   services.sh freeze mongo|kafka | thaw mongo|kafka | kill-mongo | start-mongo
#
# Use: eval "$(scripts/services.sh up)"; every message other than the exports goes to stderr.
# MONGO_PERSISTENT=1 keeps MongoDB data on disk (with --sync-on-commit) for tests that kill it.
# KAFKA_ADVERTISED_PORT=N makes the broker advertise 127.0.0.1:N instead of its own port (a
# proxy in front of it: clients connect to the address the broker advertises).
set -euo pipefail

# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SELF="$REPO_ROOT/scripts/services.sh"
STATE=$(realpath -m "${SERVICES_DIR:-$REPO_ROOT/.services/default}")
SETS_ROOT=$(realpath -m "$REPO_ROOT/.services")
ELSEWHERE="$SETS_ROOT/.elsewhere" # state dirs outside SETS_ROOT that this checkout started
PORT_LOCK=/tmp/activity-services-ports.lock # ports are machine-wide: one lock for all
WAIT_SECS=${SERVICES_WAIT_SECS:-60}
PG_USER=postgres
PG_DB=activity

# --- small helpers --------------------------------------------------------------------

state_get() { cat "$STATE/$1" 2>/dev/null || true; }
state_set() { printf '%s\n' "$2" >"$STATE/$1"; }

init_state() {
  mkdir -p "$STATE"
  touch "$STATE/.services-state" # marks the folder as ours, so `down` may delete it
  if [[ -n ${SERVICES_OWNER_PID:-} ]]; then state_set owner.pid "$SERVICES_OWNER_PID"; fi
  case $STATE in
    "$SETS_ROOT"/*) ;;
    *)
      mkdir -p "$SETS_ROOT"
      grep -qxF "$STATE" "$ELSEWHERE" 2>/dev/null || printf '%s\n' "$STATE" >>"$ELSEWHERE"
      ;;
  esac
}

# known_sets: prints the state dir of every set this checkout started and has not stopped.
known_sets() {
  local d
  {
    for d in "$SETS_ROOT"/*/; do
      [[ -f $d/.services-state ]] && realpath -m "$d"
    done
    if [[ -f $ELSEWHERE ]]; then
      while IFS= read -r d; do
        [[ -n $d && -f $d/.services-state ]] && printf '%s\n' "$d"
      done <"$ELSEWHERE"
    fi
  } | sort -u
}

# owner_running: the set in $STATE was started for a process (SERVICES_OWNER_PID) still running.
owner_running() {
  local pid
  pid=$(state_get owner.pid)
  alive "$pid"
}

# alive PID: the process exists and is not a zombie.
alive() {
  local st
  [[ -n $1 && -r /proc/$1/stat ]] || return 1
  st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [[ -n $st && $st != Z ]]
}

# pid_of NAME: prints the pid of this state dir's running service NAME (pg|mongo|kafka).
pid_of() {
  local pid pattern
  pid=$(state_get "$1.pid")
  case $1 in
    pg) pattern=postgres ;;
    mongo) pattern=secantusd ;;
    kafka) pattern=tansu ;;
  esac
  alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$pattern" || return 1
  printf '%s\n' "$pid"
}

# pick_port NAME: the recorded port if it is still free, else a random free one
# (below the ephemeral range, so client connections do not take it meanwhile).
pick_port() {
  python3 - "$1" "$(state_get "$1.port")" <<'EOF'
import random, socket, sys

def free(p):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like servers do: TIME_WAIT is fine
    try:
        s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
    finally:
        s.close()

name, old = sys.argv[1], sys.argv[2]
if old.isdigit():
    if free(int(old)):
        print(old)
        sys.exit(0)
    print(f"warning: {name}'s port {old} is taken now: {name} moves to another port", file=sys.stderr)
for _ in range(500):
    p = random.randint(20000, 32000)
    if free(p):
        print(p)
        sys.exit(0)
sys.exit("no free port found")
EOF
}

port_lock() {
  exec 9>>"$PORT_LOCK"
  chmod a+rw "$PORT_LOCK" 2>/dev/null || true
  flock -w 300 9 || die "timed out waiting for $PORT_LOCK"
}
port_unlock() { exec 9>&-; }

tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

fail_with_log() { # fail_with_log NAME LOGFILE MESSAGE
  log "error: $1: $3"
  if [[ -f $2 ]]; then
    log "--- last lines of $2 ---"
    tail -n 30 "$2" >&2
  fi
  exit 1
}

# wait_tcp NAME PORT LOGFILE: waits until the service's port accepts connections.
wait_tcp() {
  local name=$1 port=$2 logf=$3 deadline=$((SECONDS + WAIT_SECS))
  until tcp_open "$port"; do
    # Only alive: until the launcher's exec, its command line is still bash's.
    alive "$(state_get "$name.pid")" || fail_with_log "$name" "$logf" "the process exited during start"
    ((SECONDS < deadline)) || fail_with_log "$name" "$logf" "no answer on port $port after ${WAIT_SECS}s"
    sleep 0.1
  done
}

# launch NAME DIR LOGFILE CMD...: starts CMD in DIR, detached in its own session.
launch() {
  local name=$1 dir=$2 logf=$3
  shift 3
  (cd "$dir" && exec setsid "$@" </dev/null >>"$logf" 2>&1 9>&-) &
  state_set "$name.pid" "$!"
}

# stop_pid NAME: TERM (after CONT, in case it is frozen), up to ~5 s, then KILL.
stop_pid() {
  local pid i
  if pid=$(pid_of "$1"); then
    kill -CONT "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      alive "$pid" || break
      sleep 0.1
    done
    if alive "$pid"; then
      log "$1 (pid $pid) ignored TERM for 5 s: sending KILL"
      kill -KILL "$pid" 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do
        alive "$pid" || break
        sleep 0.1
      done
    fi
    alive "$pid" && log "warning: $1 (pid $pid) did not stop"
  fi
  rm -f "$STATE/$1.pid"
}

# --- PostgreSQL -----------------------------------------------------------------------

as_pg() { # runs a command as the postgres user (root may not run the server)
  if ((EUID == 0)); then
    (cd / && runuser -u "$PG_USER" -- "$@" 9>&-)
  else
    (cd / && "$@" 9>&-)
  fi
}

pg_dir() { state_get pg.dir; } # throw-away folder: data/, postgres.log, unix sockets

pg_psql() { "$PGBIN/psql" -X -q -h 127.0.0.1 -p "$(state_get pg.port)" -U "$PG_USER" "$@"; }

pg_init() {
  local d
  d=$(mktemp -d /tmp/activity-pg.XXXXXX)
  touch "$d/.activity-pg"
  if ((EUID == 0)); then chown -R "$PG_USER:" "$d"; fi
  state_set pg.dir "$d"
  ln -sfn "$d/postgres.log" "$STATE/postgres.log"
  run_quiet as_pg "$PGBIN/initdb" -D "$d/data" -U "$PG_USER" --auth=trust -E UTF8 --no-sync ||
    die "initdb failed"
}

pg_write_conf() { # our settings, in a file that postgresql.conf includes
  local d=$1 port=$2
  cat >"$d/data/activity.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$d'
wal_level = logical
max_replication_slots = 20
max_wal_senders = 20
EOF
  if ((EUID == 0)); then chown "$PG_USER:" "$d/data/activity.conf"; fi
  grep -q "^include_if_exists = 'activity.conf'" "$d/data/postgresql.conf" ||
    printf "include_if_exists = 'activity.conf'\n" >>"$d/data/postgresql.conf"
}

pg_start() { # starts the recorded cluster on its recorded port (or a new one if taken)
  local d port pid
  d=$(pg_dir)
  [[ -n $d && -f $d/data/PG_VERSION ]] || die "no PostgreSQL cluster in $STATE (run: services.sh up pg)"
  port_lock
  port=$(pick_port pg)
  state_set pg.port "$port"
  pg_write_conf "$d" "$port"
  if ! as_pg "$PGBIN/pg_ctl" -D "$d/data" -l "$d/postgres.log" -w -t "$WAIT_SECS" start >/dev/null 2>&1; then
    port_unlock
    fail_with_log pg "$d/postgres.log" "pg_ctl start failed"
  fi
  port_unlock
  pid=$(head -n 1 "$d/data/postmaster.pid")
  state_set pg.pid "$pid"
  local deadline=$((SECONDS + WAIT_SECS))
  until "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$port" -U "$PG_USER" -d postgres; do
    ((SECONDS < deadline)) || fail_with_log pg "$d/postgres.log" "pg_isready failed after ${WAIT_SECS}s"
    sleep 0.1
  done
}

pg_stop() { # pg_stop [fast|immediate|smart]
  local mode=${1:-fast} d
  d=$(pg_dir)
  if [[ -n $d && -f $d/data/postmaster.pid ]]; then
    as_pg "$PGBIN/pg_ctl" -D "$d/data" -m "$mode" -w -t "$WAIT_SECS" stop >/dev/null 2>&1 ||
      log "warning: pg_ctl stop -m $mode failed"
  fi
  stop_pid pg # only acts if the postmaster is somehow still there
}

pg_up() {
  local d
  ensure_pg_server
  state_set pg.bin "$PGBIN"
  if pid_of pg >/dev/null; then return 0; fi
  d=$(pg_dir)
  if [[ -z $d || ! -f $d/data/PG_VERSION ]]; then
    log "PostgreSQL: new cluster"
    pg_init
  fi
  pg_start
  if [[ $(pg_psql -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'") != 1 ]]; then
    pg_psql -d postgres -c "CREATE DATABASE $PG_DB" >/dev/null
  fi
}

# --- SecantusDB (MongoDB wire protocol) ----------------------------------------------

mongo_start() {
  local port mode args
  mode=${MONGO_PERSISTENT:-$(state_get mongo.persistent)}
  mode=${mode:-0}
  state_set mongo.persistent "$mode"
  args=(--host 127.0.0.1 --log-level WARNING --enable-test-commands)
  if [[ $mode == 1 ]]; then
    mkdir -p "$STATE/mongo-data"
    args+=(--storage-path "$STATE/mongo-data" --sync-on-commit)
  else
    args+=(--storage-path :memory:)
  fi
  mkdir -p "$STATE/mongo-run" "$STATE/mongo-tmp"
  : >"$STATE/mongo-run/secantusd.toml" # explicit empty config: no auto-discovered one
  port_lock
  port=$(pick_port mongo)
  state_set mongo.port "$port"
  launch mongo "$STATE/mongo-run" "$STATE/mongo.log" \
    env TMPDIR="$STATE/mongo-tmp" "$VENV_DIR/bin/secantusd-py" \
    --config "$STATE/mongo-run/secantusd.toml" --port "$port" "${args[@]}"
  wait_tcp mongo "$port" "$STATE/mongo.log"
  port_unlock
  # A real round trip, not just an open port.
  run_quiet "$VENV_DIR/bin/python" -c '
import sys, pymongo
c = pymongo.MongoClient(sys.argv[1], serverSelectionTimeoutMS=int(sys.argv[2]) * 1000)
c.admin.command("ping")' "$(mongo_uri)" "$WAIT_SECS" ||
    fail_with_log mongo "$STATE/mongo.log" "ping failed"
}

mongo_uri() { printf 'mongodb://127.0.0.1:%s/?retryWrites=false&heartbeatFrequencyMS=500' "$(state_get mongo.port)"; }

mongo_up() {
  pid_of mongo >/dev/null && return 0
  mongo_start
}

# --- tansu (Kafka API) ----------------------------------------------------------------

kafka_up() {
  local port bin
  pid_of kafka >/dev/null && return 0
  bin=$(tansu_bin)
  [[ -x $bin ]] || die "tansu binary not found at $bin"
  state_set tansu.bin "$bin"
  # Start from an empty folder: tansu reads a .env file from its working directory.
  rm -rf "$STATE/kafka-run"
  mkdir -p "$STATE/kafka-run"
  port_lock
  port=$(pick_port kafka)
  state_set kafka.port "$port"
  launch kafka "$STATE/kafka-run" "$STATE/kafka.log" \
    env -u SCHEMA_REGISTRY -u OTEL_EXPORTER_OTLP_ENDPOINT -u CLUSTER_ID "$bin" broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:${KAFKA_ADVERTISED_PORT:-$port}" \
    --storage-engine memory://tansu/
  wait_tcp kafka "$port" "$STATE/kafka.log"
  port_unlock
}

# --- commands -------------------------------------------------------------------------

export_line() { # export NAME='value' (single-quoted for eval)
  local v=${2//\'/\'\\\'\'}
  printf "export %s='%s'\n" "$1" "$v"
}

cmd_env() {
  export_line SERVICES_DIR "$STATE"
  export_line SERVICES_SCRIPT "$SELF"
  if pid_of pg >/dev/null; then
    export_line POSTGRES_HOST 127.0.0.1
    export_line POSTGRES_PORT "$(state_get pg.port)"
    export_line POSTGRES_USER "$PG_USER"
    export_line POSTGRES_PASSWORD ""
    export_line POSTGRES_DB "$PG_DB"
    export_line PGBIN "$(state_get pg.bin)"
    export_line PGDATA_DIR "$(pg_dir)/data"
  fi
  if pid_of mongo >/dev/null; then
    export_line MONGODB_URI "$(mongo_uri)"
    export_line MONGODB_DB activity_read
  fi
  if pid_of kafka >/dev/null; then
    export_line KAFKA_BROKERS "127.0.0.1:$(state_get kafka.port)"
    export_line TANSU_BIN "$(state_get tansu.bin)"
  fi
}

cmd_up() {
  local want=("$@") s
  ((${#want[@]})) || want=(pg mongo kafka)
  for s in "${want[@]}"; do
    case $s in
      pg | mongo | kafka) ;;
      *) die "unknown service '$s' (pg, mongo, kafka)" ;;
    esac
  done
  init_state
  command -v python3 >/dev/null || with_install_lock apt_ensure python3 # pick_port uses it
  if [[ " ${want[*]} " == *" pg "* ]]; then with_install_lock ensure_pg_server; fi
  if [[ " ${want[*]} " == *" mongo "* || " ${want[*]} " == *" kafka "* ]]; then
    with_install_lock ensure_venv
  fi
  for s in "${want[@]}"; do
    "${s}_up"
  done
  cmd_env
}

cmd_down() {
  local d
  [[ -d $STATE ]] || return 0
  PGBIN=$(state_get pg.bin)
  d=$(pg_dir)
  if [[ -n $PGBIN ]]; then pg_stop fast; fi
  stop_pid mongo
  stop_pid kafka
  if [[ -n $d && -f $d/.activity-pg ]]; then rm -rf "$d"; fi
  if [[ -f $STATE/.services-state ]]; then rm -rf "$STATE"; fi
  if [[ -f $ELSEWHERE ]] && grep -qxF "$STATE" "$ELSEWHERE"; then
    grep -vxF "$STATE" "$ELSEWHERE" >"$ELSEWHERE.new" || true
    mv "$ELSEWHERE.new" "$ELSEWHERE"
  fi
}

# down without SERVICES_DIR: stops every set this checkout started, except those
# whose owner still runs (it stops them itself); says what it did with each.
cmd_down_all() {
  local sets d pid stopped=0
  mapfile -t sets < <(known_sets)
  if ((${#sets[@]} == 0)); then
    log "nothing to stop: no services started from this checkout (none listed under $SETS_ROOT)"
    return 0
  fi
  for d in "${sets[@]}"; do
    pid=$(STATE=$d state_get owner.pid)
    if (STATE=$d owner_running); then
      log "left running: $d (in use by pid $pid, which stops it; to stop it now: SERVICES_DIR=$d $SELF down)"
      continue
    fi
    (
      STATE=$d
      cmd_down
    )
    log "stopped: $d"
    stopped=$((stopped + 1))
  done
  log "$stopped of ${#sets[@]} service sets stopped"
}

# status without SERVICES_DIR: every set this checkout started, and how to stop it.
cmd_status_all() {
  local sets d
  mapfile -t sets < <(known_sets)
  if ((${#sets[@]} == 0)); then
    printf 'no services started from this checkout (none listed under %s); start some: eval "$(%s up)"\n' \
      "$SETS_ROOT" "$SELF"
    return 0
  fi
  for d in "${sets[@]}"; do
    (
      STATE=$d
      cmd_status
      if owner_running; then printf 'owner  pid %s (running)\n' "$(state_get owner.pid)"; fi
    )
    printf 'stop:  SERVICES_DIR=%s %s down\n\n' "$d" "$SELF"
  done
  printf 'stop them all: %s down\n' "$SELF"
}

cmd_status() {
  local s pid extra
  printf 'state dir: %s\n' "$STATE"
  for s in pg mongo kafka; do
    extra=""
    case $s in
      pg) extra=" data $(pg_dir)/data" ;;
      mongo) [[ $(state_get mongo.persistent) == 1 ]] && extra=" storage $STATE/mongo-data" ;;
    esac
    if pid=$(pid_of "$s"); then
      if [[ $(sed 's/.*) //' "/proc/$pid/stat" | cut -d' ' -f1) == T ]]; then extra+=" (frozen)"; fi
      printf '%-6s running  pid %-8s port %s%s\n' "$s" "$pid" "$(state_get "$s.port")" "$extra"
    else
      printf '%-6s stopped\n' "$s"
    fi
  done
}

need_state() { [[ -f $STATE/.services-state ]] || die "no services in $STATE (run: services.sh up)"; }

pg_mode() {
  case ${1:-fast} in
    fast | immediate | smart) printf '%s\n' "${1:-fast}" ;;
    *) die "unknown shutdown mode '$1' (fast, immediate, smart)" ;;
  esac
}

signal_service() { # signal_service SIGNAL NAME
  local pid
  case $2 in mongo | kafka) ;; *) die "usage: services.sh freeze|thaw mongo|kafka" ;; esac
  pid=$(pid_of "$2") || die "$2 is not running in $STATE"
  kill -"$1" "$pid"
}

main() {
  local cmd=${1:-} mode pid
  shift || true
  case $cmd in
    up) cmd_up "$@" ;;
    down) if [[ -n ${SERVICES_DIR:-} ]]; then cmd_down; else cmd_down_all; fi ;;
    env) cmd_env ;;
    status) if [[ -n ${SERVICES_DIR:-} ]]; then cmd_status; else cmd_status_all; fi ;;
    pg-stop | pg-start | pg-restart)
      need_state
      PGBIN=$(state_get pg.bin)
      [[ -n $PGBIN ]] || die "PostgreSQL was never started in $STATE"
      mode=$(pg_mode "${1:-}")
      case $cmd in
        pg-stop) pg_stop "$mode" ;;
        pg-start) pid_of pg >/dev/null || pg_start ;;
        pg-restart)
          pg_stop "$mode"
          pg_start
          ;;
      esac
      ;;
    freeze) signal_service STOP "${1:-}" ;;
    thaw) signal_service CONT "${1:-}" ;;
    kill-mongo)
      need_state
      if pid=$(pid_of mongo); then
        kill -KILL "$pid"
        while alive "$pid"; do sleep 0.05; done
      fi
      rm -f "$STATE/mongo.pid"
      ;;
    start-mongo)
      need_state
      [[ -n $(state_get mongo.port) ]] || die "MongoDB was never started in $STATE"
      mongo_up
      ;;
    *)
      sed -n '2,18p' "$SELF" | sed 's/^# \{0,1\}//' >&2
      exit 2
      ;;
  esac
}

main "$@"
