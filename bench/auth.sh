#!/usr/bin/env bash
# AUTH under load on one Ferry worker and on Postfix 3.7 with Dovecot SASL
# configured alike, on loopback only: 300 AUTH at once with a wrong
# password, 300 with the right one (cache cold), the same again with the
# cache warm (WARM_ROUNDS times), N one-message sessions 16 at a time
# with and without AUTH on the same listener, and a password-guessing
# client. Each line gives the success-only rate, every reply counted, the
# peak PSS of the server's process tree (the worker; Postfix's master and
# Dovecot's with all their processes) and its CPU per reply.
#
#   bench/auth.sh                  # N=2000 sessions per session load
#   N=5000 WARM_ROUNDS=20 bench/auth.sh
#   USERS=10 N=50 WARM_ROUNDS=2 bench/auth.sh   # a quick check of the script
#
# 300 users dev001..dev300, each with its own argon2id hash from
# `ferry user hash` (m=19456 KiB, t=2, p=1); Dovecot verifies the same
# hashes ({ARGON2ID}, libsodium). Both sides cache verified credentials
# for 10 minutes and failures for 1 minute; neither delays a failed AUTH
# (Ferry's tarpit "0s"; Dovecot's auth_failure_delay 0 and its per-IP
# auth penalty off), to measure the hashing alone. Both cut a guessing
# client off after 5 AUTH by design: Ferry after 5 failures
# (max_failures), Postfix after 5 AUTH commands (smtpd_client_auth_rate_limit
# with anvil, on a second smtpd service used by the guessing load only:
# the limit counts successful AUTH too).
#
# Each system runs its loads in a phase of its own (Ferry first, then
# Postfix + Dovecot, the other stopped). Before each load: Postfix is
# restarted (no idle smtpd left from the previous load), Ferry and Dovecot
# too before the two cold loads (empty caches), then both queues must be
# empty and the server's CPU time must have stopped rising (bounded), and
# an unmeasured warm-up runs (100 anonymous sessions and 32 AUTH of a user
# outside the 300).
#
# Installs postfix and dovecot-core from Debian's packages when missing,
# reconfigures the local Postfix to listen on 127.0.0.1:2711-2713 only
# (main.cf and master.cf are restored at the end), runs Dovecot from a
# config of its own (auth only, no IMAP/POP3 listener) and leaves both
# stopped. Run it as root on a machine you can spare.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-2000}
WARM_ROUNDS=${WARM_ROUNDS:-10}
USERS=${USERS:-300}   # users, and AUTH at once in the burst loads
BURST=$USERS
SINK=127.0.0.1:2610
FERRY_PORT=2710
POSTFIX_PORT=2711
GUESS_PORT=2712    # Postfix's smtpd with the AUTH rate limit (guessing load)
NOSASL_PORT=2713   # Postfix's smtpd without SASL (anonymous baseline)
PASSWORD=bench-secret
LIMIT=300          # seconds any one wait may take

if ! command -v smtp-sink >/dev/null || ! command -v dovecot >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix dovecot-core >/dev/null
fi
cargo build --release -q
FERRY_BIN=target/release/ferry
LOAD=bench/auth_load.py
work=$(mktemp -d)
chmod 755 "$work"
cp -p /etc/postfix/main.cf /etc/postfix/master.cf "$work/"
sink_pid=
ferry_pid=
cleanup() {
  stop_ferry || true
  [ -n "$sink_pid" ] && kill "$sink_pid" 2>/dev/null || true
  stop_postfix || true
  stop_dovecot || true
  postfix stop >/dev/null 2>&1 || true
  doveadm -c "$work/dovecot.conf" stop >/dev/null 2>&1 || true
  cp -p "$work/main.cf" "$work/master.cf" /etc/postfix/ 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Waits (bounded, 0.1 s steps) until a command succeeds.
until_ok() {
  local i
  for i in $(seq $((LIMIT * 10))); do "$@" && return 0; sleep 0.1; done
  echo "gave up waiting for: $*" >&2
  return 1
}
gone() { ! kill -0 "$1" 2>/dev/null; }

echo "hashing $USERS passwords..." >&2
users=()
: >"$work/dovecot.passwd"
: >"$work/users.toml"
for i in $(seq -f "%03g" 1 "$USERS") warmup; do
  case $i in warmup) name=warmup ;; *) name="dev$i"; users+=("$name") ;; esac
  h=$(echo "$PASSWORD" | "$FERRY_BIN" user hash)
  printf '[[users]]\nname = "%s"\npassword_hash = "%s"\nallowed_senders = ["*"]\n\n' "$name" "$h" >>"$work/users.toml"
  printf '%s:{ARGON2ID}%s\n' "$name" "$h" >>"$work/dovecot.passwd"
