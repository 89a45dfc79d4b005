#!/usr/bin/env bash
# The local demo (README's first command). Builds kpx (release), then:
#
# As root: a two-node "cluster" in network namespaces, wired like the kernel-test harness
# (dataplane/tests/netns/topology.rs, IPv4 only) with the addresses of deploy/examples:
#
#   kpxdemo-client   bridge kpxlan: the node network 10.77.0.0/24
#                    client 10.77.0.100; kpx-controlplane on 10.77.0.2:10900
#          |                                        |
#   kpxdemo-node-a   eth0 10.77.0.10            kpxdemo-node-b   eth0 10.77.0.11
#     bridge kpxbr0 10.244.1.1/24                 bridge kpxbr0 10.244.2.1/24
#     kpx-dataplane --backend iptables            kpx-dataplane --backend iptables
#          |                                        |
#   kpxdemo-web-1  10.244.1.2                   kpxdemo-web-3  10.244.2.2
#   kpxdemo-web-2  10.244.1.3                   kpxdemo-echo-2 10.244.2.3
#   kpxdemo-echo-1 10.244.1.4
#   (every pod runs kpx-testpod serve NAME: web-* on 8080, echo-* on 5353)
#
# The controlplane reads a temporary copy of deploy/examples (file source); each dataplane runs
# inside its node's namespace (as it would with hostNetwork) and programs that namespace's
# iptables. Everything runs secured, as in a cluster: `kpxctl certs` makes a CA, the
# controlplane's serving certificate and kubelet-style node certificates (CN=system:node:NAME)
# plus an admin certificate for kpxctl; the controlplane serves TLS and knows each node by its
# certificate, and the demo shows a dataplane holding node-b's certificate refused as node-a. The demo sends real TCP and UDP requests through the services and prints which pod
# answered (checking each answer: it exits 1 if one is wrong), shows `kpxctl nodes`, then makes
# one endpoint not ready and shows that traffic stops reaching it. Nothing outside the kpxdemo-*
# namespaces is touched (no host interface, route or iptables rule); on every exit path every
# process it started is killed by PID and every namespace it created deleted. kpxdemo-*
# namespaces left by a run that was killed (and the processes in them) are removed first; one
# demo runs at a time (lock: /run/kpx-demo.lock, taken over when its owner is gone).
#
# Without root (or without iproute2/iptables/network namespaces), or with
# KPX_DEMO_FORCE_DRY_RUN=1: the controlplane on 127.0.0.1:${KPX_DEMO_PORT:-10900} and the two
# dataplanes with --backend dry-run, which print the iptables-restore input they would apply.
#
# When cargo is not on PATH (sudo) the binaries already built in target/release are used.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

if [[ -t 1 ]]; then bold=$'\e[1m' dim=$'\e[2m' red=$'\e[31m' off=$'\e[0m'; else bold='' dim='' red='' off=''; fi
heading() { printf '\n%s== %s%s\n' "$bold" "$*" "$off"; }
note() { printf '%s   %s%s\n' "$dim" "$*" "$off"; }
fail() { printf '%sdemo failed: %s%s\n' "$red" "$*" "$off" >&2; exit 1; }

