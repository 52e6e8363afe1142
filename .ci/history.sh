#!/usr/bin/env bash
# Fails when a tracked file describes how the code came to be rather than what it is:
# development sessions, issue numbers, dates of past work, notes of what was tried and
# dropped, or a history file. Prints every offending line as path:line:text.
#
#   bash .ci/history.sh
#
# A line that matches but is legitimate (a PostgreSQL session, say) goes in ALLOW below,
# as an extended regular expression matched against "path:line:text".
set -euo pipefail
cd "$(dirname "$0")/.."

PATTERN='\bsessions?\b|\bissues? ?#?[0-9]+|tried and not kep[t]|until the last change|BENCHMARKS-HISTORY|\b20[0-9]{2}-[01][0-9]-[0-3][0-9]\b'

ALLOW=(
    # This script names what it looks for.
    '^\.ci/history\.sh:'
    # PostgreSQL sessions: a connection's server-side state, which a restart ends.
    '^src/stores/postgres\.rs:[0-9]+:.*finds the old session gone'
    '^tests/postgres_outage\.rs:[0-9]+:.*connection whose session the restart ended'
    '^tests/postgres_outage\.rs:[0-9]+:.*ended session and retries the read'
    # PostgreSQL settings named "session".
    '\b(SET SESSION|session_replication_role|idle_session_timeout|idle_in_transaction_session_timeout)\b'
)

hits=$(git ls-files -z | xargs -0 grep -HnIiE -- "$PATTERN" || true)
allow=$(printf '%s\n' "${ALLOW[@]}" | paste -sd '|' -)
bad=$(printf '%s\n' "$hits" | grep -viE -- "$allow" | grep -v '^$' || true)

if [ -n "$bad" ]; then
    echo "history: references to development history (describe the code as it is):"
    printf '%s\n' "$bad"
    echo "history: $(printf '%s\n' "$bad" | wc -l) line(s)"
    exit 1
fi
echo "history: clean"
