#!/usr/bin/env bash
# Memory of Ferry's balancer and workers, against HAProxy 2.6 and Postfix
# 3.7 in the same run, on loopback only. Four phases, each selectable:
#   idle   N idle greeted sessions (connected, 220 read, then silent) through
#          Ferry's balancer, then through HAProxy (mode tcp, send-proxy-v2),
#          in front of the same two Ferry workers: VmRSS of each balancer
#          and worker before, with the sessions open, and AFTER seconds
#          after they closed; memory per session and the ratio to HAProxy.
#   burst  BURST connections at once, directly to a worker, through Ferry's
#          balancer and through HAProxy: time until all are greeted, and
#          how many were not greeted within 1 s and 10 s.
#   queue  QUEUED messages of 4 KiB queued in one worker towards a next hop
#          that is down: resident memory per queued message; then SIGKILL
#          and the time from start to ready with all of them queued.
#   data   SESSIONS concurrent messages of SIZE bytes into one worker, then
#          the same into Postfix, both relaying to postfix's smtp-sink: the
#          worker's peak resident memory (VmHWM) and both accepted rates.
# Ends with a summary table: each figure, the peer's, the ratio, the target
# (issue 12).
#
#   bench/idle.sh                      # all four phases, N=9000
#   bench/idle.sh idle burst           # some phases only
#   N=2000 AFTER=10 bench/idle.sh idle
#   QUEUED=10000 SESSIONS=10 bench/idle.sh queue data
#   FERRY_BIN=/tmp/ferry-old bench/idle.sh   # another build
#
# N sessions need about 2N+1000 open files in a balancer: the script raises
# its soft limit to the hard one and says so when that is not enough.
# Installs postfix (smtp-source, smtp-sink, the data phase's peer) and
# haproxy from Debian's packages if missing; the data phase reconfigures
# the local Postfix onto 127.0.0.1:2831 (main.cf and master.cf are restored
# at the end). Run it as root on a machine you can spare.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-9000}
AFTER=${AFTER:-30}          # seconds after the idle sessions closed
BURST=${BURST:-1000}
QUEUED=${QUEUED:-50000}
SESSIONS=${SESSIONS:-30}
SIZE=${SIZE:-36000000}      # bytes per message of the data phase (36 MB)
LIMIT=600                   # seconds any one load may take
WORKER_PORT=2801            # the two workers: 127.0.0.2 and 127.0.0.3
FERRY_BAL=2810 HAPROXY_BAL=2811
QUEUE_PORT=2820 DOWN_HOP=2829
DATA_PORT=2830 POSTFIX_PORT=2831 SINK=2832

phases=("$@")
[ ${#phases[@]} -gt 0 ] || phases=(idle burst queue data)
for p in "${phases[@]}"; do
  case $p in idle|burst|queue|data) ;; *) echo "unknown phase $p (idle, burst, queue, data)" >&2; exit 2 ;; esac
done
want() { local p; for p in "${phases[@]}"; do [ "$p" = "$1" ] && return 0; done; return 1; }

need=()
command -v smtp-source >/dev/null || need+=(postfix)
command -v haproxy >/dev/null || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
FERRY_BIN=${FERRY_BIN:-target/release/ferry}
[ "$FERRY_BIN" = target/release/ferry ] && cargo build --release -q -p ferry

# Every process started here inherits the raised limit.
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt $((2 * N + 1000)) ]; then
  ulimit -Hn $((2 * N + 1000)) 2>/dev/null && hard=$((2 * N + 1000)) ||
    echo "note: open-files hard limit $hard is below 2N+1000 = $((2 * N + 1000)) and cannot be raised here; lower N if sessions are refused" >&2
fi
ulimit -n "$hard"

work=$(mktemp -d)
pids=()
postfix_touched=
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  if [ -n "$postfix_touched" ]; then
    postfix stop >/dev/null 2>&1 || true
    cp -p "$work/main.cf" "$work/master.cf" /etc/postfix/ 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s.%N; }
