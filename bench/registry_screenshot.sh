#!/usr/bin/env bash
# A picture of the MLflow UI on the embedded registry that `make demo` fills: a registered version (MODEL=name).
#   bash bench/registry_screenshot.sh [OUT.png]     (needs Debian's chromium: apt-get install chromium)
# Starts `mlflow server` on the SQLite store under artifacts/registry/ on a free loopback port, renders
# the page headless and stops the server.
set -euo pipefail
OUT="${1:-artifacts/bench/registry-ui.png}"
PY="${PY:-.venv/bin/python}"
PORT=$("$PY" -c 'from runtime.bench import free_port; print(free_port())')
mkdir -p "$(dirname "$OUT")"
"$PY" -m mlflow server --backend-store-uri "sqlite:///$PWD/artifacts/registry/mlflow.db" \
    --default-artifact-root "$PWD/artifacts/registry/artifacts" --host 127.0.0.1 --port "$PORT" --workers 1 \
    > /tmp/mlflow-ui.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  sleep 0.5
done
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,800 \
    --virtual-time-budget=15000 --screenshot="$OUT" "http://127.0.0.1:$PORT/#/models/${MODEL:-smollm2-onnx-int4}/versions/1" 2>/dev/null
echo "wrote $OUT"
