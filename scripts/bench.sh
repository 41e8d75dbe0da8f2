#!/usr/bin/env bash
# The benchmark in one command: installs prerequisites, builds the release binaries
# (`event-processor` and the benchmark's own `event-processor-bench`, crate bench/),
# starts its own fresh services (PostgreSQL, MongoDB-wire SecantusDB, Kafka-API tansu)
# in a private state dir, runs `event-processor-bench` and stops the services again.
# Results: bench/results/<timestamp>.json, -latency.svg, -throughput.svg.
# Arguments go to the benchmark, e.g. scripts/bench.sh --events 50000 --compare bench/results/X.json
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=lib.sh source-path=SCRIPTDIR
source scripts/lib.sh
cargo_on_path

banner "setup (scripts/setup.sh --bench)"
bash scripts/setup.sh --bench

banner "building event-processor and event-processor-bench (release)"
cargo build --release --locked --workspace

export SERVICES_DIR=${BENCH_SERVICES_DIR:-$PWD/.services/bench-$$}
export SERVICES_OWNER_PID=$$ # `services.sh down` without SERVICES_DIR leaves them to us
cleanup() {
  banner "stopping services ($SERVICES_DIR)"
  bash scripts/services.sh down || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

banner "starting fresh services ($SERVICES_DIR)"
services_env=$(bash scripts/services.sh up pg mongo kafka)
eval "$services_env"

banner "event-processor-bench $*"
# It measures the event-processor binary beside it (target/release).
target/release/event-processor-bench "$@"