kib() { awk -v f="$2" '$1 == f ":" { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
# until_ok CMD...: polls CMD every 0.1 s for at most 60 s.
until_ok() { for _ in $(seq 600); do "$@" && return 0; sleep 0.1; done; echo "timed out: $*" >&2; return 1; }
ready() { grep -q " ready" "$1"; }
# greets HOST PORT: a connection there reads a 220 within 2 s.
greets() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2 && head -c 3 <&3" 2>/dev/null | grep -q 220; }
free_port() { ! ss -Hltn "sport = :$1" | grep -q .; }
for port in $WORKER_PORT $FERRY_BAL $HAPROXY_BAL $QUEUE_PORT $DOWN_HOP $DATA_PORT $POSTFIX_PORT $SINK; do
  free_port "$port" || { echo "port $port is taken: is another bench/idle.sh running?" >&2; exit 1; }
done
echo "bench-admin-token-$$-$RANDOM" >"$work/admin.token"

# worker NAME LISTEN CONFIG: starts a worker and waits for its ready line;
# sets $worker_pid.
worker() {
  "$FERRY_BIN" worker --config "$3" --listen "$2" --admin-token-file "$work/admin.token" \
    --data "$work/$1" --admin 127.0.0.1:0 --hostname bench.test \
    >"$work/$1.out" 2>"$work/$1.log" &
  worker_pid=$!
  disown
  pids+=("$worker_pid")
  until_ok ready "$work/$1.out"
}
# connector_config PORT NEXT_HOP [TRUSTED]: one anonymous relay connector,
# one route; PROXY headers read from TRUSTED (the balancers connect from
# 127.0.0.1; a client sending none connects from another address).
connector_config() {
  local trusted=
  [ -z "${3:-}" ] || trusted="\"$3\""
  cat <<TOML
trusted_proxies = [$trusted]

[[connectors]]
name = "Bench"
port = $1
remote_ranges = ["0.0.0.0/0"]
permissions = ["anonymous", "accept_any_recipient"]
limits = { max_connections = $((N + BURST + 1000)), max_connections_per_source = $((N + BURST + 1000)) }

[[routes]]
domains = ["*"]
type = "smtp"
next_hops = ["$2"]
tls = "none"
TOML
}
mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
declare -A R   # results for the summary

# ---- idle and burst: two workers, Ferry's balancer and HAProxy in front
if want idle || want burst; then
  connector_config "$WORKER_PORT" "127.0.0.1:$DOWN_HOP" 127.0.0.1/32 >"$work/pool.toml"
  cat >>"$work/pool.toml" <<TOML

[balancer]
allow = ["127.0.0.0/8"]
max_connections = $((N + BURST + 1000))
max_connections_per_source = $((N + BURST + 1000))

[[balancer.listeners]]
name = "idle"
port = $FERRY_BAL
backend_port = $WORKER_PORT

[[balancer.backends]]
name = "w1"
address = "127.0.0.2"

[[balancer.backends]]
name = "w2"
address = "127.0.0.3"
TOML
  worker w1 127.0.0.2 "$work/pool.toml"; w1=$worker_pid
  worker w2 127.0.0.3 "$work/pool.toml"; w2=$worker_pid
  "$FERRY_BIN" balancer --config "$work/pool.toml" --listen 127.0.0.1 --admin 127.0.0.1:0 \
    >"$work/balancer.out" 2>"$work/balancer.log" &
  bal=$!
  disown
  pids+=("$bal")
  # HAProxy refuses to start when 2 x maxconn is over the open-files limit.
  hap_maxconn=$(( (N > BURST ? N : BURST) + 500 ))
  [ "$hard" = unlimited ] || [ "$hap_maxconn" -le $(( (hard - 100) / 2 )) ] || hap_maxconn=$(( (hard - 100) / 2 ))
  cat >"$work/haproxy.cfg" <<CFG
global
  maxconn $hap_maxconn
defaults
  mode tcp
  timeout connect 5s
  timeout client 10m
  timeout server 10m
frontend idle
  bind 127.0.0.1:$HAPROXY_BAL
  default_backend workers
backend workers
  balance leastconn
  option smtpchk EHLO bench.test
  server w1 127.0.0.2:$WORKER_PORT send-proxy-v2 check inter 2s
  server w2 127.0.0.3:$WORKER_PORT send-proxy-v2 check inter 2s
CFG
  haproxy -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
  hap=$!
  disown
  pids+=("$hap")
  until_ok ready "$work/balancer.out"
  until_ok greets 127.0.0.1 "$FERRY_BAL"
  until_ok greets 127.0.0.1 "$HAPROXY_BAL" || { tail -3 "$work/haproxy.log" >&2; exit 1; }
  # Both of Ferry's backends up (probes: rise 2 at 2 s), as HAProxy's.
  sleep 5
fi

if want idle; then
  echo "== idle: $N idle greeted sessions, then ${AFTER}s after they closed (VmRSS, MB)"
  # idle_round LABEL PORT BALANCER_PID -> fills R[LABEL,...]
  idle_round() {
    local label=$1 port=$2 pid=$3 out
    out=$(timeout $((LIMIT + AFTER)) python3 bench/idle_load.py idle "127.0.0.1:$port" "$N" \
      "bal=$pid,w1=$w1,w2=$w2" --after "$AFTER")
    echo "$out" | sed -n 's/^greeted=/  via '"$label"': greeted=/p'
    R[$label,greeted]=$(echo "$out" | sed -n 's/^greeted=\([0-9]*\).*/\1/p')
    local stage name
    for stage in before open after; do
      for name in bal w1 w2; do
        R[$label,$stage,$name]=$(echo "$out" | awk -v s="$stage" -v n="$name" '$1 == "rss" && $2 == s && $3 == n { print $4 }')
      done
    done
  }
  idle_round ferry "$FERRY_BAL" "$bal"
  idle_round haproxy "$HAPROXY_BAL" "$hap"
  printf "  %-30s %9s %9s %14s %9s %13s\n" process before open "KiB/session" after "after/before"
  for label in ferry haproxy; do
    g=${R[$label,greeted]:-0}; [ "$g" -gt 0 ] || g=1
    for name in bal w1 w2; do
      case $name in
        bal) what=$([ "$label" = ferry ] && echo "Ferry balancer" || echo "HAProxy"); per=$g ;;
        *) what="worker $name (via $label)"; per=$(( g / 2 > 0 ? g / 2 : 1 )) ;;
      esac
      b=${R[$label,before,$name]} o=${R[$label,open,$name]} a=${R[$label,after,$name]}
      awk -v w="$what" -v b="$b" -v o="$o" -v a="$a" -v n="$per" 'BEGIN {
        printf "  %-30s %9.1f %9.1f %14.2f %9.1f %12.2fx\n", w, b/1024, o/1024, (o-b)/n, a/1024, (b>0?a/b:0) }'
    done
  done
  R[idle,bal]=$(awk -v b="${R[ferry,before,bal]}" -v o="${R[ferry,open,bal]}" -v n="${R[ferry,greeted]}" 'BEGIN { printf "%.2f", (o-b)/(n>0?n:1) }')
  R[idle,hap]=$(awk -v b="${R[haproxy,before,bal]}" -v o="${R[haproxy,open,bal]}" -v n="${R[haproxy,greeted]}" 'BEGIN { printf "%.2f", (o-b)/(n>0?n:1) }')
  # Workers: the growth of both over the sessions both held (first round).
  R[idle,wrk]=$(awk -v b1="${R[ferry,before,w1]}" -v o1="${R[ferry,open,w1]}" -v b2="${R[ferry,before,w2]}" \
    -v o2="${R[ferry,open,w2]}" -v n="${R[ferry,greeted]}" 'BEGIN { printf "%.2f", (o1-b1+o2-b2)/(n>0?n:1) }')
  R[idle,hapwrk]=$(awk -v b1="${R[haproxy,before,w1]}" -v o1="${R[haproxy,open,w1]}" -v b2="${R[haproxy,before,w2]}" \
    -v o2="${R[haproxy,open,w2]}" -v n="${R[haproxy,greeted]}" 'BEGIN { printf "%.2f", (o1-b1+o2-b2)/(n>0?n:1) }')
  echo "  (KiB/session: growth over the sessions the process held; a worker holds half of them)"
