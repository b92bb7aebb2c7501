#!/usr/bin/env bash
# perf/peers.sh: the peer brokers perf/compare measures Ingot against (mosquitto and rumqttd).
#
#   perf/peers.sh install                          mosquitto (Debian package) and rumqttd 0.20.0
#                                                  (cargo install into perf/.tools); idempotent
#   perf/peers.sh start mosquitto|rumqttd PORT [CPU]
#                                                  start one broker on 127.0.0.1:PORT only, pinned to
#                                                  CPU with taskset (default: no pinning); prints its
#                                                  PID on stdout (nothing else) once the port accepts
#   perf/peers.sh stop PID                         stop a broker this script started (TERM, then KILL)
#   perf/peers.sh path mosquitto|rumqttd           print the broker's executable
#
# Each started broker gets a loopback-only config, written with its log under
# perf/.tools/run/<broker>-<port>/ (git-ignored). Settings are chosen so that neither broker throttles
# QoS 1 ingest of 100 connections x window 32 (see perf/README.md, "Peers").
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
tools="$here/.tools"
rumqttd_version=0.20.0
rumqttd_bin="$tools/bin/rumqttd"

die() { echo "peers.sh: $*" >&2; exit 1; }
note() { echo "peers.sh: $*" >&2; }

sudo_if_needed() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

mosquitto_bin() {
  local bin
  bin=$(command -v mosquitto 2>/dev/null || true)
  [ -n "$bin" ] || { [ -x /usr/sbin/mosquitto ] && bin=/usr/sbin/mosquitto; }
  [ -n "$bin" ] || return 1
  echo "$bin"
}

install_mosquitto() {
  if mosquitto_bin >/dev/null; then
    note "mosquitto already installed: $(mosquitto_bin)"
    return
  fi
  note "installing mosquitto (Debian package)"
  export DEBIAN_FRONTEND=noninteractive
  if ! sudo_if_needed apt-get install -y --no-install-recommends mosquitto >&2; then
    sudo_if_needed apt-get update >&2
    sudo_if_needed apt-get install -y --no-install-recommends mosquitto >&2
  fi
  # The package enables a system service on 0.0.0.0:1883 where systemd runs; we never use it.
  if command -v systemctl >/dev/null && systemctl is-active --quiet mosquitto 2>/dev/null; then
    sudo_if_needed systemctl disable --now mosquitto >&2 || true
  fi
  mosquitto_bin >/dev/null || die "mosquitto did not install"
}

install_rumqttd() {
  if [ -x "$rumqttd_bin" ] && "$rumqttd_bin" --version 2>/dev/null | grep -q "$rumqttd_version"; then
    note "rumqttd $rumqttd_version already installed: $rumqttd_bin"
    return
  fi
  note "building rumqttd $rumqttd_version into $tools (takes minutes)"
  # No --locked: its lock file pins an old `metrics` that no longer builds on current Rust
  # (docs/design.md, "Pitfalls already seen on this kind of machine").
  cargo install rumqttd --version "$rumqttd_version" --root "$tools" >&2
  [ -x "$rumqttd_bin" ] || die "rumqttd did not install"
}

# Is something listening on 127.0.0.1:PORT? Asks ss rather than connecting, so the broker does not
# log an aborted connection; falls back to a connect where ss is missing.
port_accepts() {
  if command -v ss >/dev/null; then
    [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null | awk '$4 == "127.0.0.1:'"$1"'" || $4 ~ /^(0\.0\.0\.0|\*|\[::\]):/')" ]
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}

write_mosquitto_config() {
  local port=$1 conf=$2
  cat >"$conf" <<EOF
# Written by perf/peers.sh: loopback only, anonymous, nothing persisted, no per-client throttling.
per_listener_settings false
listener $port 127.0.0.1
allow_anonymous true
persistence false
# 0 = unlimited: QoS 1 in flight and queued per client must not throttle a window of 32 or more.
max_inflight_messages 0
max_inflight_bytes 0
max_queued_messages 0
max_queued_bytes 0
max_connections -1
set_tcp_nodelay true
sys_interval 0
log_dest stderr
log_type error
log_type warning
connection_messages false
EOF
}

