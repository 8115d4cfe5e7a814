#!/bin/sh
# Write the secrets compose.yaml reads (random, private to the owner) to .env next to
# compose.yaml, or to the file named as the first argument. Never overwrites a file.
# The media server's backend needs REVENGE_JWT_SECRET (it signs the users' tokens) and
# REVENGE_API_KEY (it calls the hub's HTTP API).
set -eu
out=${1:-"$(dirname "$0")/../.env"}
if [ -e "$out" ]; then
  echo "$out exists; not overwriting it" >&2
  exit 0
fi
rand() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }
umask 077
{
  printf 'REVENGE_JWT_SECRET=%s\n' "$(rand 32)"
  printf 'REVENGE_API_KEY=%s\n' "$(rand 24)"
  printf 'POSTGRES_PASSWORD=%s\n' "$(rand 24)"
} > "$out"
echo "wrote $out"
