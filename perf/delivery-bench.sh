#!/bin/bash
# Ingest with every message routed to a `log` endpoint against the same to a `files` endpoint,
# whose delivery worker reads the log and writes JSON-lines files while ingest runs. Interleaved,
# 2 rounds; the hub on CPU 0 (taskset), so its delivery and its ingest share one core.
#   cargo build --release -p ingot-control-plane -p ingot-perf && perf/delivery-bench.sh
set -euo pipefail
B=${CARGO_TARGET_DIR:-target}/release
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
for kind in log files; do
  {
    printf '[[routing.endpoints]]\nname = "out"\ntype = "%s"\n' "$kind"
    [ "$kind" = files ] && printf 'path = "%s/files"\nbatchFrequencyInSeconds = 1\nmaxChunkSizeInBytes = 67108864\n' "$WORK"
    printf '\n[[routing.routes]]\nname = "all"\nendpointNames = ["out"]\n'
  } > "$WORK/$kind.toml"
done
for round in 1 2; do
  for kind in log files; do
    D="$WORK/hub-$kind-$round"; rm -rf "$WORK/files"
    INGOT_STORE__SEGMENT_BYTES_MAX=67108864 taskset -c 0 "$B/ingot" serve --config "$WORK/$kind.toml" --data-dir "$D" \
      --https-port 28443 --mqtt-port 28883 --mqtt-tls-port 28884 --listen-address 127.0.0.1 --fsync never \
      > "$WORK/$kind.log" 2>&1 &
    HUB=$!
    sleep 2
    "$B/ingot-load" run --target ingot --data-dir "$D" --port 28883 --cpus 1 --devices 100 --qos 1 \
      --window 32 --payload 100 --duration 5 --warmup 1 --quiet 2>&1 | tail -1 | sed "s/^/$kind round $round: /"
    if [ "$kind" = files ]; then
      sleep 3
      echo "files round $round: $(find "$WORK/files" -type f -not -path '*/.ingot-tmp/*' | xargs cat | wc -l) lines in rolled files 3 s after the load, $(find "$WORK/files" -type f -not -path '*/.ingot-tmp/*' | wc -l) files"
    fi
    kill "$HUB"; wait "$HUB" 2>/dev/null || true
    rm -rf "$D"
  done
done
