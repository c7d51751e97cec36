#!/usr/bin/env bash
# What the tests and the soak test need, installed when missing (as root on a fresh Debian machine:
# apt-get update, then apt-get install -y). Sourced by scripts/test.sh and scripts/soak.sh.
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
{ command -v psql && command -v pgbench; } >/dev/null 2>&1 || need+=(postgresql-client)
command -v runuser >/dev/null 2>&1 || need+=(util-linux)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# Diesel links libpq.
[ -f /usr/include/postgresql/libpq-fe.h ] || need+=(libpq-dev)
# The failover tests run a real Patroni cluster (etcd v3 API) and read its REST API with curl.
command -v patroni >/dev/null 2>&1 || need+=(patroni)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v curl >/dev/null 2>&1 || need+=(curl)
# router_deploy.rs checks the alerting rules and /metrics with promtool.
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v pip3 >/dev/null 2>&1 || python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "$0: missing ${need[*]}; install them (apt-get install -y ${need[*]}) or run as root" >&2
    exit 1
  fi
  echo "== installing ${need[*]}"
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}"
fi
# Python psycopg 3, one of the real clients the tests drive through the router.
if ! python3 -c 'import psycopg' >/dev/null 2>&1; then
  echo "== installing psycopg"
  python3 -m pip install --quiet 'psycopg[binary]'
fi
# PostgreSQL refuses to run as root: the harness runs the servers as the postgres user.
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi

