#!/usr/bin/env bash
# AUTH under load on one Ferry worker and on Postfix 3.7 with Dovecot SASL
# configured alike, in the same run, on loopback only: 300 AUTH at once
# with a wrong password, 300 with the right one (cache cold, then warm),
# N one-message sessions 16 at a time with and without AUTH on the same
# connector, and a password-guessing client. Each line gives the rate and
# the peak resident memory of the server (the worker; Postfix's master and
# Dovecot with all their processes).
#
#   bench/auth.sh                  # N=2000 sessions per session load
#   N=5000 bench/auth.sh
#
# 300 users dev001..dev300, each with its own argon2id hash from
# `ferry user hash` (m=19456 KiB, t=2, p=1); Dovecot verifies the same
# hashes ({ARGON2ID}, libsodium). Both sides cache verified credentials
# for 10 minutes and failures for 1 minute (Dovecot's auth_cache_ttl and
# auth_cache_negative_ttl); neither delays a failed AUTH (Ferry's tarpit
# "0s", Dovecot's auth_failure_delay 0), to measure the hashing alone.
# Installs postfix and dovecot-core from Debian's packages when missing,
# reconfigures the local Postfix to listen on 127.0.0.1:2711 only, runs
# Dovecot from a config of its own (auth only, no IMAP/POP3 listener) and
# stops both at the end. Run it as root on a machine you can spare.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-2000}
USERS=300
SINK=127.0.0.1:2610
FERRY_PORT=2710
POSTFIX_PORT=2711
PASSWORD=bench-secret

if ! command -v smtp-sink >/dev/null || ! command -v dovecot >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix dovecot-core >/dev/null
fi
cargo build --release -q
FERRY_BIN=target/release/ferry
work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  postfix stop >/dev/null 2>&1 || true
  [ -f "$work/dovecot.conf" ] && doveadm -c "$work/dovecot.conf" stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "hashing $USERS passwords..." >&2
users=()
: >"$work/dovecot.passwd"
: >"$work/users.toml"
for i in $(seq -f "%03g" 1 "$USERS"); do
  h=$(echo "$PASSWORD" | "$FERRY_BIN" user hash)
  users+=("dev$i")
  printf '[[users]]\nname = "dev%s"\npassword_hash = "%s"\nallowed_senders = ["*"]\n\n' "$i" "$h" >>"$work/users.toml"
  printf 'dev%s:{ARGON2ID}%s\n' "$i" "$h" >>"$work/dovecot.passwd"
done
user_list=$(IFS=,; echo "${users[*]}")

# Ferry: one worker, one connector taking anonymous and authenticated
# senders (AUTH without TLS: loopback, and TLS is not what is measured).
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
"$FERRY_BIN" worker --config "$work/ferry.toml" --listen 127.0.0.1 \
  --admin-token-file "$work/admin.token" \
  --data "$work/ferry-data" --admin 127.0.0.1:0 --hostname bench.test \
  >"$work/ferry.out" 2>"$work/ferry.log" &
pids+=($!)
ferry_pid=$!
for _ in $(seq 100); do grep -q "worker ready" "$work/ferry.out" && break; sleep 0.1; done

# Dovecot: the auth service only, its socket where Postfix's smtpd looks.
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
CONF
dovecot -c "$work/dovecot.conf"

# Postfix: the same relay, AUTH through Dovecot, enough processes for 300
# sessions at once.
postfix stop >/dev/null 2>&1 || true
postconf -e "inet_interfaces = 127.0.0.1" "inet_protocols = ipv4" \
  "mynetworks = 127.0.0.0/8" "relayhost = [127.0.0.1]:${SINK#*:}" \
  "mydestination =" "myhostname = bench.test" "default_process_limit = 400" \
  "smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject" \
  "smtpd_sasl_auth_enable = yes" "smtpd_sasl_type = dovecot" \
  "smtpd_sasl_path = private/auth" "smtpd_tls_auth_only = no" \
  "smtpd_tls_security_level = none"
postconf -X maillog_file
postconf -M "127.0.0.1:$POSTFIX_PORT/inet=127.0.0.1:$POSTFIX_PORT inet n - n - - smtpd"
postfix start >/dev/null 2>&1 || { postfix check >&2; echo "postfix did not start" >&2; exit 1; }
sleep 1

smtp-sink -u nobody -c "$SINK" 1024 >/dev/null 2>&1 &
pids+=($!)
sleep 0.3

postfix_pid=$(tr -d ' ' </var/spool/postfix/pid/master.pid)
dovecot_pid=$(cat "$work/dovecot-run/master.pid")

load() { python3 bench/auth_load.py "$1" "$2" "$user_list" "$PASSWORD" "$3" "${4:-300}"; }

printf "%-14s %-16s %10s %14s  %s\n" load system "rate/s" "peak RSS MB" replies
for l in auth-wrong auth-right auth-right sessions-anon sessions-auth guess; do
  n=300
  case $l in sessions-*) n=$N ;; guess) n=20 ;; esac
  read -r _ fr fm fs < <(load "$FERRY_PORT" "$ferry_pid" "$l" "$n")
  read -r _ pr pm ps < <(load "$POSTFIX_PORT" "$postfix_pid,$dovecot_pid" "$l" "$n")
  label=$l
  [ "$l" = auth-right ] && { [ -n "${cold:-}" ] && label="$l(warm)" || { label="$l(cold)"; cold=1; }; }
  printf "%-14s %-16s %10s %14s  %s\n" "$label" ferry "$fr" "$fm" "$fs"
  printf "%-14s %-16s %10s %14s  %s\n" "$label" postfix+dovecot "$pr" "$pm" "$ps"
  [ "$l" = sessions-anon ] && { fanon=$fr; panon=$pr; }
  [ "$l" = sessions-auth ] && { fauth=$fr; pauth=$pr; }
done
awk -v fa="$fanon" -v fu="$fauth" -v pa="$panon" -v pu="$pauth" 'BEGIN {
  printf "authenticated/anonymous session rate: ferry %.2f, postfix+dovecot %.2f\n", fu/fa, pu/pa }'
echo "ferry verifications: $(curl -s "$(sed -n 's|^worker admin \(http://[^ ]*\).*|\1|p' "$work/ferry.out")/metrics" | grep -E '^ferry_auth_(verifications|cache)_total' | tr '\n' ' ')"
