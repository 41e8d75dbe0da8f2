#!/usr/bin/env bash
# The README's main job: set up everything on a fresh Debian machine, build the
# release binary (into ./bin/event-processor), start the services, apply the
# schema, insert the seed events, run the processor until it has caught up, and
# show the read models it built. Safe to run again (a built binary is only
# rebuilt when the sources changed).
# The services stay up afterwards (scripts/services.sh down stops them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=lib.sh source-path=SCRIPTDIR
source scripts/lib.sh
cargo_on_path

banner "setup (scripts/setup.sh)"
bash scripts/setup.sh

# cargo's own progress: the first build compiles every dependency (librdkafka
# from C sources among them) and takes minutes; later runs take seconds.
# DEMO_PROFILE=dev builds the debug binary instead (scripts/quickstart.sh uses it to
# reuse the test build's dependencies).
profile=${DEMO_PROFILE:-release}
case $profile in
  release) profile_dir=release ;;
  dev) profile_dir=debug ;;
  *) die "DEMO_PROFILE $profile is not a profile: give release (the default) or dev" ;;
esac
banner "building event-processor ($profile; the first release build takes 10-20 minutes)"
cargo build --profile "$profile" --locked --bin event-processor
mkdir -p bin
install -m 0755 "${CARGO_TARGET_DIR:-target}/$profile_dir/event-processor" bin/event-processor
bin=$PWD/bin/event-processor

export SERVICES_DIR=${SERVICES_DIR:-$PWD/.services/demo}
banner "starting PostgreSQL and the MongoDB-wire server ($SERVICES_DIR)"
services_env=$(bash scripts/services.sh up pg mongo)
eval "$services_env"

banner "event-processor migrate"
"$bin" migrate
banner "event-processor seed"
"$bin" seed
banner "event-processor status (before)"
"$bin" status
banner "event-processor run --until-caught-up"
"$bin" run --until-caught-up
banner "event-processor status (after)"
"$bin" status
banner "event-processor show"
"$bin" show

cat <<MSG

Done in $(elapsed "$SECONDS"). The binary is $bin; to run it by name from this shell:
  export PATH="$(dirname "$bin"):\$PATH"
The services are still running; to use them from this shell:
  eval "\$(SERVICES_DIR=$SERVICES_DIR scripts/services.sh env)"
and to stop them:
  SERVICES_DIR=$SERVICES_DIR scripts/services.sh down
MSG