target=${CARGO_TARGET_DIR:-target}
[[ $target == /* ]] || target=$repo/$target
bin=$target/release
binaries=(kpx-controlplane kpx-dataplane kpxctl kpx-testpod)
have_binaries() { local b; for b in "${binaries[@]}"; do [[ -x $bin/$b ]] || return 1; done; }
if command -v cargo >/dev/null; then
  heading "building kpx (release)"
  cargo build --release --locked -q -p kpx-controlplane -p kpx-client -p kpx-dataplane
elif have_binaries; then
  # Typically `sudo deploy/demo.sh`: sudo's PATH has no ~/.cargo/bin.
  heading "cargo is not on PATH: using the binaries already built in $bin"
else
  fail "cargo is not on PATH (under sudo: sudo env \"PATH=\$PATH\" $0, or build first with cargo build --release)"
fi
started=$SECONDS

# ---------------------------------------------------------------------------------------------
# Which demo: real traffic in network namespaces, or dry-run.
mode=kernel reason=
if [[ ${KPX_DEMO_FORCE_DRY_RUN:-} == 1 ]]; then
  mode=dry-run reason="KPX_DEMO_FORCE_DRY_RUN=1"
elif [[ $EUID -ne 0 ]]; then
  mode=dry-run reason="not running as root (network namespaces and iptables need root)"
elif ! command -v ip >/dev/null || ! command -v iptables-restore >/dev/null; then
  # As root the tools are installed the way CI installs them (scripts/install-tools).
  heading "installing iproute2 and iptables (scripts/install-tools demo)"
  if ! scripts/install-tools demo; then
    mode=dry-run reason="iproute2 or iptables is missing and could not be installed (see above)"
  elif ! command -v ip >/dev/null || ! command -v iptables-restore >/dev/null; then
    mode=dry-run reason="iproute2 or iptables is still missing after installing"
  fi
fi

workdir=$(mktemp -d -t kpxdemo.XXXXXX)
lock=
pids=()       # every process this run started
namespaces=() # every namespace this run created

# Kills whatever still runs inside namespace $1 (by PID), then deletes it.
delete_ns() {
  local pid
  for pid in $(ip netns pids "$1" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  ip netns del "$1" 2>/dev/null || true
}

# On every exit path: SIGTERM to every process this run started (SIGKILL to those still there
# after 3 s), then the namespaces, then the temporary directory. A second Ctrl-C does not
# interrupt it.
cleanup() {
  local rc=$?
  trap '' INT TERM
  ((rc == 130 || rc == 143)) && printf '\n%sinterrupted; cleaning up%s\n' "$bold" "$off"
  trap - EXIT
  set +e
  local pid ns alive
  if ((${#pids[@]})); then
    kill "${pids[@]}" 2>/dev/null
    for _ in $(seq 30); do
      alive=0
      for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
      ((alive)) || break
      sleep 0.1
    done
    kill -KILL "${pids[@]}" 2>/dev/null
    wait "${pids[@]}" 2>/dev/null
  fi
  for ns in "${namespaces[@]}"; do delete_ns "$ns"; done
  rm -rf "$workdir"
  [[ -n ${lock:-} ]] && rm -rf "$lock"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Starts "$@" in the background (stdout to $out, stderr to $err) and records its PID. Under
# `ip netns exec` the PID is the program's: ip execs it.
out=/dev/null err=/dev/null
spawn() {
  "$@" >"$out" 2>"$err" &
  pids+=($!)
}

mkdir "$workdir/manifests"
cp deploy/examples/*.yaml "$workdir/manifests/"
pki=$workdir/pki

# kpxctl as the demo's admin (O=system:masters: may inspect every node).
kpxctl() {
  "${run_in_client[@]}" "$bin/kpxctl" --controlplane "https://$cp_addr" \
    --cacert "$pki/ca.pem" --cert "$pki/admin.pem" --key "$pki/admin-key.pem" "$@"
}

# make_certs ADDR...: a CA, the controlplane's certificate for ADDR..., node-a's and node-b's
# (CN=system:node:NAME, as kubelets have) and an admin's, with kpx's own helper.
make_certs() {
  local names=() a
  for a in "$@"; do names+=(--server-name "$a"); done
  heading "certificates: kpxctl certs --dir <tmp>/pki ${names[*]} --node node-a --node node-b --admin demo-admin"
  "$bin/kpxctl" certs --dir "$pki" "${names[@]}" --node node-a=10.77.0.10 --node node-b=10.77.0.11 \
    --admin demo-admin | sed "s|$pki/||g; s|^|   |"
}

# The controlplane's TLS flags: its certificate, and the CA node and admin certificates come from.
cp_tls=(--tls-cert-file "$pki/server.pem" --tls-private-key-file "$pki/server-key.pem" --client-ca-file "$pki/ca.pem")

# node_tls NODE: sets tls to a dataplane's flags for reaching the controlplane as NODE.
node_tls() {
  tls=(--controlplane "https://$cp_addr" --cacert "$pki/ca.pem" --cert "$pki/node-$1.pem" --key "$pki/node-$1-key.pem")
}

# impersonation RUN-PREFIX...: a dataplane holding node-b's certificate asks to subscribe as
# node-a. The controlplane refuses it (PERMISSION_DENIED) before it reads or changes anything:
# the real node-a stays connected and in sync.
impersonation() {
  heading "impersonation: a dataplane with node-b's certificate runs as --node node-a"
  local log=$workdir/impostor.log tls
  node_tls node-b
  err=$log spawn "$@" "$bin/kpx-dataplane" --node node-a "${tls[@]}" --backend dry-run \
    --admin-listen "" --healthz-bind-address 127.0.0.1:0 --metrics-bind-address 127.0.0.1:0
  local impostor=${pids[-1]}
  refused() { grep -q "may subscribe only as itself" "$log"; }
  wait_for 15 "the controlplane to refuse the impostor" refused
  kill "$impostor" 2>/dev/null || true
  note "the impostor's log: the controlplane refused this node's credentials:"
  grep -o 'node \\"node-b\\" (client certificate) may subscribe only as itself, not as node \\"node-a\\"' "$log" |
    head -1 | sed 's/\\"/"/g; s/^/     /'
  note "and kpxctl with node-b's certificate may read node-b's state, not node-a's:"
  "${run_in_client[@]}" "$bin/kpxctl" --controlplane "https://$cp_addr" --cacert "$pki/ca.pem" \
    --cert "$pki/node-node-b.pem" --key "$pki/node-node-b-key.pem" state node-a 2>&1 | sed 's/^/     /' || true
  both_acked || fail "node-a or node-b is no longer in sync after the refused impersonation"
  note "node-a and node-b are still connected and in sync"
}

# How many times $2 occurs in $1.
count() {
  local s=$1 n=0
  while [[ $s == *"$2"* ]]; do s=${s#*"$2"}; n=$((n + 1)); done
  echo "$n"
}

# Both nodes connected, and each has ACKed its current desired version (BEHIND 0).
both_acked() {
  local json
  json=$(kpxctl -o json nodes 2>/dev/null) || return 1
  [[ $(count "$json" '"connected": true') == 2 && $(count "$json" '"versions_behind": 0') == 2 ]]
}

# The desired versions of all nodes, space separated.
desired_versions() {
  local json v='' re='"desired_version": "([0-9a-f]*)"'
  json=$(kpxctl -o json nodes 2>/dev/null) || return 1
  while [[ $json =~ $re ]]; do
    v+="${BASH_REMATCH[1]} "
    json=${json#*"${BASH_REMATCH[0]}"}
  done
  echo "$v"
}

wait_for() { # SECONDS WHAT CMD...: polls CMD every 0.1 s
  local secs=$1 what=$2
  shift 2
  for _ in $(seq $((secs * 10))); do
    "$@" && return 0
    sleep 0.1
  done
  show_logs
  fail "timed out after ${secs}s waiting for $what"
}

show_logs() {
  local f
  for f in "$workdir"/*.log; do
    [[ -s $f ]] || continue
    printf '\n--- %s\n' "${f##*/}" >&2
    cat "$f" >&2
  done
}

