#!/usr/bin/env bash
# Runs every cargo-fuzz target under fuzz/ for a bounded time and fails on any crash,
# printing the reproducer. scripts/test.sh (and so CI) runs it after the tests.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     default: 20 s each, every target
#   FUZZ_BUILD_ONLY=1 scripts/fuzz.sh                     builds the targets and stops
#
# Installs cargo-fuzz (pinned) into .cargo-home/bin if it is not there. libFuzzer needs
# unstable rustc flags: RUSTC_BOOTSTRAP=1 lets the stable toolchain take them. Without
# unsafe code of our own, AddressSanitizer adds little, so it is off unless
# FUZZ_SANITIZER=address. The committed seeds (fuzz/corpus/<target>) are only read;
# what the fuzzer finds goes to fuzz/target/corpus/<target>, crashes to fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=lib.sh source-path=SCRIPTDIR
source scripts/lib.sh
cargo_on_path

CARGO_FUZZ_VERSION=0.13.2
seconds=${1:-20}
shift || true
[[ $seconds =~ ^[1-9][0-9]*$ ]] || die "usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]"
sanitizer=${FUZZ_SANITIZER:-none}

targets=("$@")
if ((${#targets[@]} == 0)); then
  for f in fuzz/fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi

ensure_cargo_fuzz() {
  local bin=$REPO_ROOT/.cargo-home/bin
  if [[ $("$bin/cargo-fuzz" --version 2>/dev/null) != "cargo-fuzz $CARGO_FUZZ_VERSION" ]]; then
    timed "installing cargo-fuzz $CARGO_FUZZ_VERSION into $bin" \
      cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" \
      --root "$REPO_ROOT/.cargo-home"
  fi
  export PATH="$bin:$PATH"
}
with_install_lock ensure_cargo_fuzz

export RUSTC_BOOTSTRAP=1
# The config target writes its scratch .env file here.
export TMPDIR=$REPO_ROOT/fuzz/target/tmp
mkdir -p "$TMPDIR" fuzz/target/logs

cargo fmt --manifest-path fuzz/Cargo.toml --all -- --check

start=$SECONDS
timed "cargo fuzz build --sanitizer $sanitizer ($(cargo --version))" \
  cargo fuzz build --sanitizer "$sanitizer"
build_seconds=$((SECONDS - start))
if [[ ${FUZZ_BUILD_ONLY:-0} == 1 ]]; then
  log "fuzz targets built in ${build_seconds}s"
  exit 0
fi

summaries=()
failed=()
for target in "${targets[@]}"; do
  work=fuzz/target/corpus/$target
  logfile=fuzz/target/logs/$target.log
  mkdir -p "$work" "fuzz/artifacts/$target"
  log "fuzzing $target for ${seconds}s"
  rc=0
  cargo fuzz run --sanitizer "$sanitizer" "$target" "$work" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$logfile" 2>&1 || rc=$?
  # The log holds the failing input's bytes: read it as text (grep -a).
  runs=$(awk '/^stat::number_of_executed_units/ { n = $NF } END { print n + 0 }' "$logfile")
  corpus=$(grep -aEo 'corp: [0-9]+' "$logfile" | tail -n 1 | grep -Eo '[0-9]+' || echo 0)
  crashes=$(grep -ac 'Test unit written to' "$logfile" || true)
  if ((rc != 0 && crashes == 0)); then crashes=1; fi
  summaries+=("$(printf 'fuzz %-13s %10s runs, corpus %5s inputs, %s crashes' \
    "$target:" "$runs" "$corpus" "$crashes")")
  if ((rc != 0)); then
    failed+=("$target")
    log "fuzz target $target failed (exit $rc); its log: $logfile"
    # The panic's message, else (a timeout, out of memory) the end of the log.
    if grep -aq 'panicked at' "$logfile"; then
      awk '/panicked at/ { p = 1 } /^stack backtrace:/ { p = 0 } p' "$logfile" | head -n 20 >&2
    else
      grep -av '^ *[0-9]*: \|^ *at ' "$logfile" | tail -n 30 >&2
    fi
    grep -ah 'Test unit written to' "$logfile" | sed 's/^.*Test unit written to /reproducer: /' >&2 || true
    log "reproduce with: PATH=\$PWD/.cargo-home/bin:\$PATH RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer $sanitizer $target REPRODUCER"
  fi
done

printf '%s\n' "${summaries[@]}"
printf 'fuzz: %d targets, %d s each, build %d s, total %d s\n' \
  "${#targets[@]}" "$seconds" "$build_seconds" "$((SECONDS - start))"
if ((${#failed[@]} > 0)); then
  die "fuzz targets with crashes: ${failed[*]}"
fi
