#!/usr/bin/env bash
# Record the sha256 of every migration file in migrations/CHECKSUMS, which the test suite
# checks so that a migration, once released, is never edited or removed (docs/migrations.md).
#
#   bash scripts/record-migrations.sh                  # record migrations not yet recorded
#   bash scripts/record-migrations.sh --amend FILE     # re-record FILE (relative to migrations/,
#                                                      # e.g. postgres/0003_x.sql); only for a
#                                                      # migration that was never released
set -euo pipefail
cd "$(dirname "$0")/../migrations"

amend=""
case "${1:-}" in
    "") ;;
    --amend)
        amend="${2:?--amend needs a file, e.g. postgres/0003_x.sql}"
        [ -f "$amend" ] || { echo "no such migration: migrations/$amend" >&2; exit 2; }
        ;;
    *) echo "usage: $0 [--amend FILE]" >&2; exit 2 ;;
esac

[ -f CHECKSUMS ] || printf '%s\n' \
    '# sha256 of every released migration (sha256sum format). Written by' \
    '# scripts/record-migrations.sh and checked by the test suite; see docs/migrations.md.' > CHECKSUMS

recorded() { grep -q "^[0-9a-f]\{64\}  $1\$" CHECKSUMS; }

added=0
for file in postgres/*.sql sqlite/*.sql; do
    [ -f "$file" ] || continue
    if [ "$file" = "$amend" ]; then
        grep -v "^[0-9a-f]\{64\}  $file\$" CHECKSUMS > CHECKSUMS.tmp || true
        mv CHECKSUMS.tmp CHECKSUMS
        echo "re-recorded $file"
    elif recorded "$file"; then
        continue
    else
        echo "recorded $file"
    fi
    sha256sum "$file" >> CHECKSUMS
    added=$((added + 1))
done

# Comments first, then one line per file in path order.
{ grep '^#' CHECKSUMS || true; grep -v '^#' CHECKSUMS | sort -k2; } > CHECKSUMS.tmp
mv CHECKSUMS.tmp CHECKSUMS
[ "$added" -gt 0 ] || echo "every migration is already recorded"