done
user_list=$(IFS=,; echo "${users[*]}")

# Ferry: one worker, one connector taking anonymous and authenticated
# senders (AUTH without TLS: loopback, and TLS is not what is measured).
# max_verifications stays at its default, the number of cores.
cat >"$work/ferry.toml" <<TOML
accepted_domains = [{ domain = "example.test", kind = "authoritative" }]

[[connectors]]
name = "Bench"
port = $FERRY_PORT
remote_ranges = ["127.0.0.0/8"]
permissions = ["anonymous", "users"]
auth = ["basic_auth"]
limits = { max_connections_per_source = 5000, tarpit = "0s" }

[[routes]]
domains = ["*"]
type = "smtp"
next_hops = ["$SINK"]
tls = "none"

[delivery]
retry_interval = "1s"

[auth]
cache_ttl = "10m"
negative_cache_ttl = "1m"

$(cat "$work/users.toml")
TOML
echo "bench-admin-token-$$-$RANDOM" >"$work/admin.token"
ferry_ready() { grep -q "worker ready" "$work/ferry.out"; }
start_ferry() {
  : >"$work/ferry.out"
  "$FERRY_BIN" worker --config "$work/ferry.toml" --listen 127.0.0.1 \
    --admin-token-file "$work/admin.token" \
    --data "$work/ferry-data" --admin 127.0.0.1:0 --hostname bench.test \
    >"$work/ferry.out" 2>>"$work/ferry.log" &
  ferry_pid=$!
  until_ok ferry_ready
  ferry_metrics="$(sed -n 's|^worker admin \(http://[^ ]*\).*|\1|p' "$work/ferry.out")/metrics"
  ferry_admin=$(sed -n 's|^worker admin http://\([^/ ]*\).*|\1|p' "$work/ferry.out")
}
stop_ferry() {
  [ -n "$ferry_pid" ] || return 0
  kill "$ferry_pid" 2>/dev/null || true
  until_ok gone "$ferry_pid"
  wait "$ferry_pid" 2>/dev/null || true
  ferry_pid=
}
# Ferry's spool is empty: asked of the queue itself, as bench/relay.sh
# does (the ferry_queue_messages gauge is refreshed by the delivery loop
# when it wakes, so it can read the last count for up to a minute).
ferry_idle() {
  "$FERRY_BIN" queue --admin "$ferry_admin" --token-file "$work/admin.token" list 2>/dev/null |
    tail -1 | grep -q '^0 messages'
}