controlplane_up() {
  kill -0 "${pids[-1]}" 2>/dev/null || {
    show_logs
    fail "kpx-controlplane exited"
  }
  kpxctl nodes >/dev/null 2>&1
}

# The live change: demo/web's endpoint 10.244.1.3 (web-2) stops being ready, as when its
# readiness probe fails. Written atomically (rename) so the poller never reads half a file.
make_web2_not_ready() {
  local file=$workdir/manifests/web.yaml text
  local old=$'- addresses:\n  - 10.244.1.3\n  conditions:\n    ready: true\n    serving: true\n    terminating: false'
  local new=$'- addresses:\n  - 10.244.1.3\n  conditions:\n    ready: false\n    serving: false\n    terminating: false'
  text=$(<"$file")
  [[ $text == *"$old"* ]] || fail "deploy/examples/web.yaml no longer lists 10.244.1.3 as ready; update the demo"
  printf '%s\n' "${text/"$old"/"$new"}" >"$file.new"
  mv "$file.new" "$file"
}

# =============================================================================================
# dry-run: no root, no namespaces
# =============================================================================================
dry_run_demo() {
  local port=${KPX_DEMO_PORT:-10900}
  cp_addr=127.0.0.1:$port
  run_in_client=()
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    fail "port $port is already in use; pick another with KPX_DEMO_PORT=<port> $0"
  fi

  make_certs 127.0.0.1
  heading "kpx-controlplane --listen $cp_addr --manifests <copy of deploy/examples> --tls-cert-file ... --client-ca-file ..."
  err=$workdir/controlplane.log spawn "$bin/kpx-controlplane" --listen "$cp_addr" \
    --manifests "$workdir/manifests" --manifests-poll-interval 200ms "${cp_tls[@]}"
  wait_for 15 "kpx-controlplane" controlplane_up

  local node ip tls
  for node in node-a node-b; do
    node_tls "$node"
    [[ $node == node-a ]] && ip=10.77.0.10 || ip=10.77.0.11
    heading "kpx-dataplane --node $node --controlplane https://$cp_addr --cacert ... --cert node-$node.pem ... --backend dry-run --node-ip $ip"
    out=$workdir/$node.rules err=$workdir/$node.log spawn "$bin/kpx-dataplane" --node "$node" \
      "${tls[@]}" --backend dry-run --cluster-cidr 10.244.0.0/16 --node-ip "$ip" \
      --healthz-bind-address 127.0.0.1:0 --metrics-bind-address 127.0.0.1:0
  done
  wait_for 20 "both nodes to ACK" both_acked
  impersonation

  heading "the rules node-a would program (its dataplane's output: iptables-restore input)"
  cat "$workdir/node-a.rules"
  heading "node-b's rules differ in one chain: web-local's KUBE-SVL (externalTrafficPolicy Local)"
  note "each node sends external traffic for web-local only to its own pods:"
  kpxctl service demo/web-local

  heading "kpxctl nodes   (both connected; ACKED == VERSION, BEHIND 0)"
  kpxctl nodes

  heading "live change: demo/web's endpoint 10.244.1.3 becomes not ready"
  local before printed
  before=$(desired_versions)
  printed=$(wc -c <"$workdir/node-a.rules")
  make_web2_not_ready
  changed_and_acked() { [[ $(desired_versions) != "$before" ]] && both_acked; }
  wait_for 20 "the change to reach both nodes" changed_and_acked
  note "each node applies a delta: only demo/web's chains are rewritten"
  heading "what node-a printed for the delta"
  tail -c +"$((printed + 1))" "$workdir/node-a.rules"
  heading "kpxctl service demo/web   (10.244.1.3 is gone on every node)"
  kpxctl service demo/web
  heading "kpxctl nodes   (a new version, ACKed by both)"
  kpxctl nodes

  heading "done in $((SECONDS - started))s after the build (dry-run: $reason)"
  note "As root, this demo builds two nodes in network namespaces and sends real traffic through them."
}