fi

if want burst; then
  echo "== burst: $BURST connections at once (ms from the burst's start to each 220)"
  printf "  %-22s %8s %10s %10s %7s %7s %7s %7s  %s\n" to greeted ">1s" ">10s" never p50 p99 max "first replies"
  # Directly to a worker from 127.0.0.5, which it reads no PROXY header from.
  for target in "worker w1=127.0.0.2:$WORKER_PORT" "Ferry balancer=127.0.0.1:$FERRY_BAL" "HAProxy=127.0.0.1:$HAPROXY_BAL"; do
    label=${target%%=*}
    out=$(timeout $((LIMIT)) python3 bench/idle_load.py burst "${target#*=}" "$BURST" 127.0.0.5)
    eval "$(echo "$out" | tr ' ' '\n' | sed -n 's/^\([a-z0-9]*\)=\([0-9.]*\)$/b_\1=\2/p')"
    printf "  %-22s %8s %10s %10s %7s %7s %7s %7s  %s\n" "$label" "$b_greeted" "$b_late1" "$b_late10" "$b_never" \
      "$b_p50" "$b_p99" "$b_max" "$(echo "$out" | sed -n 's/.*outcomes=//p')"
    R[burst,$label]="$b_max $b_late1 $b_late10 $b_never"
    sleep 2   # the closed sessions leave the balancer and workers
  done