# Dovecot: the auth service only, its socket where Postfix's smtpd looks.
# passwd-file lookups (in memory) and every password verification, cache
# hits included, run in the single auth process. That is the faster of
# the two here: with auth_cache_verify_password_with_worker = yes cache
# hits go to auth workers on both cores, but 4 x 60 warm AUTH ran at
# 47-52/s that way (2 or 30 workers) and at 47-67/s without it, the
# client and smtpd taking the other core. The per-IP auth penalty (2, 4,
# 8, 15 s after failures, whatever auth_failure_delay says) is off: its
# anvil socket has mode 0.
cat >"$work/dovecot.conf" <<CONF
protocols =
listen = 127.0.0.1
base_dir = $work/dovecot-run
state_dir = $work/dovecot-state
log_path = $work/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_cache_size = 10M
auth_cache_ttl = 10 mins
auth_cache_negative_ttl = 1 mins
auth_failure_delay = 0
passdb {
  driver = passwd-file
  args = $work/dovecot.passwd
}
userdb {
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}
service auth {
  unix_listener /var/spool/postfix/private/auth {
    mode = 0660
    user = postfix
    group = postfix
  }
}
service anvil {
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
CONF
dovecot_pid=
dovecot_up() { [ -S /var/spool/postfix/private/auth ] && [ -s "$work/dovecot-run/master.pid" ]; }
start_dovecot() {
  dovecot -c "$work/dovecot.conf"
  until_ok dovecot_up
  dovecot_pid=$(cat "$work/dovecot-run/master.pid")
}
stop_dovecot() {
  [ -n "$dovecot_pid" ] || return 0
  doveadm -c "$work/dovecot.conf" stop >/dev/null 2>&1 || kill "$dovecot_pid" 2>/dev/null || true
  until_ok gone "$dovecot_pid"
  dovecot_pid=
}

# Postfix: the same relay, AUTH through Dovecot, enough processes for 300
# sessions at once. No reverse lookup of clients (Ferry does none either;
# with it, clients outside /etc/hosts wait for the resolver, and at 16
# lookups at once some time out after 5 s). The guessing load's service
# has anvil's AUTH rate limit on, over 10 minutes like Ferry's
# failure_window (clients in mynetworks are exempt by default).
postfix stop >/dev/null 2>&1 || true
postconf -e "inet_interfaces = 127.0.0.1" "inet_protocols = ipv4" \
  "mynetworks = 127.0.0.0/8" "relayhost = [127.0.0.1]:${SINK#*:}" \
  "mydestination =" "myhostname = bench.test" "default_process_limit = 400" \
  "smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject" \
  "smtpd_sasl_auth_enable = yes" "smtpd_sasl_type = dovecot" \
  "smtpd_sasl_path = private/auth" "smtpd_tls_auth_only = no" \
  "smtpd_tls_security_level = none" "smtpd_peername_lookup = no" \
  "anvil_rate_time_unit = 600s"
postconf -X maillog_file
postconf -M "127.0.0.1:$POSTFIX_PORT/inet=127.0.0.1:$POSTFIX_PORT inet n - n - - smtpd"
postconf -M "127.0.0.1:$GUESS_PORT/inet=127.0.0.1:$GUESS_PORT inet n - n - - smtpd -o smtpd_client_auth_rate_limit=5 -o smtpd_client_event_limit_exceptions="
postconf -M "127.0.0.1:$NOSASL_PORT/inet=127.0.0.1:$NOSASL_PORT inet n - n - - smtpd -o smtpd_sasl_auth_enable=no"
postfix_pid=
postfix_up() { postfix status >/dev/null 2>&1 && [ -s /var/spool/postfix/pid/master.pid ]; }
start_postfix() {
  postfix start >/dev/null 2>&1 || { postfix check >&2; echo "postfix did not start" >&2; exit 1; }
  until_ok postfix_up
  postfix_pid=$(tr -d ' ' </var/spool/postfix/pid/master.pid)
}
stop_postfix() {
  [ -n "$postfix_pid" ] || return 0
  postfix stop >/dev/null 2>&1 || true
  until_ok gone "$postfix_pid"
  postfix_pid=
}
postfix_queued() { postqueue -j 2>/dev/null | wc -l; }

smtp-sink -u nobody -c "$SINK" 1024 >/dev/null 2>&1 &
sink_pid=$!

# Settled: the running systems' queues are empty and the measured tree's
# CPU time rose by less than 10 ms in the last half second (deliveries,
# Dovecot's auth processes finishing, processes exiting). Each check
# takes half a second.
settled() {
  local roots=$1 c0 c1
  c0=$(python3 "$LOAD" cpu "$roots")
  sleep 0.5
  [ -z "$ferry_pid" ] || ferry_idle || return 1
  [ -z "$postfix_pid" ] || [ "$(postfix_queued)" = 0 ] || return 1
  c1=$(python3 "$LOAD" cpu "$roots")
  awk -v a="$c0" -v b="$c1" 'BEGIN { exit !(b - a < 0.01) }'
}
settle() {
  local i
  for i in $(seq $((LIMIT * 2))); do settled "$1" && return 0; done
  echo "not settled after ${LIMIT}s (queues or CPU); measuring anyway" >&2
}

# measure SYSTEM LOAD N FRESH|warm [auth_load.py options...] -> the load's
# line in $work/line (not in a pipeline: it restarts processes and keeps
# their ids)
measure() {
  local sys=$1 load=$2 n=$3 fresh=$4 port roots
  shift 4
  if [ "$sys" = ferry ]; then
    [ "$fresh" = fresh ] && { stop_ferry; start_ferry; }
    port=$FERRY_PORT roots=$ferry_pid
  else
    stop_postfix
    [ "$fresh" = fresh ] && { stop_dovecot; start_dovecot; }
    start_postfix
    port=$POSTFIX_PORT roots="$postfix_pid,$dovecot_pid"
  fi
  settle "$roots"
  python3 "$LOAD" "$port" "$roots" warmup "$PASSWORD" sessions-anon 100 >/dev/null
  python3 "$LOAD" "$port" "$roots" warmup "$PASSWORD" sessions-auth 32 >/dev/null
  settle "$roots"
  case $load in
    guess) [ "$sys" = postfix ] && port=$GUESS_PORT ;;
    sessions-nosasl) port=$NOSASL_PORT load=sessions-anon ;;
  esac
  python3 "$LOAD" "$@" "$port" "$roots" "$user_list" "$PASSWORD" "$load" "$n" >"$work/line"
}