# =============================================================================================
# kernel: namespaces, iptables, real traffic
# =============================================================================================
client_ns=kpxdemo-client
client_ip=10.77.0.100
# name node ip port
pod_table=(
  "web-1 node-a 10.244.1.2 8080"
  "web-2 node-a 10.244.1.3 8080"
  "echo-1 node-a 10.244.1.4 5353"
  "web-3 node-b 10.244.2.2 8080"
  "echo-2 node-b 10.244.2.3 5353"
)

mkns() {
  ip netns add "$1"
  namespaces+=("$1")
  ip -n "$1" link set lo up
}

node_ip() { [[ $1 == node-a ]] && echo 10.77.0.10 || echo 10.77.0.11; }
node_net() { [[ $1 == node-a ]] && echo 10.244.1 || echo 10.244.2; }

build_topology() {
  # The node network, and the client on it. The controlplane gets its own address there.
  mkns "$client_ns"
  ip -n "$client_ns" link add kpxlan type bridge
  ip -n "$client_ns" addr add "$client_ip/24" dev kpxlan
  ip -n "$client_ns" addr add 10.77.0.2/24 dev kpxlan
  ip -n "$client_ns" link set kpxlan up

  local node other ns
  for node in node-a node-b; do
    ns=kpxdemo-$node
    [[ $node == node-a ]] && other=node-b || other=node-a
    mkns "$ns"
    ip netns exec "$ns" "$bin/kpx-testpod" sysctl net.ipv4.ip_forward 1
    ip -n "$ns" link add eth0 type veth peer name "$node" netns "$client_ns"
    ip -n "$client_ns" link set "$node" master kpxlan up
    ip -n "$ns" addr add "$(node_ip "$node")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$client_ip"
    ip -n "$ns" link add kpxbr0 type bridge
    ip -n "$ns" addr add "$(node_net "$node").1/24" dev kpxbr0
    ip -n "$ns" link set kpxbr0 up
    ip -n "$ns" route add "$(node_net "$other").0/24" via "$(node_ip "$other")"
    ip -n "$client_ns" route add "$(node_net "$node").0/24" via "$(node_ip "$node")"
  done
  # Anything else (service addresses) goes to node-a, as to a cluster's gateway.
  ip -n "$client_ns" route add default via 10.77.0.10

  local row name pod_ip port
  for row in "${pod_table[@]}"; do
    read -r name node pod_ip port <<<"$row"
    ns=kpxdemo-$name
    mkns "$ns"
    ip -n "kpxdemo-$node" link add "v$name" type veth peer name eth0 netns "$ns"
    ip -n "kpxdemo-$node" link set "v$name" master kpxbr0 up
    # Hairpin, as the CNI bridge plugin's hairpinMode: a pod that reaches itself through a
    # service gets its packet back through the port it came from.
    ip -n "kpxdemo-$node" link set "v$name" type bridge_slave hairpin on
    ip -n "$ns" addr add "$pod_ip/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$(node_net "$node").1"
    out=$workdir/$name.out err=$workdir/$name.log spawn ip netns exec "$ns" "$bin/kpx-testpod" serve "$name" "$pod_ip:$port"
  done
  pod_ready() { [[ -s $workdir/$1.out && $(<"$workdir/$1.out") == ready* ]]; }
  for row in "${pod_table[@]}"; do
    read -r name _ <<<"$row"
    wait_for 10 "pod $name to listen" pod_ready "$name"
  done
}

