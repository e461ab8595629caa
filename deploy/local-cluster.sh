#!/usr/bin/env bash
# A local 3-node Metta cluster on 127.0.0.1, for trying things out.
#   deploy/local-cluster.sh up [N]   build, init node-1, join N-1 control nodes (default 3 in all)
#   deploy/local-cluster.sh native [NAME]
#                                    boot the native kernel in QEMU (TCG) and
#                                    join it as a worker (default name kernel-1);
#                                    serial console in .local-cluster/NAME.serial
#   deploy/local-cluster.sh down     stop the nodes and VMs, remove their state
# State lives in ./.local-cluster (admin config: .local-cluster/admin.conf).
# `native` needs qemu-system-x86_64 (Debian: qemu-system-x86); the VM reaches
# the host's loopback as 10.0.2.2 through QEMU user networking.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=${METTA_LOCAL_STATE:-$PWD/.local-cluster}
BASE_PORT=${METTA_BASE_PORT:-7101}
BIN=$PWD/target/release

down() {
  if [ -d "$STATE" ]; then
    for pid in "$STATE"/*.qemu.pid; do
      [ -e "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
    done
    pkill -f "mettad --data-dir $STATE/" 2>/dev/null || true
    # mettad shuts down on SIGTERM; give it 10 s, then kill what is left.
    for _ in $(seq 1 100); do
      pgrep -f "mettad --data-dir $STATE/" >/dev/null || break
      sleep 0.1
    done
    pkill -9 -f "mettad --data-dir $STATE/" 2>/dev/null || true
    rm -rf "$STATE"
    echo "local cluster removed"
  fi
}

up() {
  local n=${1:-3}
  if [ -d "$STATE" ]; then
    echo "$STATE exists: run '$0 down' first" >&2
    exit 1
  fi
  cargo build --release -p metta-control --bins
  mkdir -p "$STATE"
  export METTA_CONFIG="$STATE/admin.conf"
  "$BIN/mettactl" init --cluster local --data-dir "$STATE/node-1" \
    --listen "127.0.0.1:$BASE_PORT" --name node-1 --detach
  if [ "$n" -gt 1 ]; then
    token=$("$BIN/mettactl" token create --role control --ttl 10m --uses $((n - 1)))
    for i in $(seq 2 "$n"); do
      "$BIN/mettactl" join "127.0.0.1:$BASE_PORT" --token "$token" \
        --data-dir "$STATE/node-$i" --listen "127.0.0.1:$((BASE_PORT + i - 1))" \
        --name "node-$i" --detach
    done
  fi
  # List every node in the admin config so calls survive the loss of any one.
  python3 - "$METTA_CONFIG" "$n" "$BASE_PORT" <<'PY' 2>/dev/null || true
import sys, re
path, n, base = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
text = open(path).read()
eps = ", ".join(f'"127.0.0.1:{base + i}"' for i in range(n))
text = re.sub(r'^endpoints = \[.*?\]', f'endpoints = [{eps}]', text, flags=re.M | re.S)
open(path, "w").write(text)
PY
  # wait until every node reports in
  for _ in $(seq 1 100); do
    up=$("$BIN/mettactl" nodes -o json | grep -c '"status": "up"' || true)
    [ "$up" -ge "$n" ] && break
    sleep 0.2
  done
  "$BIN/mettactl" nodes
  echo
  echo "export METTA_CONFIG=$METTA_CONFIG"
}

native() {
  local name=${1:-kernel-1}
  if [ ! -f "$STATE/admin.conf" ]; then
    echo "no local cluster: run '$0 up' first" >&2
    exit 1
  fi
  command -v qemu-system-x86_64 >/dev/null ||
    { echo "qemu-system-x86_64 not found (apt-get install qemu-system-x86)" >&2; exit 1; }
  local pidfile="$STATE/$name.qemu.pid"
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "$name is already running (QEMU pid $(cat "$pidfile")): choose another name," >&2
    echo "or stop it first: kill $(cat "$pidfile")" >&2
    exit 1
  fi
  (cd kernel/image && cargo build --release)
  local elf=kernel/image/target/x86_64-unknown-none/release/metta-kernel
  export METTA_CONFIG="$STATE/admin.conf"
  local token
  token=$("$BIN/mettactl" token create --role worker --ttl 10m --uses 1)
  local serial="$STATE/$name.serial"
  : >"$serial"
  # -cpu max: RDRAND for the node key. 512 MiB: room for domains.
  qemu-system-x86_64 -accel tcg -M pc -m 512M -smp 1 -cpu max -no-reboot \
    -display none -serial "file:$serial" \
    -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0 -kernel "$elf" \
    -append "console=ttyS0 net=dhcp metta.ctl=10.0.2.2:$BASE_PORT metta.token=$token metta.name=$name" \
    </dev/null >/dev/null 2>&1 &
  echo $! >"$STATE/$name.qemu.pid"
  for _ in $(seq 1 300); do
    grep -q "joined cluster" "$serial" && break
    if ! kill -0 "$(cat "$STATE/$name.qemu.pid")" 2>/dev/null; then
      echo "the VM stopped; its console:" >&2
      cat "$serial" >&2
      exit 1
    fi
    sleep 0.1
  done
  grep "joined cluster" "$serial" || { echo "not joined after 30 s; see $serial" >&2; exit 1; }
  # Up once it syncs (after its fuel calibration).
  for _ in $(seq 1 100); do
    "$BIN/mettactl" nodes -o json | python3 -c '
import json, sys
sys.exit(0 if any(n["name"] == sys.argv[1] and n["status"] == "up" for n in json.load(sys.stdin)) else 1)
' "$name" && break
    sleep 0.1
  done
  "$BIN/mettactl" nodes
}

case "${1:-}" in
  up) shift; up "$@" ;;
  native) shift; native "$@" ;;
  down) down ;;
  *) echo "usage: $0 up [N] | native [NAME] | down" >&2; exit 2 ;;
esac
