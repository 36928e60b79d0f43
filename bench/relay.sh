#!/usr/bin/env bash
# Accepted and delivered messages per second through one Ferry worker and
# through Postfix 3.7 configured as the same relay, measured in the same
# run: the same load from postfix's smtp-source (one session per message,
# 4 KiB each), the same next hop (postfix's smtp-sink), on loopback only.
# Prints each figure and the ratio Ferry/Postfix.
#
#   bench/relay.sh                 # N=5000 messages per run, 16 and 100 sessions
#   N=20000 ROUNDS=3 bench/relay.sh
#   FERRY_BIN=../old/target/release/ferry bench/relay.sh   # another build
#
# Installs postfix from Debian's packages if smtp-source is missing, and
# reconfigures the local Postfix to listen on 127.0.0.1:2701 only, relaying
# everything to the sink (fsync on, as shipped). Run it as root on a
# machine you can spare.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-5000}
ROUNDS=${ROUNDS:-1}
SIZE=4096
SINK=127.0.0.1:2600
FERRY_PORT=2700
POSTFIX_PORT=2701
LIMIT=300   # seconds any one run may take

if ! command -v smtp-source >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null
fi
# FERRY_BIN: another build to measure (e.g. an older commit's, for a
# before/after comparison in one run); by default this tree's.
FERRY_BIN=${FERRY_BIN:-target/release/ferry}
[ "$FERRY_BIN" = target/release/ferry ] && cargo build --release -q
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  postfix stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# Ferry: one worker, one anonymous connector that may relay, one route.
cat >"$work/ferry.toml" <<TOML
[[connectors]]
name = "Bench"
port = $FERRY_PORT
remote_ranges = ["127.0.0.0/8"]
permissions = ["anonymous", "accept_any_recipient"]
limits = { max_connections_per_source = 5000 }

[[routes]]
domains = ["*"]
type = "smtp"
next_hops = ["$SINK"]
tls = "none"

# A message deferred by a hiccup of the sink is retried at once, not in
# the default 5 minutes (the run would wait for it).
[delivery]
retry_interval = "1s"
TOML
echo "bench-admin-token-$$-$RANDOM" >"$work/admin.token"
"$FERRY_BIN" worker --config "$work/ferry.toml" --listen 127.0.0.1 \
  --admin-token-file "$work/admin.token" \
  --data "$work/ferry-data" --admin 127.0.0.1:0 --hostname bench.test \
  >"$work/ferry.out" 2>"$work/ferry.log" &
pids+=($!)
for _ in $(seq 100); do grep -q "worker ready" "$work/ferry.out" && break; sleep 0.1; done

# Postfix: the same relay (shipped defaults, fsync on), enough processes
# for 100 sessions.
postfix stop >/dev/null 2>&1 || true
postconf -e "inet_interfaces = 127.0.0.1" "inet_protocols = ipv4" \
  "mynetworks = 127.0.0.0/8" "relayhost = [127.0.0.1]:${SINK#*:}" \
  "mydestination =" "myhostname = bench.test" "default_process_limit = 200" \
  "smtpd_relay_restrictions = permit_mynetworks, reject" \
  "smtpd_sasl_auth_enable = no"
# As the baselines were measured: no maillog_file (postlogd costs Postfix
# about a third of its rate), so without a syslog daemon its log lines go
# nowhere. Ferry logs every message to a file: the comparison favours
# Postfix.
postconf -X maillog_file
postconf -M "127.0.0.1:$POSTFIX_PORT/inet=127.0.0.1:$POSTFIX_PORT inet n - n - - smtpd"
postfix start >/dev/null 2>&1 || { postfix check >&2; echo "postfix did not start" >&2; exit 1; }
sleep 1

now() { date +%s.%N; }

# One sink for the whole run; it prints a running count ("mesg=N") of the
# messages it has received.
smtp-sink -u nobody -c "$SINK" 1024 >"$work/sink.count" 2>/dev/null &
pids+=($!)
sleep 0.3
delivered() { tail -c 64 "$work/sink.count" | tr '\r' '\n' | sed -n 's/.*mesg=\([0-9]*\).*/\1/p' | tail -1; }