# get FROM-NS PROTO ADDR:PORT [--from IP]: one request; sets answer (pod name), peer (the source
# address the pod saw, without port) and outcome (answered, refused, timeout, ...).
get() {
  local ns=$1 proto=$2 addr=$3 line
  shift 3
  line=$(ip netns exec "$ns" "$bin/kpx-testpod" get "$proto" "$addr" --timeout-ms 2000 "$@")
  local word pod p _local
  read -r word pod p _local <<<"$line"
  outcome=$word answer=${pod:-} peer=${p%:*}
}

problems=0
unexpected() {
  printf '%s   UNEXPECTED: %s%s\n' "$red" "$*" "$off"
  problems=$((problems + 1))
}

# show LABEL FROM-NS PROTO ADDR [--from IP]: one request, one line.
show() {
  local label=$1
  shift
  get "$@"
  print_result "$label"
}

# print_result LABEL: the last request's outcome, one line.
print_result() {
  local label=$1
  if [[ $outcome == answered ]]; then
    printf '   %-52s -> answered by %-7s (it saw the client as %s)\n' "$label" "$answer" "$peer"
  else
    printf '   %-52s -> %s\n' "$label" "$outcome"
  fi
}

# tally N FROM-NS PROTO ADDR: N requests; prints how many each pod answered and sets tallied
# to the answering pods (and other outcomes), space separated, in a fixed order.
tally() {
  local n=$1 i key
  shift
  local -A seen=()
  for ((i = 0; i < n; i++)); do
    get "$@"
    key=$outcome
    [[ $outcome == answered ]] && key=$answer
    seen[$key]=$((${seen[$key]:-0} + 1))
  done
  local summary=''
  tallied=''
  for key in web-1 web-2 web-3 echo-1 echo-2 refused unreachable reset timeout; do
    [[ -n ${seen[$key]:-} ]] || continue
    summary+="$key x${seen[$key]}, "
    tallied+="$key "
  done
  tallied=${tallied% }
  printf '   %d more: %s\n' "$n" "${summary%, }"
}