write_rumqttd_config() {
  local port=$1 conf=$2
  # Schema: rumqttd 0.20.0's demo config (rumqttd.toml in the crate) and src/lib.rs (Config).
  # Only a v4 (MQTT 3.1.1) server; no v5, websocket, console or prometheus listeners.
  cat >"$conf" <<EOF
# Written by perf/peers.sh: one MQTT 3.1.1 listener on loopback, nothing else.
id = 0

[router]
# 10 000 connections is a perf/compare scenario; leave headroom.
max_connections = 20010
# Packets the router hands a connection per iteration (QoS 0 outgoing); the demo has 200.
max_outgoing_packet_count = 1024
# The demo's commitlog sizes.
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "127.0.0.1:$port"
# The demo waits 1 ms after each accept (caps connects at 1000/s); do not throttle connects.
next_connection_delay_ms = 0
    [v4.1.connections]
    connection_timeout_ms = 60000
    # Azure IoT Hub's 256 KiB message limit, so 1 KiB scenarios never hit the demo's 20 KiB limit.
    max_payload_size = 262144
    # Outgoing QoS 1 in flight per connection; well above a window of 32.
    max_inflight_count = 1024
    dynamic_filters = true
EOF
}

start() {
  local broker=${1:-} port=${2:-} cpu=${3:-}
  [ -n "$broker" ] && [ -n "$port" ] || die "usage: peers.sh start mosquitto|rumqttd PORT [CPU]"
  [[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || die "bad port: $port"
  if port_accepts "$port"; then
    die "127.0.0.1:$port already accepts connections; pick another port"
  fi
  local pin=()
  if [ -n "$cpu" ]; then
    command -v taskset >/dev/null || die "taskset not found (package util-linux)"
    pin=(taskset -c "$cpu")
  fi
  case "$broker" in
    mosquitto|rumqttd) ;;
    *) die "unknown broker: $broker (mosquitto or rumqttd)" ;;
  esac
  local run="$tools/run/$broker-$port"
  mkdir -p "$run"
  local cmd
  case "$broker" in
    mosquitto)
      local bin
      bin=$(mosquitto_bin) || die "mosquitto is not installed: run perf/peers.sh install"
      write_mosquitto_config "$port" "$run/mosquitto.conf"
      cmd=("$bin" -c "$run/mosquitto.conf")
      ;;
    rumqttd)
      [ -x "$rumqttd_bin" ] || die "rumqttd is not installed: run perf/peers.sh install"
      write_rumqttd_config "$port" "$run/rumqttd.toml"
      cmd=("$rumqttd_bin" --quiet --config "$run/rumqttd.toml")
      ;;
  esac
  # setsid: the broker outlives this script and a Ctrl-C in the caller's terminal.
  setsid "${pin[@]}" "${cmd[@]}" </dev/null >"$run/broker.log" 2>&1 &
  local pid=$!
  echo "$pid" >"$run/pid"
  local waited=0
  until port_accepts "$port"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -20 "$run/broker.log" >&2 || true
      die "$broker exited before accepting on 127.0.0.1:$port (log: $run/broker.log)"
    fi
    if [ "$waited" -ge 100 ]; then
      kill "$pid" 2>/dev/null || true
      die "$broker did not accept on 127.0.0.1:$port within 10 s (log: $run/broker.log)"
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  note "$broker pid $pid on 127.0.0.1:$port${cpu:+, CPU $cpu} (config and log: $run)"
  echo "$pid"
}

stop() {
  local pid=${1:-}
  [[ "$pid" =~ ^[0-9]+$ ]] || die "usage: peers.sh stop PID"
  if ! kill -0 "$pid" 2>/dev/null; then
    note "pid $pid is not running"
    return 0
  fi
  local comm
  comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
  case "$comm" in
    mosquitto|rumqttd) ;;
    *) die "pid $pid is '$comm', not a broker this script starts; not stopping it" ;;
  esac
  kill -TERM "$pid"
  local waited=0
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$waited" -ge 50 ]; then
      note "$comm (pid $pid) ignored SIGTERM for 5 s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  note "stopped $comm (pid $pid)"
}

case "${1:-}" in
  install)
    install_mosquitto
    install_rumqttd
    ;;
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  path)
    case "${2:-}" in
      mosquitto) mosquitto_bin || die "mosquitto is not installed" ;;
      rumqttd) [ -x "$rumqttd_bin" ] && echo "$rumqttd_bin" || die "rumqttd is not installed" ;;
      *) die "usage: peers.sh path mosquitto|rumqttd" ;;
    esac
    ;;
  *)
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