fi

if want idle || want burst; then
  for p in "$hap" "$bal" "$w1" "$w2"; do kill "$p" 2>/dev/null || true; done
fi

# ---- queue: QUEUED messages towards a next hop that is down
if want queue; then
  echo "== queue: $QUEUED messages of 4 KiB towards a next hop that is down"
  connector_config "$QUEUE_PORT" "127.0.0.1:$DOWN_HOP" >"$work/queue.toml"
  worker queue 127.0.0.1 "$work/queue.toml"; q=$worker_pid
  admin=$(sed -n 's|^worker admin http://\([^/ ]*\).*|\1|p' "$work/queue.out")
  queued() { curl -s "http://$admin/metrics" | awk '/^ferry_queue_messages\{/ { s += $2 } END { printf "%d", s }'; }
  sleep 2
  before=$(kib "$q" VmRSS)
  t0=$(now)
  timeout "$LIMIT" smtp-source -s 16 -l 4096 -m "$QUEUED" -f load@bench.test -t rcpt@down.test \
    "127.0.0.1:$QUEUE_PORT" || echo "smtp-source: exit $?" >&2
  t1=$(now)
  # The gauge follows the queue within its refresh; bounded.
  for _ in $(seq 600); do [ "$(queued)" -ge "$QUEUED" ] && break; sleep 0.1; done
  sleep 5
  held=$(queued); with=$(kib "$q" VmRSS)
  awk -v n="$QUEUED" -v a="$t0" -v b="$t1" -v h="$held" -v x="$before" -v y="$with" 'BEGIN {
    printf "  accepted %d in %.1f s (%.0f/s); queued now %d\n", n, b-a, n/(b-a), h
    printf "  VmRSS before %.1f MB, with them queued %.1f MB: %.0f bytes per queued message\n", x/1024, y/1024, (y-x)*1024/(h>0?h:1) }'
  R[queue,per]=$(awk -v h="$held" -v x="$before" -v y="$with" 'BEGIN { printf "%.0f", (y-x)*1024/(h>0?h:1) }')
  kill -9 "$q"
  for _ in $(seq 100); do kill -0 "$q" 2>/dev/null || break; sleep 0.05; done
  : >"$work/queue.out"
  t0=$(now)
  "$FERRY_BIN" worker --config "$work/queue.toml" --listen 127.0.0.1 --admin-token-file "$work/admin.token" \
    --data "$work/queue" --admin 127.0.0.1:0 --hostname bench.test >"$work/queue.out" 2>>"$work/queue.log" &
  q=$!
  disown
  pids+=("$q")
  for _ in $(seq 6000); do ready "$work/queue.out" && break; sleep 0.01; done
  t1=$(now)
  admin=$(sed -n 's|^worker admin http://\([^/ ]*\).*|\1|p' "$work/queue.out")
  for _ in $(seq 300); do [ "$(queued)" -ge "$held" ] && break; sleep 0.1; done
  R[queue,ready]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b-a }')
  echo "  after SIGKILL: ready in ${R[queue,ready]} s (start to its ready line), $(queued) queued," \
    "VmRSS $(mb "$(kib "$q" VmRSS)") MB"
  kill "$q" 2>/dev/null || true
