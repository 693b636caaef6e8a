#!/bin/sh
# Starts a partner agent in the compose demo. The agent initdb's its
# PostgreSQL with loopback-only trust; the proxy connects from another
# container, so until the agent manages pg_hba.conf itself this adds one
# rule for the compose network (trust: demo only, never in production) and
# reloads PostgreSQL. A mirror inherits the rule with its base backup.
set -eu
config="${PGMIRROR_CONFIG:-/etc/pgmirror/partner.toml}"
data="${PGMIRROR_DATA:-/var/lib/pgmirror/data}"
(
  while :; do
    if [ -f "$data/pg_hba.conf" ] && ! grep -q pgmirror-compose "$data/pg_hba.conf"; then
      echo "host all all samenet trust # pgmirror-compose" >> "$data/pg_hba.conf"
    fi
    if [ -f "$data/postmaster.pid" ] && grep -q pgmirror-compose "$data/pg_hba.conf"; then
      su postgres -c "pg_ctl reload -D '$data'" >/dev/null 2>&1 || true
      break
    fi
    sleep 1
  done
) &
exec pgmirror partner --config "$config"
