#!/bin/sh
# Entrypoint of docker/Dockerfile.postgres: on an empty data directory, create the cluster with
# POSTGRES_USER / POSTGRES_PASSWORD (password authentication over TCP) and POSTGRES_DB; then run the
# server on every interface of the container (the compose file keeps it on an internal network).
set -eu
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD for the database superuser}"
user=${POSTGRES_USER:-postgres}
database=${POSTGRES_DB:-$user}
bin=/usr/lib/postgresql/15/bin
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    password_file=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$password_file"
    "$bin/initdb" --pgdata="$PGDATA" --username="$user" --pwfile="$password_file" --encoding=UTF8 \
        --locale=C.UTF-8 --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$password_file"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    if [ "$database" != postgres ]; then
        # Socket in a private directory: health checks (pg_isready on the default socket) stay
        # negative until the real server below is up.
        init_socket=$(mktemp -d)
        "$bin/pg_ctl" --pgdata="$PGDATA" --wait --silent \
            -o "-c listen_addresses='' -c unix_socket_directories=$init_socket" start
        "$bin/psql" --host="$init_socket" --username="$user" --dbname=postgres --quiet -v ON_ERROR_STOP=1 \
            --command="CREATE DATABASE \"$database\""
        "$bin/pg_ctl" --pgdata="$PGDATA" --wait --silent stop
        rmdir "$init_socket"
    fi
fi
exec "$bin/postgres" -D "$PGDATA" -c listen_addresses='*'