# CPU seconds used so far by a process and its descendants, the reaped
# ones included (Postfix's master reaps its smtpd, cleanup, qmgr, smtp).
cpu_of() {
  local root=$1 ticks
  ticks=$(ps -o pid= --ppid "$root" 2>/dev/null | while read -r child; do
            awk '{ print $14 + $15 + $16 + $17 }' "/proc/$child/stat" 2>/dev/null || true
          done | awk -v own="$(awk '{ print $14 + $15 + $16 + $17 }' "/proc/$root/stat")" \
                     '{ s += $1 } END { print s + own }')
  awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.3f", t / hz }'
}

# Waits (bounded) until the given queue is empty.
ferry_idle() { "$FERRY_BIN" queue --admin "$ferry_admin" --token-file "$work/admin.token" list 2>/dev/null | tail -1 | grep -q '^0 messages'; }
postfix_idle() { postqueue -p 2>/dev/null | grep -q "Mail queue is empty"; }
settle() { for _ in $(seq "$LIMIT"); do "$1" && return 0; sleep 1; done; echo "queue of $1 never emptied" >&2; }

# run IDLE PORT PID SESSIONS -> prints "accepted delivered cpu_ms_per_msg"
run() {
  local idle=$1 port=$2 pid=$3 sessions=$4
  settle "$idle"
  local base c0 t0 t1 t2 cpu
  base=$(delivered)
  c0=$(cpu_of "$pid")
  t0=$(now)
  timeout "$LIMIT" smtp-source -s "$sessions" -l "$SIZE" -m "$N" \
    -f load@example.test -t rcpt@sink.test "127.0.0.1:$port"
  t1=$(now)
  for _ in $(seq $((LIMIT * 20))); do
    [ "$(( $(delivered) - base ))" -ge "$N" ] && break
    sleep 0.05
  done
  t2=$(now)
  cpu=$(awk -v a="$c0" -v b="$(cpu_of "$pid")" -v n="$N" 'BEGIN { printf "%.3f", (b - a) * 1000 / n }')
  if [ "$(( $(delivered) - base ))" -lt "$N" ]; then
    echo "only $(( $(delivered) - base )) of $N delivered in ${LIMIT}s" >&2
    echo "0 0 $cpu"; return
  fi
  awk -v n="$N" -v a="$t0" -v b="$t1" -v c="$t2" -v cpu="$cpu" \
    'BEGIN { printf "%.0f %.0f %s\n", n/(b-a), n/(c-a), cpu }'
}

ferry_pid=${pids[0]}
ferry_admin=$(sed -n 's|^worker admin http://\([^/ ]*\).*|\1|p' "$work/ferry.out")
postfix_pid=$(tr -d ' ' </var/spool/postfix/pid/master.pid)

# Warm-up, not measured: the first messages through each system pay for
# cold caches and the spool's first segment.
N_RUN=$N; N=$(( N / 10 > 100 ? N / 10 : 100 ))
run ferry_idle "$FERRY_PORT" "$ferry_pid" 16 >/dev/null
run postfix_idle "$POSTFIX_PORT" "$postfix_pid" 16 >/dev/null
N=$N_RUN

printf "%-8s %-9s %12s %12s %14s\n" sessions system accepted/s delivered/s "CPU ms/msg"
for round in $(seq "$ROUNDS"); do
  for s in 16 100; do
    read -r fa fd fc < <(run ferry_idle "$FERRY_PORT" "$ferry_pid" "$s")
    printf "%-8s %-9s %12s %12s %14s\n" "$s" ferry "$fa" "$fd" "$fc"
    read -r pa pd pc < <(run postfix_idle "$POSTFIX_PORT" "$postfix_pid" "$s")
    printf "%-8s %-9s %12s %12s %14s\n" "$s" postfix "$pa" "$pd" "$pc"
    awk -v s="$s" -v fa="$fa" -v fd="$fd" -v pa="$pa" -v pd="$pd" -v fc="$fc" -v pc="$pc" \
      'BEGIN { printf "%-8s %-9s %11.2fx %11.2fx %13.2fx\n", s, "ratio", (pa>0?fa/pa:0), (pd>0?fd/pd:0), (fc>0?pc/fc:0) }'
  done
done
echo "ratio: Ferry/Postfix for rates; Postfix/Ferry for CPU per message (higher is better for Ferry)"
