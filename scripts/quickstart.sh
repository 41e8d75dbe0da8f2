#!/usr/bin/env bash
# Runs the README's quick start as written ("Then, in this folder:", the first
# `sh` block after it), line by line, in a fresh clone of this checkout's HEAD,
# then checks that `event-processor` is found on PATH, that `status` answered
# with the seed's read models and that the demo's services were stopped.
# scripts/test.sh runs it after the tests. To stay within the suite's time, the
# clone shares this checkout's Python venv (VENV_DIR) and cargo target folder
# (CARGO_TARGET_DIR) and builds the debug binary (DEMO_PROFILE=dev); every
# command of the block is otherwise the README's own.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=lib.sh source-path=SCRIPTDIR
source scripts/lib.sh
cargo_on_path

repo=$PWD
work=$(mktemp -d "${TMPDIR:-/tmp}/quickstart.XXXXXX")
clone=$work/activity-event-processor
cleanup() {
  # Whatever happened, the clone's services must not outlive the check.
  if [[ -d $clone/.services ]]; then
    for dir in "$clone"/.services/*/; do
      SERVICES_DIR=${dir%/} bash "$clone/scripts/services.sh" down >/dev/null 2>&1 || true
    done
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# The block: from the first ```sh after the line "Then, in this folder:" to its ```.
block=$(awk '/^Then, in this folder:/ { armed = 1; next }
             armed && /^```sh$/ { inside = 1; next }
             inside && /^```$/ { exit }
             inside { print }' README.md)
[[ -n $block ]] || die "README.md has no \`sh\` block after \"Then, in this folder:\""
log "the README's quick start:"
printf '  %s\n' "$block" | sed 's/^  $//' >&2

git clone --quiet --no-hardlinks "$repo" "$clone"
log "cloned $(git -C "$clone" rev-parse --short HEAD) into $clone"

script=$work/quickstart-block.sh
{
  echo 'set -euo pipefail'
  printf '%s\n' "$block"
  # What the user would type next: where is the binary now?
  echo 'echo "on PATH: $(command -v event-processor)"'
} >"$script"

out=$work/quickstart.log
start=$SECONDS
rc=0
(cd "$clone" && env -u SERVICES_DIR -u DATABASE_URL -u MONGODB_URI -u KAFKA_BROKERS \
  VENV_DIR="$VENV_DIR" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}" DEMO_PROFILE=dev \
  bash "$script") >"$out" 2>&1 || rc=$?
if ((rc != 0)); then
  tail -n 60 "$out" >&2
  die "the README's quick start failed (exit $rc) after $(elapsed $((SECONDS - start)))"
fi

problems=()
grep -qx "on PATH: $clone/bin/event-processor" "$out" ||
  problems+=("event-processor is not on PATH at the end (want $clone/bin/event-processor)")
# `event-processor status` after the demo: the seed's read models are there.
grep -Eq '^read models: [0-9]+ users?, [0-9]+ activit' "$out" ||
  problems+=("\`event-processor status\` did not report the read models")
if SERVICES_DIR=$clone/.services/demo bash "$clone/scripts/services.sh" status 2>&1 | grep -q 'running'; then
  problems+=("\`scripts/services.sh down\` left the demo's services running")
fi
if ((${#problems[@]})); then
  tail -n 60 "$out" >&2
  for p in "${problems[@]}"; do log "error: $p"; done
  exit 1
fi
log "quick start: ok in $(elapsed $((SECONDS - start))) (event-processor on PATH, status answered, services stopped)"
