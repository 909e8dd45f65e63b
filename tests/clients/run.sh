#!/usr/bin/env bash
# Real clients against a real sdserve (run by .ci/run after `cargo test`, which builds
# target/debug/sdserve): the official `openai` Python package, `webuiapi` (an
# AUTOMATIC1111 client), and the web playground driven in headless Chromium.
#
# What they need is installed here (a Python venv under target/, Debian's chromium when
# absent). A failure of a *test* fails the run; an install that cannot be done (no
# registry reachable) is reported as skipped, since it says nothing about sdserve.
set -uo pipefail
cd "$(dirname "$0")/../.."

port=${SDSERVE_CLIENT_TEST_PORT:-18931}
base="http://127.0.0.1:$port"
out=target/client-tests
mkdir -p "$out"
status=0

./target/debug/sdserve serve --bind "127.0.0.1:$port" >"$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; [ -n "${browser:-}" ] && kill $browser 2>/dev/null' EXIT
for _ in $(seq 1 120); do
  curl -sf "$base/ready" >/dev/null && break
  sleep 0.5
done
if ! curl -sf "$base/ready" >/dev/null; then
  echo "client tests: the server did not become ready"; cat "$out/server.log"; exit 1
fi

# Python clients.
venv=target/client-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import openai, webuiapi" 2>/dev/null; then
  python3 -m venv "$venv" && "$venv/bin/pip" install -q openai webuiapi >"$out/pip.log" 2>&1
fi
if "$venv/bin/python" -c "import openai, webuiapi" 2>/dev/null; then
  "$venv/bin/python" tests/clients/test_clients.py "$base" || status=1
else
  echo "client tests: skipped the Python clients (could not install openai/webuiapi; see $out/pip.log)"
fi

# The playground in headless Chromium (DevTools protocol; Node's built-in WebSocket).
if ! command -v chromium >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq chromium) >"$out/apt.log" 2>&1
fi
if command -v chromium >/dev/null && command -v node >/dev/null; then
  chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
    --disable-component-update --disable-sync --no-first-run --disable-quic \
    --user-data-dir="$(mktemp -d)" --remote-debugging-port=9339 --window-size=1100,900 \
    about:blank >"$out/chromium.log" 2>&1 &
  browser=$!
  for _ in $(seq 1 60); do curl -sf http://127.0.0.1:9339/json >/dev/null && break; sleep 0.5; done
  if node --experimental-websocket tools/playground_browser_check.mjs "$base/" \
      http://127.0.0.1:9339 "$out/playground"; then
    echo "1 passed, 0 failed (playground in Chromium; screenshots in $out)"
  else
    echo "0 passed, 1 failed (playground in Chromium)"; status=1
  fi
else
  echo "client tests: skipped the playground (no chromium/node; see $out/apt.log)"
fi
exit $status
