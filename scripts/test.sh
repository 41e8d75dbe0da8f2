#!/usr/bin/env bash
# The project's test command (also what CI runs): installs prerequisites, starts its own
# services (PostgreSQL, MongoDB-wire SecantusDB, Kafka-API tansu) in a private state dir,
# runs rustfmt, clippy, every test target of the workspace (the product, the benchmark
# in bench/ and the histories in history/; built with the crash points of the
# `failpoints` feature, which tests/fault_matrix.rs needs), the README's quick start in a
# fresh clone (scripts/quickstart.sh) and the fuzz targets (scripts/fuzz.sh, 20 s each),
# and always stops the services at the end.
# Extra arguments go to `cargo test`, e.g. scripts/test.sh -- --nocapture
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=lib.sh source-path=SCRIPTDIR
source scripts/lib.sh
cargo_on_path

banner "setup (scripts/setup.sh --tests)"
bash scripts/setup.sh --tests

# Always a private set of services, so a developer's own (SERVICES_DIR) are left alone.
export SERVICES_DIR=${TEST_SERVICES_DIR:-$PWD/.services/test-$$}
export SERVICES_OWNER_PID=$$ # `services.sh down` without SERVICES_DIR leaves them to us
fuzz_seconds=${FUZZ_SECONDS:-20}
fuzz_build_pid=
fuzz_build_log=$PWD/fuzz/target/build.log
log= # the tests' output, for the closing count
cleanup() {
  if [[ -n $log ]]; then rm -f "$log"; fi
  # The background build is a process group of its own (setsid): stop all of it.
  if [[ -n $fuzz_build_pid ]]; then kill -- "-$fuzz_build_pid" 2>/dev/null || true; fi
  banner "stopping services ($SERVICES_DIR)"
  bash scripts/services.sh down || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

banner "starting services ($SERVICES_DIR)"
services_env=$(bash scripts/services.sh up)
eval "$services_env"
bash scripts/services.sh status

locked=()
if [[ -f Cargo.lock ]]; then locked=(--locked); fi

banner "cargo fmt --all -- --check"
cargo fmt --all -- --check

banner "cargo clippy --workspace --all-targets ${locked[*]} -- -D warnings"
cargo clippy --workspace --all-targets "${locked[@]}" -- -D warnings

# The crash points (src/failpoint.rs) exist only with the `failpoints` feature:
# the tests run with it (tests/fault_matrix.rs needs it), so clippy checks it too.
banner "cargo clippy --workspace --all-targets --features failpoints ${locked[*]} -- -D warnings"
cargo clippy --workspace --all-targets --features failpoints "${locked[@]}" -- -D warnings

banner "the plain build has no crash points"
# Without the feature the `fail` crate is not even in the dependency graph.
if cargo tree "${locked[@]}" --edges normal --prefix none | grep -q '^fail v'; then
  echo "error: the build without --features failpoints depends on the fail crate" >&2
  exit 1
fi
echo "ok: no fail crate without --features failpoints"

# The fuzz targets' instrumented build (a second build of every dependency) runs
# alongside the tests, at the lowest CPU priority: the tests mostly wait on the
# services. The fuzzers themselves run after the tests.
if [[ $fuzz_seconds != 0 ]]; then
  banner "building the fuzz targets in the background (log: $fuzz_build_log)"
  mkdir -p fuzz/target
  FUZZ_BUILD_ONLY=1 setsid nice -n 19 bash scripts/fuzz.sh >"$fuzz_build_log" 2>&1 &
  fuzz_build_pid=$!
fi

# Every test binary runs even when one fails, so one run names every failure. The
# benchmark's test runs the event-processor binary this builds (same target folder).
banner "cargo test --workspace --all-targets --no-fail-fast --features failpoints ${locked[*]} $*"
log=$(mktemp)
cargo test --workspace --all-targets --no-fail-fast --features failpoints "${locked[@]}" "$@" 2>&1 | tee "$log"

# The README's quick start, as written, in a fresh clone (QUICKSTART=0 skips it).
if [[ ${QUICKSTART:-1} != 0 ]]; then
  banner "the README's quick start in a fresh clone (scripts/quickstart.sh)"
  bash scripts/quickstart.sh
fi

# The fuzz targets, a bounded time each (FUZZ_SECONDS, default 20; 0 skips them).
if [[ $fuzz_seconds != 0 ]]; then
  banner "waiting for the fuzz targets' build"
  if ! wait "$fuzz_build_pid"; then
    fuzz_build_pid=
    tail -n 40 "$fuzz_build_log" >&2
    die "building the fuzz targets failed (log: $fuzz_build_log)"
  fi
  fuzz_build_pid=
  banner "scripts/fuzz.sh $fuzz_seconds"
  bash scripts/fuzz.sh "$fuzz_seconds"
fi

# One closing line for the whole run (benches print their own figures last).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i == "passed;") p += $(i - 1); if ($i == "failed;") f += $(i - 1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