kernel_demo() {
  cp_addr=10.77.0.2:10900
  run_in_client=(ip netns exec "$client_ns")

  heading "network namespaces: node-a, node-b, five pods, a client on the node network"
  build_topology
  cat <<EOF
   kpxdemo-client   client $client_ip, controlplane $cp_addr   (bridge kpxlan: 10.77.0.0/24)
   kpxdemo-node-a   10.77.0.10, pods 10.244.1.0/24:  web-1 10.244.1.2   web-2 10.244.1.3   echo-1 10.244.1.4
   kpxdemo-node-b   10.77.0.11, pods 10.244.2.0/24:  web-3 10.244.2.2   echo-2 10.244.2.3
   every pod runs kpx-testpod serve NAME ADDR:PORT (web-* on 8080, echo-* on 5353)
EOF

  make_certs 10.77.0.2
  heading "kpx-controlplane --listen $cp_addr --manifests <copy of deploy/examples> --tls-cert-file ... --client-ca-file ...   (in kpxdemo-client)"
  note "not a loopback address: kpx serves it only with TLS and callers that prove who they are"
  err=$workdir/controlplane.log spawn ip netns exec "$client_ns" "$bin/kpx-controlplane" \
    --listen "$cp_addr" --manifests "$workdir/manifests" --manifests-poll-interval 200ms "${cp_tls[@]}"
  wait_for 15 "kpx-controlplane" controlplane_up

  local node tls
  for node in node-a node-b; do
    node_tls "$node"
    heading "kpx-dataplane --node $node --controlplane https://$cp_addr --cacert ... --cert node-$node.pem ... --backend iptables --cluster-cidr 10.244.0.0/16 --node-ip $(node_ip "$node")   (in kpxdemo-$node)"
    err=$workdir/$node.log spawn ip netns exec "kpxdemo-$node" "$bin/kpx-dataplane" --node "$node" \
      "${tls[@]}" --backend iptables --cluster-cidr 10.244.0.0/16 --node-ip "$(node_ip "$node")"
  done
  wait_for 20 "both nodes to ACK" both_acked
  note "both nodes have applied and ACKed their state"
  impersonation ip netns exec kpxdemo-node-b

  heading "node-a's service portals (iptables -t nat -S KUBE-SERVICES, in kpxdemo-node-a)"
  ip netns exec kpxdemo-node-a iptables -w -t nat -S KUBE-SERVICES

  heading "ClusterIP demo/web 10.96.0.10:80 -> web-1, web-2 (node-a), web-3 (node-b)"
  local i
  for i in 1 2 3 4 5 6; do
    show "GET 10.96.0.10:80 from pod echo-1" kpxdemo-echo-1 tcp 10.96.0.10:80
    [[ $outcome == answered && $answer == web-* ]] || unexpected "expected a web pod"
  done
  tally 30 kpxdemo-echo-1 tcp 10.96.0.10:80
  [[ $tallied == "web-1 web-2 web-3" ]] || unexpected "expected all three web pods and nothing else"
  show "GET 10.96.0.10:80 from pod echo-2 (node-b)" kpxdemo-echo-2 tcp 10.96.0.10:80
  [[ $answer == web-* ]] || unexpected "expected a web pod"
  note "pod to service to pod keeps the client pod's address"
  # Hairpin: web-1 through its own service, until the draw picks web-1 itself.
  for i in $(seq 20); do
    get kpxdemo-web-1 tcp 10.96.0.10:80
    [[ $answer == web-1 ]] && break
  done
  print_result "GET 10.96.0.10:80 from pod web-1 (hairpin; try $i)"
  [[ $answer == web-1 && $peer == 10.244.1.1 ]] || unexpected "expected web-1 itself, seeing node-a's bridge address"
  note "hairpin: a pod that reaches itself through its service is masqueraded to its node's"
  note "pod-bridge address, so that its reply goes back through the node"

  heading "NodePort demo/web-nodeport :30080 (externalTrafficPolicy Cluster) from the client"
  for node in node-a node-a node-a node-b; do
    show "GET $node:30080 ($(node_ip "$node")) from the client" "$client_ns" tcp "$(node_ip "$node"):30080"
    [[ $answer == web-* && $peer != "$client_ip" ]] || unexpected "expected a web pod that sees a node address (SNAT)"
  done
  note "Cluster policy SNATs: a pod sees the node's address (on its own node, the node's pod-bridge address)"

  heading "NodePort demo/web-local :30081 (externalTrafficPolicy Local) from the client"
  for node in node-a node-a node-a node-b; do
    show "GET $node:30081 ($(node_ip "$node")) from the client" "$client_ns" tcp "$(node_ip "$node"):30081"
    if [[ $node == node-a ]]; then
      [[ $answer == web-[12] ]] || unexpected "expected web-1 or web-2 (node-a's own pods)"
    else
      [[ $answer == web-3 ]] || unexpected "expected web-3 (node-b's own pod)"
    fi
    [[ $peer == "$client_ip" ]] || unexpected "expected the client's own address $client_ip"
  done
  note "only the node's own pods answer, and they see the real client address $client_ip"

  heading "UDP: ClusterIP demo/echo-udp 10.96.0.20:53 -> echo-1 (node-a), echo-2 (node-b):5353"
  for i in 1 2 3 4; do
    show "UDP 10.96.0.20:53 from pod web-1" kpxdemo-web-1 udp 10.96.0.20:53
    [[ $answer == echo-* ]] || unexpected "expected an echo pod"
  done

  heading "ClusterIP demo/empty 10.96.0.30:80 (no endpoints)"
  show "GET 10.96.0.30:80 from pod web-1" kpxdemo-web-1 tcp 10.96.0.30:80
  [[ $outcome == refused ]] || unexpected "expected refused (REJECT)"

  heading "kpxctl nodes   (both connected; ACKED == VERSION, BEHIND 0)"
  kpxctl nodes

  heading "health: GET /healthz on node-a's dataplane (0.0.0.0:10256 inside kpxdemo-node-a)"
  ip netns exec kpxdemo-node-a bash -c '
    cr=$(printf "\r")
    exec 3<>/dev/tcp/127.0.0.1/10256
    printf "GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n" >&3
    IFS= read -r line <&3; printf "   %s\n" "${line%"$cr"}"
    while IFS= read -r line <&3 && [[ -n ${line%"$cr"} ]]; do :; done
    while IFS= read -r line <&3 || [[ -n $line ]]; do printf "   %s\n" "$line"; done'

  heading "live change: demo/web's endpoint web-2 (10.244.1.3) becomes not ready"
  local before
  before=$(desired_versions)
  make_web2_not_ready
  changed_and_acked() { [[ $(desired_versions) != "$before" ]] && both_acked; }
  wait_for 20 "the change to reach both nodes" changed_and_acked
  note "the controlplane saw the EndpointSlice change; both nodes applied and ACKed the delta"
  for i in 1 2 3 4; do
    show "GET 10.96.0.10:80 from pod echo-1" kpxdemo-echo-1 tcp 10.96.0.10:80
    [[ $answer == web-[13] ]] || unexpected "expected web-1 or web-3"
  done
  tally 30 kpxdemo-echo-1 tcp 10.96.0.10:80
  [[ $tallied == "web-1 web-3" ]] || unexpected "expected web-1 and web-3 only"
  note "web-2 gets no new connections"

  heading "kpxctl nodes   (a new version, ACKed by both)"
  kpxctl nodes

  if ((problems)); then
    show_logs
    fail "$problems unexpected result(s)"
  fi
  heading "done in $((SECONDS - started))s after the build; cleaning up (processes, then the kpxdemo-* namespaces)"
}

