#!/usr/bin/env bash
# Instructions per transaction in the router's user space, counted by callgrind (repeatable on a noisy
# machine, unlike time): pgbench -S through the release router under valgrind, twice (N1 and N2
# transactions per client), and the difference divided by the extra transactions, so that start-up and
# connection set-up cancel out. For each protocol (simple, extended, prepared) and each runtime design: the
# default (one runtime with router-threads workers, one per two cores: the single-threaded runtime on 2 cores) and
# SHARD_ROUTER_RUNTIME=event-loops (as many single-threaded runtimes, each with its own listener). BASELINE=path/to/another/shard-router adds that binary (an older build,
# say) as a third row. FLOOR=1 adds `relay_floor` (benches/src/bin/relay_floor.rs: bytes relayed on the same
# tokio runtime, nothing parsed — what tokio's tasks and I/O cost any proxy built on them; and floor-epoll,
# the same bytes relayed on an event loop of its own over epoll, `relay_floor --io epoll`) and PGBOUNCER=1
# PgBouncer (transaction pooling, the same pool size; not for -M prepared, which PgBouncer before 1.21 does
# not pool). DESIGNS="floor floor-epoll" (say) counts only those rows. Kernel time (wake-ups, syscalls) is not
# in these counts: the CPU columns of benches/run.sh are.
#
#   [BASELINE=...] [FLOOR=1] [PGBOUNCER=1] [DESIGNS=...] bash benches/callgrind.sh [clients (4)] [N1 (500)] [N2 (1500)]
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-4}
n1=${2:-500}
n2=${3:-1500}
command -v valgrind >/dev/null || { apt-get update && apt-get install -y valgrind; }
designs=${DESIGNS:-default event-loops ${BASELINE:+baseline} ${FLOOR:+floor floor-epoll} ${PGBOUNCER:+pgbouncer}}
cargo build --release --quiet -p router
case " $designs " in *" floor"*) cargo build --release --quiet -p benches --bin relay_floor ;; esac
case " $designs " in *" pgbouncer "*) PGBOUNCER=1 ;; esac
if [ -n "${PGBOUNCER:-}" ]; then
  export PATH="$PATH:/usr/sbin"
  command -v pgbouncer >/dev/null || { apt-get update && apt-get install -y pgbouncer; }
fi
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
work=$(mktemp -d /tmp/callgrind.XXXXXX)
chmod 755 "$work"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
# The user the servers run as.
pg_user=$(if [ "$(id -u)" = 0 ]; then echo postgres; else id -un; fi)
[ "$(id -u)" = 0 ] && chown postgres "$work"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pgport=$(free_port)
as_pg "$bin/initdb" -D "$work/pg" -U postgres -A trust >/dev/null
as_pg "$bin/pg_ctl" -D "$work/pg" -o "-p $pgport -k $work -c listen_addresses=127.0.0.1 -c max_connections=100" -l "$work/pg.log" -w start >/dev/null
router=""
cleanup() {
  pkill -INT -u "$pg_user" -f "pgbouncer $work/pgbouncer.ini" 2>/dev/null || true
  [ -n "$router" ] && kill -INT "$router" 2>/dev/null && wait "$router" 2>/dev/null || true
  as_pg "$bin/pg_ctl" -D "$work/pg" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
pgbench -i -q -s 1 -h 127.0.0.1 -p "$pgport" -U postgres postgres >/dev/null 2>&1
printf 'shard-strategy,hash\nshard-count,1\nrouter-auth,trust\npool-size,%s\nshard-node-0,postgres://postgres@127.0.0.1:%s/postgres\n' \
  "$clients" "$pgport" > "$work/config.csv"

# Instructions (Ir) of one router run serving `n` transactions per client.
run() {
  local design=$1 mode=$2 n=$3 port out
  port=$(free_port)
  out="$work/cg.$design.$mode.$n"
  if [ "$design" = event-loops ]; then export SHARD_ROUTER_RUNTIME=event-loops; else unset SHARD_ROUTER_RUNTIME; fi
  local exe=target/release/shard-router
  [ "$design" = baseline ] && exe=$BASELINE
  case $design in
    floor | floor-epoll)
      valgrind --tool=callgrind --callgrind-out-file="$out.%p" target/release/relay_floor --listen "127.0.0.1:$port" \
        --server "127.0.0.1:$pgport" --io "$([ "$design" = floor ] && echo tokio || echo epoll)" >/dev/null 2>"$out.log" &
      ;;
    pgbouncer)
      printf '[databases]\npostgres = host=127.0.0.1 port=%s dbname=postgres\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = %s\nunix_socket_dir =\nauth_type = trust\nauth_file = %s/users.txt\npool_mode = transaction\ndefault_pool_size = %s\nmax_client_conn = 1000\nlogfile = %s/pgbouncer.log\n' \
        "$pgport" "$port" "$work" "$clients" "$work" > "$work/pgbouncer.ini"
      echo '"postgres" ""' > "$work/users.txt"
      [ "$(id -u)" = 0 ] && chown postgres "$work/pgbouncer.ini" "$work/users.txt"
      as_pg valgrind --tool=callgrind --callgrind-out-file="$out.%p" pgbouncer "$work/pgbouncer.ini" >/dev/null 2>"$out.log" &
      ;;
    *)
      valgrind --tool=callgrind --callgrind-out-file="$out.%p" \
        "$exe" serve --config "$work/config.csv" --listen "127.0.0.1:$port" >/dev/null 2>"$out.log" &
      ;;
  esac
  router=$!
  for _ in $(seq 1 300); do pg_isready -q -h 127.0.0.1 -p "$port" && break; sleep 0.2; done
  pgbench -n -S -M "$mode" -c "$clients" -j 1 -t "$n" -h 127.0.0.1 -p "$port" -U postgres postgres >/dev/null
  if [ "$design" = pgbouncer ]; then
    # (As root it runs under runuser, which does not pass SIGINT on: the signal goes to valgrind itself.)
    pkill -INT -u "$pg_user" -f "callgrind-out-file=$out" || true
  elif [ "$design" = floor-epoll ]; then
    # (It has no handler of its own: a background job ignores SIGINT, SIGTERM's default action ends it.)
    kill -TERM "$router"
  else
    kill -INT "$router"
  fi
  wait "$router" || true
  router=""
  # The totals of every thread's file.
  cat "$out".* 2>/dev/null | awk '/^summary:/ { s += $2 } END { print s }'
}

printf '| protocol | design | instructions per transaction |\n|---|---|---|\n'
for mode in simple extended prepared; do
  for design in $designs; do
    [ "$design" = pgbouncer ] && [ "$mode" = prepared ] && continue
    a=$(run "$design" "$mode" "$n1")
    b=$(run "$design" "$mode" "$n2")
    echo "| $mode | $design | $(( (b - a) / ((n2 - n1) * clients) )) |"
  done
done
