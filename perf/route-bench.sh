#!/bin/bash
# The cost of routing on ingest: the hub with no routes against the hub with 20 routes whose
# property conditions never match (each message evaluates all 20, then the fallback appends it to
# `events`). Interleaved, 3 rounds (ROUNDS=n for more); hub on CPU 0, ingot-load on CPU 1, QoS 1, 100 B, window 32.
#   cargo build --release -p ingot-control-plane -p ingot-perf && perf/route-bench.sh
set -euo pipefail
B=${CARGO_TARGET_DIR:-target}/release
# Another run on the same ports would take the load instead of this run's hub: PORT=n moves them.
PORT=${PORT:-18883}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
{
  printf '[routing]\nfallback = true\n\n[[routing.endpoints]]\nname = "alerts"\ntype = "log"\n\n'
  for i in $(seq 0 19); do
    printf '[[routing.routes]]\nname = "r%d"\n' "$i"
    printf "condition = \"level = 'critical-%d' AND \$connectionDeviceId = 'load-%d'\"\n" "$i" "$i"
    printf 'endpointNames = ["alerts"]\n\n'
  done
} > "$WORK/routes20.toml"
for round in $(seq 1 "${ROUNDS:-3}"); do
  for mode in none routes20; do
    D="$WORK/hub-$mode-$round"
    CFG=(); [ "$mode" = routes20 ] && CFG=(--config "$WORK/routes20.toml")
    INGOT_STORE__SEGMENT_BYTES_MAX=67108864 taskset -c 0 "$B/ingot" serve "${CFG[@]}" --data-dir "$D" \
      --https-port $((PORT - 440)) --mqtt-port "$PORT" --mqtt-tls-port $((PORT + 1)) --listen-address 127.0.0.1 --fsync never \
      > "$WORK/$mode.log" 2>&1 &
    HUB=$!
    sleep 2
    if ! kill -0 "$HUB" 2>/dev/null; then
      echo "$mode round $round: the hub did not start:" >&2; tail -3 "$WORK/$mode.log" >&2; exit 1
    fi
    "$B/ingot-load" run --target ingot --data-dir "$D" --port "$PORT" --cpus 1 --devices 100 --qos 1 \
      --window 32 --payload 100 --duration 5 --warmup 1 --quiet 2>&1 | tail -1 | sed "s/^/$mode round $round: /"
    kill "$HUB"; wait "$HUB" 2>/dev/null || true
    rm -rf "$D"
  done
done