if [[ $mode == kernel ]]; then
  # Only one demo at a time: a second run would delete the first one's namespaces. The lock
  # is a directory holding the owner's PID; a lock whose owner is gone (killed) is taken over.
  lockdir=/run/kpx-demo.lock
  if ! mkdir "$lockdir" 2>/dev/null; then
    owner='' cmdline=()
    { read -r owner <"$lockdir/pid"; } 2>/dev/null || true
    if [[ $owner =~ ^[0-9]+$ && $owner != "$$" ]]; then
      { mapfile -d '' cmdline <"/proc/$owner/cmdline"; } 2>/dev/null || true
    fi
    if [[ " ${cmdline[*]} " == *demo.sh* ]]; then
      fail "another kpx demo is running (PID $owner); wait for it to finish"
    fi
    rm -rf "$lockdir"
    mkdir "$lockdir" || fail "cannot take the lock $lockdir"
  fi
  lock=$lockdir
  echo "$$" >"$lock/pid"
  # Namespaces (and the processes in them) left by an earlier run that could not clean up.
  stale=()
  while read -r ns _; do
    [[ $ns == kpxdemo-* ]] && stale+=("$ns")
  done < <(ip netns list 2>/dev/null)
  if ((${#stale[@]})); then
    note "removing ${#stale[@]} namespace(s) left by an earlier run: ${stale[*]}"
    for ns in "${stale[@]}"; do delete_ns "$ns"; done
  fi
  # Network namespaces may be unavailable (a container without CAP_SYS_ADMIN, ...).
  if ! ip netns add kpxdemo-probe 2>"$workdir/probe.log"; then
    mode=dry-run reason="cannot create network namespaces: $(<"$workdir/probe.log")"
  else
    ip netns del kpxdemo-probe
  fi
fi
if [[ $mode == kernel ]]; then
  kernel_demo
else
  heading "DRY RUN: $reason"
  note "The dataplanes print the iptables rules they would program instead of programming them."
  note "Run as root (sudo $0) to see real traffic through two nodes in network namespaces."
  dry_run_demo
fi