fi

# ---- data: SESSIONS concurrent messages of SIZE bytes, Ferry then Postfix
if want data; then
  echo "== data: $SESSIONS concurrent messages of $SIZE bytes, each relayed to smtp-sink"
  smtp-sink -u nobody -c "127.0.0.1:$SINK" 1024 >/dev/null 2>&1 &
  pids+=($!)
  disown
  connector_config "$DATA_PORT" "127.0.0.1:$SINK" >"$work/data.toml"
  worker data 127.0.0.1 "$work/data.toml"; d=$worker_pid
  sleep 1
  dbefore=$(kib "$d" VmRSS)
  out=$(timeout "$LIMIT" python3 bench/idle_load.py data "127.0.0.1:$DATA_PORT" "$SESSIONS" "$SIZE" "$d")
  hwm=$(kib "$d" VmHWM)
  sleep "$AFTER"
  dafter=$(kib "$d" VmRSS)
  eval "$(echo "$out" | tr ' ' '\n' | sed -n 's/^\([a-z_]*\)=\([0-9.]*\)$/f_\1=\2/p')"
  echo "  ferry:   $out"
  echo "  ferry:   VmRSS before $(mb "$dbefore") MB, peak (VmHWM) $(mb "$hwm") MB, ${AFTER}s after $(mb "$dafter") MB"
  kill "$d" 2>/dev/null || true

  # Postfix: the same relay as bench/relay.sh, a size limit above SIZE.
  cp -p /etc/postfix/main.cf /etc/postfix/master.cf "$work/"
  postfix_touched=1
  postfix stop >/dev/null 2>&1 || true
  postconf -e "inet_interfaces = 127.0.0.1" "inet_protocols = ipv4" \
    "mynetworks = 127.0.0.0/8" "relayhost = [127.0.0.1]:$SINK" \
    "mydestination =" "myhostname = bench.test" "default_process_limit = 200" \
    "smtpd_relay_restrictions = permit_mynetworks, reject" \
    "smtpd_sasl_auth_enable = no" "message_size_limit = $((SIZE + 4 * 1024 * 1024))"
  postconf -X maillog_file
  postconf -M "127.0.0.1:$POSTFIX_PORT/inet=127.0.0.1:$POSTFIX_PORT inet n - n - - smtpd"
  postfix start >/dev/null 2>&1 || { postfix check >&2; echo "postfix did not start" >&2; exit 1; }
  until_ok greets 127.0.0.1 "$POSTFIX_PORT"
  ppid=$(tr -d ' ' </var/spool/postfix/pid/master.pid)
  out=$(timeout "$LIMIT" python3 bench/idle_load.py data "127.0.0.1:$POSTFIX_PORT" "$SESSIONS" "$SIZE" "$ppid")
  eval "$(echo "$out" | tr ' ' '\n' | sed -n 's/^\([a-z_]*\)=\([0-9.]*\)$/p_\1=\2/p')"
  echo "  postfix: $out"
  R[data,hwm]=$hwm R[data,after]=$dafter R[data,before]=$dbefore
  R[data,rate]="$f_mb_per_s $p_mb_per_s $f_ok $p_ok"
  R[data,pss]="$f_peak_pss_kib $p_peak_pss_kib"
  # Postfix relays them on before it stops, so no message of this run is
  # left in its queue for the next user of the local Postfix.
  postfix_empty() { postqueue -p 2>/dev/null | grep -q "Mail queue is empty"; }
  for _ in $(seq 120); do postfix_empty && break; sleep 1; done
  postfix_empty || echo "note: Postfix's queue still holds messages of this run" >&2
  postfix stop >/dev/null 2>&1 || true
  cp -p "$work/main.cf" "$work/master.cf" /etc/postfix/
  postfix_touched=
