#!/usr/bin/env bash
# The local demo (README's first command): builds kpx, runs the controlplane on the example
# cluster in deploy/examples (file source), and shows with kpxctl what each node would run.
# Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> building kpx (release)"
cargo build --release --locked -q -p kpx-controlplane -p kpx-client
bin=target/release

port=${KPX_DEMO_PORT:-10900}
addr="127.0.0.1:${port}"
workdir=$(mktemp -d)
cleanup() {
  [[ -n "${cp_pid:-}" ]] && kill "$cp_pid" 2>/dev/null && wait "$cp_pid" 2>/dev/null || true
  rm -rf "$workdir"
}
trap cleanup EXIT

# Another server on the port would answer in place of ours.
if (exec 3<>"/dev/tcp/127.0.0.1/${port}") 2>/dev/null; then
  echo "port ${port} is already in use; pick another with KPX_DEMO_PORT=<port> $0" >&2
  exit 1
fi

cp -r deploy/examples/. "$workdir/"
echo "==> starting kpx-controlplane --listen $addr --manifests $workdir"
"$bin/kpx-controlplane" --listen "$addr" --manifests "$workdir" --manifests-poll-interval 200ms 2>"$workdir/controlplane.log" &
cp_pid=$!

kpxctl() { "$bin/kpxctl" --controlplane "http://$addr" "$@"; }
ready=
for _ in $(seq 1 100); do
  kill -0 "$cp_pid" 2>/dev/null || break
  kpxctl state node-a >/dev/null 2>&1 && { ready=1; break; }
  sleep 0.1
done
if [[ -z "$ready" ]]; then
  echo "kpx-controlplane did not come up; its log:" >&2
  cat "$workdir/controlplane.log" >&2
  exit 1
fi

echo; echo "==> kpxctl nodes"; kpxctl nodes
echo; echo "==> kpxctl state node-a"; kpxctl state node-a
echo; echo "==> kpxctl state node-b   (web-local: only node-b's own pod is local here)"; kpxctl state node-b
echo; echo "==> kpxctl service demo/web-local"; kpxctl service demo/web-local

echo; echo "==> pod 10.244.1.3 of demo/web starts terminating (its EndpointSlice changes)"
python3 - "$workdir/web.yaml" <<'PY'
import re, sys
path = sys.argv[1]
text = open(path).read()
block = re.search(r"- addresses:\n  - 10\.244\.1\.3\n  conditions:\n    ready: true\n    serving: true\n    terminating: false", text)
new = block.group(0).replace("ready: true", "ready: false").replace("serving: true", "serving: false").replace("terminating: false", "terminating: true")
open(path, "w").write(text.replace(block.group(0), new))
PY
# The change reaches the controlplane at its next poll of the directory.
web_has_pod() { kpxctl state node-a | grep '^demo/web:http ' | grep -q '10\.244\.1\.3'; }
for _ in $(seq 1 50); do
  web_has_pod || break
  sleep 0.1
done
if web_has_pod; then
  echo "the controlplane did not pick up the change; its log:" >&2
  cat "$workdir/controlplane.log" >&2
  exit 1
fi
echo; echo "==> kpxctl service demo/web   (10.244.1.3 is gone on every node)"; kpxctl service demo/web
echo; echo "==> kpxctl nodes"; kpxctl nodes
echo; echo "demo done (the dataplane that programs these rules into the kernel is the next milestone)"