row() {
  local label=$1 sys=$2 _load ok total secs rate pss cpu breakdown
  read -r _load ok total secs rate pss cpu breakdown <"$work/line"
  printf "%-20s %-16s %8s %10s %9s  %s\n" "$label" "$sys" "$rate" "$pss" "$cpu" "$breakdown"
  echo "$label $sys $rate $ok" >>"$work/rates"
}

one() {
  local label=$1
  shift
  if measure "$@"; then row "$label" "$name"; else echo "$label $name: the load failed" >&2; fi
}

printf "%-20s %-16s %8s %10s %9s  %s\n" load system "ok/s" "peak PSS MB" "CPU ms" "replies"
for sys in ferry postfix; do
  # The first load of a phase starts its system (fresh).
  name=ferry
  [ "$sys" = postfix ] && { name=postfix+dovecot; stop_ferry; }
  one auth-wrong $sys auth-wrong "$BURST" fresh --net 127.1
  one auth-right-cold $sys auth-right "$BURST" fresh --net 127.2
  one auth-right-warm $sys auth-right "$BURST" warm --net 127.3 --rounds "$WARM_ROUNDS"
  one sessions-anon $sys sessions-anon "$N" warm
  if [ "$sys" = postfix ]; then
    one sessions-anon-nosasl $sys sessions-nosasl "$N" warm
  fi
  one sessions-auth $sys sessions-auth "$N" warm
  one guess $sys guess 20 warm --net 127.4
  if [ "$sys" = ferry ]; then
    echo "ferry since its last restart: $(curl -s "$ferry_metrics" | grep -E '^ferry_auth_(verifications|cache)[a-z_]*_total' | tr '\n' ' ')"
  fi
done
awk '
  { rate[$1 " " $2] = $3 }
  END {
    for (s in rate) { split(s, k, " "); sys[k[2]] = 1 }
    for (x in sys)
      if (rate["sessions-anon " x] > 0)
        printf "authenticated/anonymous session rate, %s: %.2f\n", x, rate["sessions-auth " x] / rate["sessions-anon " x]
    n = split("auth-wrong auth-right-cold auth-right-warm sessions-anon sessions-auth", l, " ")
    for (i = 1; i <= n; i++)
      if (rate[l[i] " postfix+dovecot"] > 0)
        printf "ferry/postfix+dovecot, %s: %.2f\n", l[i], rate[l[i] " ferry"] / rate[l[i] " postfix+dovecot"]
  }' "$work/rates"