fi

# ---- summary
echo
echo "== summary ($(basename "$FERRY_BIN"), N=$N)"
printf "%-44s %12s %14s %8s %14s\n" figure Ferry peer ratio target
row() { printf "%-44s %12s %14s %8s %14s\n" "$@"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else printf "-" }'; }
if want idle; then
  row "idle: balancer KiB per session" "${R[idle,bal]}" "${R[idle,hap]} HAProxy" "$(ratio "${R[idle,bal]}" "${R[idle,hap]}")" "<= 1.00x"
  row "idle: worker KiB per session (via Ferry)" "${R[idle,wrk]}" "${R[idle,hapwrk]} via HAP." - "<= 8"
  row "idle: balancer RSS ${AFTER}s after / before" "$(ratio "${R[ferry,after,bal]}" "${R[ferry,before,bal]}")" \
    "$(ratio "${R[haproxy,after,bal]}" "${R[haproxy,before,bal]}") HAProxy" - "<= 2x"
  for w in w1 w2; do
    row "idle: worker $w RSS after 2 rounds / before" "$(ratio "${R[haproxy,after,$w]}" "${R[ferry,before,$w]}")" - - "<= 2x"
  done
fi
if want burst; then
  for label in "Ferry balancer" "HAProxy" "worker w1"; do
    read -r mx l1 l10 nv <<<"${R[burst,$label]}"
    [ "$nv" = 0 ] || mx="$nv never"
    row "burst via $label: all greeted in (ms)" "$mx" - - "$([ "$label" = "Ferry balancer" ] && echo "<= 1000")"
    row "burst via $label: not in 1 s / 10 s" "$l1 / $l10" - - "$([ "$label" = "Ferry balancer" ] && echo 0)"
  done
fi
if want queue; then
  row "queue: bytes per queued message" "${R[queue,per]}" - - "<= 512"
  row "queue: start to ready after SIGKILL (s)" "${R[queue,ready]}" - - "<= 1"
fi
if want data; then
  read -r fr pr fo po <<<"${R[data,rate]}"
  read -r fp pp <<<"${R[data,pss]}"
  row "data: accepted MB/s ($fo, $po of $SESSIONS ok)" "$fr" "$pr Postfix" "$(ratio "$fr" "$pr")" ">= 1x"
  row "data: worker peak VmHWM (MB)" "$(mb "${R[data,hwm]}")" - - "< 200"
  row "data: peak PSS, MB (Postfix: all processes)" "$(mb "$fp")" "$(mb "$pp") Postfix" "$(ratio "$fp" "$pp")" -
  row "data: worker RSS ${AFTER}s after / before" "$(ratio "${R[data,after]}" "${R[data,before]}")" - - "<= 2x"
fi
