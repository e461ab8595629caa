#!/usr/bin/env bash
# Boot tests of the metta-kernel image, for CI and by hand.
#
#   kernel/image/test.sh            build, host unit tests, boot tests
#   kernel/image/test.sh --measure  also: wall-clock time of 5 boots and of 5
#                                   boots to a DHCP lease (medians), the
#                                   empty activation round trip on native
#                                   (test=bench, 3 boots), and boot -> joined
#                                   a real mettad (5 boots: the kernel's own
#                                   figure, how it splits, and wall clock; and
#                                   the kernel's idle memory after the first
#                                   sync)
#
# Builds the kernel (release), runs the lib's host unit tests, then boots the
# image in QEMU under TCG (never KVM: see docs) with isa-debug-exit:
#   boot        prints the banner, the command line and a memory map with
#               >= 100 MiB usable, timestamps every line; sets up the IDT and the
#               local APIC timer; prints the RTC time, which must be within a day
#               of the host's `date +%s` (QEMU's RTC follows the host clock), and
#               an entropy line (the default CPU, qemu64, has no RDRAND: the
#               kernel says so and goes on); the heap in use after boot; QEMU
#               exits 33 (success)
#   panic-test  prints "PANIC: <message> at <file:line>"; QEMU exits 35 (panic)
#   no-lm       on a CPU without long mode (-cpu qemu32) the 32-bit entry stub
#               says so and QEMU exits 37 (boot failure)
#   net-dhcp    net=dhcp with a virtio-net NIC on QEMU user networking (internal
#               to the QEMU process): PCI list, MAC, a lease in 10.0.2.0/24; 33
#   net-no-nic  net=dhcp with -nic none: "no supported NIC found"; QEMU exits 39
#   bad-cmdline an unknown command-line key is rejected with a message; 37
#   entropy     -cpu max (RDRAND under TCG): two 16-byte draws differ; 33
#   timer       test=timer: 50 timer ticks with hlt in between, their rate by the
#               TSC within 20% of nominal (1 kHz); a deadline fires, sleep_until wakes, a
#               cancelled deadline does not fire; 33
#   pagefault   test=pagefault: a write to an unmapped address; the report names
#               the #PF, its cause and the address (CR2); 35 (panic)
#   ud          test=ud: ud2; the report names the #UD; 35
#   doublefault test=doublefault: a push onto an unmapped stack; the #DF report
#               comes from the IST1 stack (else: triple fault, reset); 35
#   domains     test=domains: the nucleus on bare metal: fuel calibrated on the
#               TSC; a counter and its client (100 round trips), a greedy
#               1/10 ms + extra domain, a steady 2/10 ms domain and one that traps
#               after 100 ms run for ~1 s of TSC time; the steady domain gets
#               >= 90% of its slice (charged time) in >= 90% of the periods, the
#               greedy one gets spare time, the trap is reported and the rest
#               keep running; per-domain CPU vs contract and p99 activation
#               latency are printed; 33
#   dirty       test=dirty: a domain's memory is a page-aligned stretch with an
#               unmapped guard page below; the page-table Dirty bits report
#               exactly the 4 KiB pages it wrote: {0,5,19}, then {2}, then {};
#               after memory.grow moved it, all 48 pages, then {33}; 33
#   snapshot    test=snapshot: a counter snapshotted at an activation boundary
#               (postcard round trip), a tampered copy refused, restored into a
#               fresh nucleus with the same memory root, and both copies count
#               on (6, 7, 8); 33
#   bench       test=bench: median ns of an empty Domain::activate and
#               Nucleus::step (the host figure: cargo run --release -p
#               metta-nucleus --example activation); 33
#   join-cmdline malformed metta.ctl / metta.token, metta.ctl without net=dhcp:
#               rejected with a message saying what is wrong, the token's
#               secret never printed; 37
#   no-entropy  metta.ctl on the default CPU (qemu64: no RDSEED/RDRAND): "cannot
#               create a node key: no hardware entropy", before any network;
#               41
#   join        (needs mettad/mettactl: built here from the main workspace; a
#               cluster "lab" is made with `mettactl init` on a free loopback
#               port, mettad runs in the background and is killed on exit; the
#               guest reaches the host's loopback at 10.0.2.2 through QEMU user
#               networking; -cpu max for RDRAND)
#               joins with a fresh worker token: "joined cluster lab as node/<id>
#               in <ms> ms (certificate until <date>)", then calibrates the fuel
#               rate ("node: fuel rate ...") and, after its first sync, prints
#               its idle memory ("memory: ..., total <KiB>", at most 16 MiB:
#               joined and connected, no domains); `mettactl nodes -o
#               json` lists it as kind native, status up (its syncs, which are
#               its heartbeats, arriving), 1 CPU and the usable memory the
#               kernel printed; the secret is never on serial
#   restart     mettad killed: the kernel says it lost the connection and
#               retries with backoff; mettad restarted: "reconnected", and the
#               node is up again
#   heartbeats  metta.heartbeats=2: two syncs (heartbeats) acknowledged, then 33
#   wrong-pin   the token's pin edited: "join refused: the server is not the
#               cluster pinned by the token"; 43
#   used-token  the used token again, and an unknown one: "join refused: the
#               cluster rejected token <id>: token already used" / "unknown
#               token"; 45
#   no-ctl      nothing listening at metta.ctl: "link: cannot reach <addr>:
#               connection refused; retrying in 0.5 s", then 1 s, 2 s (backoff);
#               QEMU is stopped after 5 s
#   ipxe        chained from iPXE (QEMU's PXE ROM, Debian ipxe-qemu) over QEMU's
#               user-mode DHCP/TFTP: boots and exits 33 (~6 s, mostly iPXE)
# Ends with "N passed, M failed" and exits non-zero if anything failed.
# Needs: cargo (rust-toolchain.toml), qemu-system-x86_64 (Debian: qemu-system-x86),
# python3 (JSON, free ports).
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# Cargo takes .cargo/config.toml (target x86_64-unknown-none, linker script) from
# the working directory, not from --manifest-path: build from here.
cd "$here"

measure=0
[ "${1:-}" = "--measure" ] && measure=1

passed=0
failed=0
pass() { echo "ok   - $1"; passed=$((passed + 1)); }
fail() { echo "FAIL - $1"; failed=$((failed + 1)); }
finish() {
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
    exit
}

# Exit statuses: isa-debug-exit makes QEMU exit with (value << 1) | 1
# (src/exit.rs): success 0x10 -> 33, panic 0x11 -> 35, boot failure 0x12 -> 37,
# network failure 0x13 -> 39, no entropy for a key 0x14 -> 41, the wrong
# cluster (CA pin) 0x15 -> 43, token rejected 0x16 -> 45, refused otherwise
# 0x17 -> 47.
EXIT_SUCCESS=33
EXIT_PANIC=35
EXIT_BOOT_FAILURE=37
EXIT_NET_FAILURE=39
EXIT_NO_ENTROPY=41
EXIT_PIN_MISMATCH=43
EXIT_TOKEN_REJECTED=45

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
tmp=$(mktemp -d)
# Processes started in the background (mettad, a QEMU), stopped on exit.
mettad_pid=
qemu_pid=
cleanup() {
    [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null
    [ -n "$mettad_pid" ] && kill "$mettad_pid" 2>/dev/null
    wait 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT

echo "== build"
if cargo build --release --manifest-path "$here/Cargo.toml"; then
    pass "build (x86_64-unknown-none, release)"
else
    fail "build (x86_64-unknown-none, release)"
    finish
fi
target_dir=$(cargo metadata --format-version 1 --no-deps --manifest-path "$here/Cargo.toml" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
elf="$target_dir/x86_64-unknown-none/release/metta-kernel"
echo "image: $elf ($(stat -c %s "$elf") bytes)"

echo "== host unit tests"
if cargo test --quiet --target x86_64-unknown-linux-gnu --manifest-path "$here/Cargo.toml" --lib; then
    pass "host unit tests (lib)"
else
    fail "host unit tests (lib)"
fi

if ! command -v qemu-system-x86_64 >/dev/null; then
    fail "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
    finish
fi

# qemu ARGS...: run QEMU (TCG, isa-debug-exit, serial on stdout) with ARGS; sets
# $out (serial output, CRs removed), $rc (QEMU's exit status, 124 on timeout),
# $secs (wall clock). (-nographic is not used: with it, QEMU 7.2 rejects
# -serial stdio.)
qemu() {
    local start end
    start=$(date +%s%N)
    timeout "${QEMU_TIMEOUT:-30}" qemu-system-x86_64 -accel tcg -M pc -m 128M -no-reboot \
        -display none -serial stdio \
        -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
        "$@" </dev/null >"$tmp/out" 2>&1
    rc=$?
    end=$(date +%s%N)
    secs=$(awk -v ns=$((end - start)) 'BEGIN { printf "%.3f", ns / 1e9 }')
    out=$(tr -d '\r' <"$tmp/out")
}

# boot CMDLINE [QEMU ARGS...]: boot the image with QEMU's multiboot loader.
boot() {
    local cmdline=$1
    shift
    qemu -kernel "$elf" -append "$cmdline" "$@"
}

show() { printf '%s\n' "$out" | sed 's/^/    | /'; }

# check NAME CONDITION...: pass if the shell condition holds, else fail.
check() {
    local name=$1
    shift
    if "$@"; then pass "$name"; else fail "$name"; fi
}
has() { printf '%s\n' "$out" | grep -qE -- "$1"; }

echo "== boot"
boot "console=ttyS0 metta.test=boot"
show
echo "    (qemu exit status $rc, ${secs}s)"
check "boot: exits with the success code ($EXIT_SUCCESS)" [ "$rc" -eq "$EXIT_SUCCESS" ]
check "boot: banner 'metta-kernel $version booted'" \
    has "^\[ *[0-9]+\.[0-9]{6}\] metta-kernel ${version//./\\.} booted$"
check "boot: every line is timestamped" \
    bash -c '! printf "%s\n" "$1" | grep -qvE "^\[ *[0-9]+\.[0-9]{6}\] "' _ "$out"
check "boot: command line echoed" has 'cmdline: ".*console=ttyS0 metta\.test=boot"$'
check "boot: memory map printed" has 'memory map \([0-9]+ entries\):'
usable=$(printf '%s\n' "$out" | sed -nE 's/.*usable memory: ([0-9]+) bytes.*/\1/p')
check "boot: >= 100 MiB usable (${usable:-none} bytes)" \
    [ "${usable:-0}" -ge $((100 * 1024 * 1024)) ]
check "boot: no panic" bash -c '! printf "%s\n" "$1" | grep -q PANIC' _ "$out"
check "boot: heap in use after boot printed" has '\] heap: [0-9]+ bytes in use after boot \(peak [0-9]+\)$'
check "boot: IDT loaded, PICs remapped and masked" \
    has '\] interrupts: IDT with 256 vectors; .*PICs remapped to 0x20-0x2f and masked$'
check "boot: local APIC timer started" \
    has '\] timer: local APIC \(xAPIC at 0xfee00000\) timer counts at [0-9.]+ MHz .* [0-9]+ Hz tick'
rtc=$(printf '%s\n' "$out" | sed -nE 's/.*\] rtc: [0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}Z \(unix ([0-9]+)\)$/\1/p')
host=$(date +%s)
check "boot: RTC within a day of the host clock (rtc ${rtc:-none}, host $host)" \
    bash -c '[ -n "$1" ] && d=$(($1 - $2)) && [ "${d#-}" -le 86400 ]' _ "$rtc" "$host"
check "boot: entropy line (default CPU: no RDSEED/RDRAND, says so)" \
    has '\] entropy: unavailable: this CPU has neither RDSEED nor RDRAND; continuing'

echo "== panic-test"
boot "panic-test"
show
echo "    (qemu exit status $rc, ${secs}s)"
check "panic-test: exits with the panic code ($EXIT_PANIC)" [ "$rc" -eq "$EXIT_PANIC" ]
check "panic-test: 'PANIC: <message> at <file:line>'" \
    has '^\[ *[0-9]+\.[0-9]{6}\] PANIC: .+ at src/[a-z_/]+\.rs:[0-9]+$'

echo "== no-lm (32-bit CPU)"
boot "" -cpu qemu32
show
echo "    (qemu exit status $rc, ${secs}s)"
check "no-lm: exits with the boot-failure code ($EXIT_BOOT_FAILURE)" [ "$rc" -eq "$EXIT_BOOT_FAILURE" ]
check "no-lm: says why" has '^metta-kernel: this CPU has no long mode'

echo "== net-dhcp (virtio-net, QEMU user-mode network)"
net_args=(-netdev user,id=n0 -device virtio-net-pci,netdev=n0)
boot "net=dhcp" "${net_args[@]}"
show
echo "    (qemu exit status $rc, ${secs}s)"
check "net-dhcp: exits with the success code ($EXIT_SUCCESS)" [ "$rc" -eq "$EXIT_SUCCESS" ]
check "net-dhcp: heap size printed" has '\] heap: [0-9]+ bytes'
check "net-dhcp: PCI functions listed" \
    has '\] pci: 00:00\.0 [0-9a-f]{4}:[0-9a-f]{4} class [0-9a-f]{2}\.[0-9a-f]{2}$'
check "net-dhcp: virtio-net listed" has '\] pci: [0-9a-f:.]+ 1af4:(1000|1041) class 02\.00$'
check "net-dhcp: MAC printed" has '\] net: virtio-net at .*, mac 52:54:00:([0-9a-f]{2}:){2}[0-9a-f]{2}$'
check "net-dhcp: lease in 10.0.2.0/24" \
    has '\] net: dhcp lease 10\.0\.2\.[0-9]+/24 gw 10\.0\.2\.2$'
check "net-dhcp: no panic" bash -c '! printf "%s\n" "$1" | grep -q PANIC' _ "$out"

echo "== net-no-nic (net=dhcp, -nic none)"
boot "net=dhcp" -nic none
show
echo "    (qemu exit status $rc, ${secs}s)"
check "net-no-nic: exits with the network-failure code ($EXIT_NET_FAILURE)" \
    [ "$rc" -eq "$EXIT_NET_FAILURE" ]
check "net-no-nic: says so" has '\] net: no supported NIC found$'

echo "== bad-cmdline (unknown key)"
boot "net=dhcp bogus=1"
show
echo "    (qemu exit status $rc, ${secs}s)"
check "bad-cmdline: exits with the boot-failure code ($EXIT_BOOT_FAILURE)" \
    [ "$rc" -eq "$EXIT_BOOT_FAILURE" ]
check "bad-cmdline: names the key" has '\] cmdline: error: unknown key `bogus=1`'
check "bad-cmdline: stops before PCI/network" bash -c '! grep -qE "\] (pci|net):" <<<"$1"' _ "$out"
boot "net=static"
check "bad-cmdline: bad value rejected (exit $rc)" \
    bash -c '[ "$1" -eq "$2" ] && grep -q "cmdline: error: bad value .static. for .net." <<<"$3"' \
    _ "$rc" "$EXIT_BOOT_FAILURE" "$out"

boot "test=gp"
check "bad-cmdline: unknown self-test rejected (exit $rc)" \
    bash -c '[ "$1" -eq "$2" ] && grep -q "cmdline: error: bad value .gp. for .test." <<<"$3"' \
    _ "$rc" "$EXIT_BOOT_FAILURE" "$out"

echo "== entropy (-cpu max: RDRAND under TCG)"
boot "" -cpu max
printf '%s\n' "$out" | grep -E '\] (entropy|rtc):' | sed 's/^/    | /'
echo "    (qemu exit status $rc, ${secs}s)"
check "entropy: exits with the success code ($EXIT_SUCCESS)" [ "$rc" -eq "$EXIT_SUCCESS" ]
check "entropy: two 16-byte draws differ" has '\] entropy: RD[A-Z]+ .*; two 16-byte draws differ$'

echo "== timer (test=timer: ticks with hlt in between)"
boot "test=timer"
printf '%s\n' "$out" | grep -E '\] (timer|test)' | sed 's/^/    | /'
echo "    (qemu exit status $rc, ${secs}s)"
check "timer: exits with the success code ($EXIT_SUCCESS)" [ "$rc" -eq "$EXIT_SUCCESS" ]
# "timer-test: 50 ticks in 50.944 ms by the TSC: 981.452 Hz (nominal 1000 Hz), ..."
rate=$(printf '%s\n' "$out" |
    sed -nE 's/.*\] timer-test: ([0-9]+) ticks in ([0-9.]+) ms by the TSC: .*\(nominal ([0-9]+) Hz\).*/\1 \2 \3/p')
check "timer: >= 50 ticks, rate by the TSC within 20% of nominal (${rate:-no rate line}: ticks ms Hz)" \
    awk -v r="$rate" 'BEGIN { split(r, a, " "); if (a[1] < 50 || a[2] <= 0) exit 1
        hz = a[1] * 1000 / a[2]; exit !(hz >= 0.8 * a[3] && hz <= 1.2 * a[3]) }'
check "timer: a deadline fires" has '\] timer-test: deadline [0-9.]+ ms ahead fired [0-9.]+ ms late'
check "timer: sleep_until wakes" has '\] timer-test: sleep_until [0-9.]+ ms ahead woke [0-9.]+ ms late$'
check "timer: a cancelled deadline does not fire" has '\] timer-test: a cancelled deadline did not fire$'

echo "== pagefault (test=pagefault: write to an unmapped address)"
boot "test=pagefault"
printf '%s\n' "$out" | grep -A6 -E '\] (test|EXCEPTION):' | sed 's/^/    | /'
echo "    (qemu exit status $rc, ${secs}s)"
check "pagefault: exits with the panic code ($EXIT_PANIC)" [ "$rc" -eq "$EXIT_PANIC" ]
check "pagefault: report names the #PF and the faulting rip" \
    has '\] EXCEPTION: #PF page fault \(vector 14\) at rip 0x[0-9a-f]{16}$'
check "pagefault: report decodes the error code and gives CR2" \
    has '\]   page fault: write to non-present page in kernel mode, address \(CR2\) 0x000000deadbee000; error code 0x2$'
check "pagefault: every report line is timestamped" \
    bash -c '! printf "%s\n" "$1" | grep -qvE "^\[ *[0-9]+\.[0-9]{6}\] "' _ "$out"

echo "== ud (test=ud: ud2)"
boot "test=ud"
printf '%s\n' "$out" | grep -A1 -E '\] EXCEPTION:' | sed 's/^/    | /'
echo "    (qemu exit status $rc, ${secs}s)"
check "ud: exits with the panic code ($EXIT_PANIC)" [ "$rc" -eq "$EXIT_PANIC" ]
check "ud: report names the #UD" has '\] EXCEPTION: #UD invalid opcode \(vector 6\) at rip 0x[0-9a-f]{16}$'

echo "== doublefault (test=doublefault: fault on an unmapped stack)"
boot "test=doublefault"
printf '%s\n' "$out" | grep -A3 -E '\] EXCEPTION:' | sed 's/^/    | /'
printf '%s\n' "$out" | grep -E 'IST' | sed 's/^/    | /'
echo "    (qemu exit status $rc, ${secs}s)"
check "doublefault: exits with the panic code ($EXIT_PANIC)" [ "$rc" -eq "$EXIT_PANIC" ]
check "doublefault: report names the #DF" has '\] EXCEPTION: #DF double fault \(vector 8\)'
check "doublefault: handled on the IST1 stack" has '^\[ *[0-9]+\.[0-9]{6}\]   handled on the IST1 \(double-fault\) stack$'

echo "== domains (test=domains: the nucleus on bare metal for ~1 s)"
boot "test=domains"
printf '%s\n' "$out" | grep -E '\] (domains|test|counter|client|greedy|steady|trap):' | sed 's/^/    | /'
echo "    (qemu exit status $rc, ${secs}s)"
check "domains: exits with the success code ($EXIT_SUCCESS)" [ "$rc" -eq "$EXIT_SUCCESS" ]
check "domains: fuel rate calibrated on the TSC" \
    has '\] domains: fuel rate [0-9]+ fuel/ms by the TSC: median of 5 runs'
# "domains: steady got >= 90.0% of its slice (charged) in 99 of 100 periods (99.0%; ..."
share=$(printf '%s\n' "$out" |
    sed -nE 's/.*\] domains: steady got >= 90\.0% of its slice \(charged\) in ([0-9]+) of ([0-9]+) periods.*/\1 \2/p')
check "domains: 2/10 ms domain got >= 90% of its slice in >= 90% of >= 50 periods (${share:-no line}: met periods)" \
    awk -v s="$share" 'BEGIN { split(s, a, " "); exit !(a[2] >= 50 && a[1] * 10 >= a[2] * 9) }'
check "domains: the greedy extra domain got spare time" \
    has '\] domains: greedy  contract 1/10 ms \+ extra: charged [0-9.]+ ms guaranteed \+ [1-9][0-9]*\.[0-9]+ ms extra'
check "domains: p99 activation latency printed" \
    has '\] domains: steady  periods: .* activation latency median [0-9.]+ us, p99 [0-9.]+ us'
check "domains: client and counter made 100 round trips" \
    has '\] domains: client -> counter: 100 round trips, last count 100 '
check "domains: domain logs on serial, prefixed with the domain's name" \
    bash -c 'grep -q "\] counter: counter: up$" <<<"$1" && grep -q "\] client: client: 100 round trips$" <<<"$1"' _ "$out"
check "domains: the trapping domain is reported" \
    has '\] trap: nucleus: trapped: wasm `unreachable` instruction executed$'
check "domains: the others keep running after the trap" \
    bash -c 'grep -qE "\] domains: trap failed for good; steady ran in [0-9]+ periods after it$" <<<"$1" &&
        ! grep -qE "\] domains: (counter|client|greedy|steady) .*; failed:" <<<"$1"' _ "$out"

echo "== dirty (test=dirty: page-table dirty bits of a domain's memory)"
boot "test=dirty"
printf '%s\n' "$out" | grep -E '\] (dirty|test|paging|heap):' | sed 's/^/    | /'
echo "    (qemu exit status $rc, ${secs}s)"
check "dirty: exits with the success code ($EXIT_SUCCESS)" [ "$rc" -eq "$EXIT_SUCCESS" ]
check "dirty: heap remapped with 4 KiB pages" \
    has '\] paging: 0x[0-9a-f]+-0x[0-9a-f]+ remapped with 4 KiB pages \([0-9]+ page tables'
check "dirty: memory is a page-aligned stretch with an unmapped guard page" \
    has '\] dirty: memory at 0x[0-9a-f]+000, 131072 bytes \(32 4 KiB pages\); guard page below unmapped$'
check "dirty: exactly {0,5,19}, then {2}, then {}" \
    bash -c 'grep -qF "activation 1 (0x0000, 0x5000, 0x5008, 0x13000): [0, 5, 19] (want" <<<"$1" &&
        grep -qF "activation 2 (0x2000): [2] (want" <<<"$1" &&
        grep -qF "no activation: [] (want" <<<"$1"' _ "$out"
check "dirty: follows memory.grow to the new base (all 48 pages, then {33})" \
    bash -c 'grep -qE "activation 3 \(memory.grow 1\): memory moved from 0x[0-9a-f]+ to 0x[0-9a-f]+, 196608 bytes; all 48 pages" <<<"$1" &&
        grep -qF "activation 4 (0x21000): [33] (want" <<<"$1"' _ "$out"

echo "== snapshot (test=snapshot: capture at a boundary, restore into a fresh nucleus)"
boot "test=snapshot"
printf '%s\n' "$out" | grep -E '\] (snapshot|test|counter):' | sed 's/^/    | /'
echo "    (qemu exit status $rc, ${secs}s)"
check "snapshot: exits with the success code ($EXIT_SUCCESS)" [ "$rc" -eq "$EXIT_SUCCESS" ]
root=$(printf '%s\n' "$out" | sed -nE 's/.*\] snapshot: taken at a boundary .* root ([0-9a-f]{64});.*/\1/p')
check "snapshot: restored memory root matches the snapshot's (${root:0:16}...)" \
    bash -c '[ -n "$1" ] && grep -qE "\] snapshot: restored into a fresh nucleus in [0-9.]+ us; memory root $1 \(matches\)$" <<<"$2"' _ "$root" "$out"
check "snapshot: a tampered snapshot is refused" has '\] snapshot: tampered memory refused: .*Merkle root'
check "snapshot: the counter continues exactly (6, 7, 8 on both copies)" \
    has '\] snapshot: after restore, original answers \[6, 7, 8\], restored answers \[6, 7, 8\]$'

echo "== bench (test=bench: empty activation round trip on native)"
boot "test=bench"
printf '%s\n' "$out" | grep -E '\] (bench|test):' | sed 's/^/    | /'
echo "    (qemu exit status $rc, ${secs}s)"
check "bench: exits with the success code ($EXIT_SUCCESS)" [ "$rc" -eq "$EXIT_SUCCESS" ]
check "bench: Domain::activate median printed" \
    has '\] bench: Domain::activate median [0-9]+\.[0-9] ns \(reps: '

# A syntactically valid token (no cluster behind it) for the command-line tests.
fake_secret=00112233445566778899aabbccddeeff
fake_token="metta1.0a1b2c3d.$fake_secret.000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"

echo "== join-cmdline (malformed metta.ctl / metta.token)"
boot "net=dhcp metta.ctl=10.0.2.300:7001 metta.token=$fake_token"
printf '%s\n' "$out" | grep -E '\] cmdline' | sed 's/^/    | /'
check "join-cmdline: bad metta.ctl rejected, saying why (exit $rc)" \
    bash -c '[ "$1" -eq "$2" ] && grep -qF "cmdline: error: bad value \`10.0.2.300:7001\` for \`metta.ctl\`: not an IPv4 address" <<<"$3"' \
    _ "$rc" "$EXIT_BOOT_FAILURE" "$out"
check "join-cmdline: the echoed command line hides the secret" \
    bash -c 'grep -qF "metta.token=metta1.0a1b2c3d.<secret>.0001" <<<"$1" && ! grep -qF "$2" <<<"$1"' \
    _ "$out" "$fake_secret"
boot "net=dhcp metta.ctl=10.0.2.2 metta.token=$fake_token"
check "join-cmdline: metta.ctl without a port rejected (exit $rc)" \
    bash -c '[ "$1" -eq "$2" ] && grep -qF "for \`metta.ctl\`: no port" <<<"$3"' _ "$rc" "$EXIT_BOOT_FAILURE" "$out"
short_secret=${fake_token/$fake_secret/${fake_secret:0:31}}
boot "net=dhcp metta.ctl=10.0.2.2:7001 metta.token=$short_secret"
printf '%s\n' "$out" | grep -E '\] cmdline' | sed 's/^/    | /'
check "join-cmdline: malformed token rejected, saying what is wrong (exit $rc)" \
    bash -c '[ "$1" -eq "$2" ] && grep -qF "cmdline: error: bad value for \`metta.token\` (not shown: it holds a secret): malformed join token: the secret must be 32 lowercase hex digits" <<<"$3"' \
    _ "$rc" "$EXIT_BOOT_FAILURE" "$out"
check "join-cmdline: ... and never printed" \
    bash -c '! grep -qF "${1:0:31}" <<<"$2"' _ "$fake_secret" "$out"
boot "metta.ctl=10.0.2.2:7001 metta.token=$fake_token"
check "join-cmdline: metta.ctl requires net=dhcp (exit $rc)" \
    bash -c '[ "$1" -eq "$2" ] && grep -qF "cmdline: error: \`metta.ctl\` requires \`net=dhcp\`" <<<"$3"' \
    _ "$rc" "$EXIT_BOOT_FAILURE" "$out"

echo "== no-entropy (metta.ctl on a CPU without RDSEED/RDRAND)"
boot "net=dhcp metta.ctl=10.0.2.2:7001 metta.token=$fake_token" "${net_args[@]}"
printf '%s\n' "$out" | grep -E '\] (link|net|entropy)' | sed 's/^/    | /'
echo "    (qemu exit status $rc, ${secs}s)"
check "no-entropy: exits with the no-entropy code ($EXIT_NO_ENTROPY)" [ "$rc" -eq "$EXIT_NO_ENTROPY" ]
check "no-entropy: says it cannot create a key, before the network" \
    bash -c 'grep -qE "\] link: cannot create a node key: no hardware entropy \(this CPU has neither RDSEED nor RDRAND\)" <<<"$1" &&
        ! grep -qE "\] net: dhcp" <<<"$1"' _ "$out"

echo "== control plane for the join tests (mettad, mettactl from the main workspace)"
root=$(cd "$here/../.." && pwd)
# From the workspace root: this directory's .cargo/config.toml would build for
# the bare target.
if (cd "$root" && cargo build --quiet --release -p metta-control --bins); then
    pass "build mettad and mettactl (release)"
else
    fail "build mettad and mettactl (release)"
fi
host_target=$(cd "$root" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
mettad="$host_target/release/mettad"
mettactl="$host_target/release/mettactl"

# A loopback port free for both TCP and UDP (mettad listens on both).
free_port() {
    python3 -c '
import socket
while True:
    t = socket.socket(); t.bind(("127.0.0.1", 0)); p = t.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", p)); break
    except OSError:
        pass
print(p)'
}
ctl() { "$mettactl" --config "$tmp/admin.conf" "$@"; }
# start_mettad: run mettad in the background and wait until it answers.
start_mettad() {
    "$mettad" --data-dir "$tmp/n1" >>"$tmp/mettad.log" 2>&1 &
    mettad_pid=$!
    local i
    # `status` answers as soon as mettad serves; listing tokens needs a
    # leader and the bootstrapped registry, which is what the tests need.
    for i in $(seq 150); do
        ctl token ls >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    return 1
}
stop_mettad() {
    kill "$mettad_pid" 2>/dev/null
    wait "$mettad_pid" 2>/dev/null
    mettad_pid=
}
# qemu_bg LOG CMDLINE: boot the image in the background, serial to LOG, with
# the join tests' CPU and network; sets $qemu_pid.
qemu_bg() {
    qemu-system-x86_64 -accel tcg -M pc -m 128M -no-reboot -display none \
        -serial "file:$1" -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
        -cpu max "${net_args[@]}" -kernel "$elf" -append "$2" </dev/null >/dev/null 2>&1 &
    qemu_pid=$!
}
stop_qemu() {
    kill "$qemu_pid" 2>/dev/null
    wait "$qemu_pid" 2>/dev/null
    qemu_pid=
}
# wait_log LOG REGEX SECS: wait until a line of LOG matches REGEX.
wait_log() {
    local end=$((SECONDS + $3))
    until tr -d '\r' 2>/dev/null <"$1" | grep -qE -- "$2"; do
        [ "$SECONDS" -ge "$end" ] && return 1
        sleep 0.2
    done
}
# node_up NAME: the node NAME from `mettactl nodes -o json` (one line), if up.
node_up() {
    ctl nodes -o json 2>/dev/null | python3 -c '
import json, sys
for n in json.load(sys.stdin):
    if n["name"] == sys.argv[1] and n["status"] == "up":
        print(json.dumps(n)); sys.exit(0)
sys.exit(1)' "$1"
}
# wait_node_up NAME SECS
wait_node_up() {
    local end=$((SECONDS + $2))
    until node=$(node_up "$1"); do
        [ "$SECONDS" -ge "$end" ] && return 1
        sleep 0.3
    done
}
new_token() {
    local i t
    for i in $(seq 25); do
        t=$(ctl token create --role worker --uses 1 2>/dev/null) && [ -n "$t" ] && {
            echo "$t"
            return 0
        }
        sleep 0.2
    done
    echo "    (could not create a join token)" >&2
    return 1
}

port=$(free_port)
cluster_up=0
if [ -x "$mettad" ] && [ -x "$mettactl" ] &&
    ctl init --cluster lab --data-dir "$tmp/n1" --listen "127.0.0.1:$port" --no-start >/dev/null 2>&1 &&
    start_mettad; then
    cluster_up=1
fi
check "control plane: cluster lab up at 127.0.0.1:$port" [ "$cluster_up" = 1 ]

if [ "$cluster_up" = 1 ]; then
    join_line='\] joined cluster lab as node/[0-9]+ in [0-9]+ ms \(certificate until [0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}Z\)'
    join_args() { echo "net=dhcp metta.ctl=10.0.2.2:$port metta.token=$1 metta.name=$2 ${3:-}"; }

    echo "== join (a real mettad over TLS/TCP, then syncs)"
    token=$(new_token)
    secret=$(cut -d. -f3 <<<"$token")
    log="$tmp/join.log"
    qemu_bg "$log" "$(join_args "$token" kernel-a)"
    wait_log "$log" "$join_line" 60
    # The idle memory line follows the first acknowledged sync.
    wait_log "$log" '\] memory: .*, total [0-9]+ KiB$' 30
    tr -d '\r' <"$log" | grep -E '\] (link|joined|net: dhcp|node|memory)' | sed 's/^/    | /'
    check "join: 'joined cluster lab as node/<id> in <ms> ms (certificate until <date>)'" \
        bash -c 'tr -d "\r" <"$1" | grep -qE "$2"' _ "$log" "$join_line"
    usable=$(tr -d '\r' <"$log" | sed -nE 's/.*usable memory: ([0-9]+) bytes.*/\1/p')
    node=
    wait_node_up kernel-a 20
    echo "    mettactl: ${node:-kernel-a not up}"
    check "join: mettactl nodes lists it up, kind native, 1 CPU, ${usable:-?} bytes as the kernel reported" \
        python3 -c '
import json, sys
n = json.loads(sys.argv[1] or "{}")
sys.exit(not (n.get("kind") == "native" and n.get("status") == "up" and n.get("cpus") == 1
              and n.get("memory_bytes") == int(sys.argv[2] or -1) and n.get("raft") == "-"))' \
        "$node" "$usable"
    check "join: fuel rate calibrated after the join" \
        bash -c 'tr -d "\r" <"$1" | grep -qE "\] node: fuel rate [0-9]+ fuel/ms by the TSC: median of 5 runs"' _ "$log"
    idle_kib=$(tr -d '\r' <"$log" | sed -nE 's/.*\] memory: image [0-9]+ KiB, page tables [0-9]+ KiB, stacks [0-9]+ KiB, heap in use [0-9]+ KiB \(peak [0-9]+ KiB\), total ([0-9]+) KiB$/\1/p')
    check "join: idle memory printed, total ${idle_kib:-?} KiB <= 16 MiB" \
        bash -c '[ -n "$1" ] && [ "$1" -le 16384 ]' _ "$idle_kib"
    check "join: heartbeats acknowledged" \
        bash -c 'tr -d "\r" <"$1" | grep -qE "\] link: heartbeat 1 acknowledged \(cpus 1, memory [0-9.]+ MiB\)"' _ "$log"

    echo "== restart (mettad killed and restarted under the running kernel)"
    stop_mettad
    lost=$(wait_log "$log" 'link: lost the connection to 10\.0\.2\.2:[0-9]+: .*; retrying in 0\.5 s' 15 && echo yes)
    check "restart: the kernel notices the lost connection and retries" [ "$lost" = yes ]
    # Keep mettad down until the backoff has doubled once.
    wait_log "$log" 'link: cannot reach 10\.0\.2\.2:[0-9]+: connection refused; retrying in 1 s' 15
    start_mettad
    reconnected=$(wait_log "$log" 'link: reconnected to 10\.0\.2\.2:[0-9]+ \([0-9]+ retries\); heartbeats resume' 40 && echo yes)
    tr -d '\r' <"$log" | grep -E '\] link: (lost|cannot|reconnected)' | sed 's/^/    | /'
    check "restart: retries with backoff while mettad is down" \
        bash -c 'tr -d "\r" <"$1" | grep -qE "\] link: cannot reach 10\.0\.2\.2:[0-9]+: connection refused; retrying in 1 s"' _ "$log"
    check "restart: the kernel reconnects" [ "$reconnected" = yes ]
    node=
    wait_node_up kernel-a 20
    check "restart: the node is up again (${node:+heartbeats arriving})" [ -n "$node" ]
    stop_qemu
    check "join: the token's secret never appears on serial" \
        bash -c '! grep -qF "$1" "$2"' _ "$secret" "$log"
    used_token=$token

    echo "== heartbeats (metta.heartbeats=2: exit after two)"
    boot "$(join_args "$(new_token)" kernel-b metta.heartbeats=2)" -cpu max "${net_args[@]}"
    printf '%s\n' "$out" | grep -E '\] (link: heartbeat|link: 2|joined)' | sed 's/^/    | /'
    echo "    (qemu exit status $rc, ${secs}s)"
    check "heartbeats: joined, two heartbeats acknowledged, exit $EXIT_SUCCESS" \
        bash -c '[ "$1" -eq "$2" ] && grep -qE "$4" <<<"$3" && grep -qF "link: 2 heartbeats acknowledged (metta.heartbeats=2); done" <<<"$3"' \
        _ "$rc" "$EXIT_SUCCESS" "$out" "$join_line"

    echo "== wrong-pin (the token's CA pin edited)"
    token=$(new_token)
    last=${token: -1}
    [ "$last" = 0 ] && swap=1 || swap=0
    boot "$(join_args "${token%?}$swap" kernel-c)" -cpu max "${net_args[@]}"
    printf '%s\n' "$out" | grep -E '\] (link|join)' | sed 's/^/    | /'
    echo "    (qemu exit status $rc, ${secs}s)"
    check "wrong-pin: exits with the pin-mismatch code ($EXIT_PIN_MISMATCH)" [ "$rc" -eq "$EXIT_PIN_MISMATCH" ]
    check "wrong-pin: 'join refused: the server is not the cluster pinned by the token'" \
        has '\] join refused: the server is not the cluster pinned by the token$'

    echo "== used-token (the token of the first join again; an unknown token)"
    boot "$(join_args "$used_token" kernel-d)" -cpu max "${net_args[@]}"
    printf '%s\n' "$out" | grep -E '\] join' | sed 's/^/    | /'
    echo "    (qemu exit status $rc, ${secs}s)"
    check "used-token: exits with the token-rejected code ($EXIT_TOKEN_REJECTED)" [ "$rc" -eq "$EXIT_TOKEN_REJECTED" ]
    check "used-token: says the token was already used" \
        has "\] join refused: the cluster rejected token $(cut -d. -f2 <<<"$used_token"): token already used$"
    unknown=$(sed -E 's/^metta1\.[0-9a-f]{8}\./metta1.00000000./' <<<"$used_token")
    boot "$(join_args "$unknown" kernel-e)" -cpu max "${net_args[@]}"
    printf '%s\n' "$out" | grep -E '\] join' | sed 's/^/    | /'
    check "used-token: an unknown token is rejected as such (exit $rc)" \
        bash -c '[ "$1" -eq "$2" ] && grep -qE "\] join refused: the cluster rejected token 00000000: unknown token$" <<<"$3"' \
        _ "$rc" "$EXIT_TOKEN_REJECTED" "$out"

    echo "== no-ctl (nothing listening at metta.ctl)"
    dead=$(free_port)
    QEMU_TIMEOUT=5 boot "net=dhcp metta.ctl=10.0.2.2:$dead metta.token=$(new_token) metta.name=kernel-f" -cpu max "${net_args[@]}"
    printf '%s\n' "$out" | grep -E '\] link' | sed 's/^/    | /'
    echo "    (stopped after 5 s: qemu exit status $rc)"
    retries=$(printf '%s\n' "$out" | grep -cE "\] link: cannot reach 10\.0\.2\.2:$dead: connection refused; retrying in")
    check "no-ctl: says why and retries ($retries retries in 5 s, >= 2)" [ "$retries" -ge 2 ]
    check "no-ctl: backoff doubles (0.5 s, 1 s, 2 s)" \
        bash -c 'grep -q "retrying in 0\.5 s$" <<<"$1" && grep -q "retrying in 1 s$" <<<"$1" && grep -q "retrying in 2 s$" <<<"$1"' _ "$out"
    check "no-ctl: still running when stopped (no exit, no hang without a word)" [ "$rc" -eq 124 ]
fi

echo "== ipxe (chained: QEMU's iPXE ROM, DHCP and TFTP from QEMU user networking)"
mkdir -p "$tmp/tftp"
cp "$elf" "$tmp/tftp/metta-kernel"
printf '#!ipxe\nkernel metta-kernel metta.test=ipxe\nboot\n' >"$tmp/tftp/boot.ipxe"
QEMU_TIMEOUT=60 qemu -boot n -device virtio-net-pci,netdev=n0 \
    -netdev "user,id=n0,tftp=$tmp/tftp,bootfile=boot.ipxe"
printf '%s\n' "$out" | grep -E '^\[' | sed 's/^/    | /'
echo "    (qemu exit status $rc, ${secs}s)"
check "ipxe: exits with the success code ($EXIT_SUCCESS)" [ "$rc" -eq "$EXIT_SUCCESS" ]
check "ipxe: loaded by iPXE" has '^\[ *[0-9]+\.[0-9]{6}\] loader: iPXE'
check "ipxe: banner and command line" \
    bash -c 'grep -q " booted$" <<<"$1" && grep -q "cmdline: \".*metta\.test=ipxe\"$" <<<"$1"' _ "$out"

if [ "$measure" = 1 ]; then
    echo "== measure: wall clock of 5 boots (qemu start to exit)"
    times=()
    for _ in 1 2 3 4 5; do
        boot ""
        times+=("$secs")
        echo "    ${secs}s (exit $rc): $(printf '%s\n' "$out" | grep -m1 booted)"
    done
    median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n 3p)
    echo "median: ${median}s; image: $(stat -c %s "$elf") bytes"
    echo "== measure: wall clock of 5 boots to a DHCP lease (qemu start to exit)"
    times=()
    for _ in 1 2 3 4 5; do
        boot "net=dhcp" "${net_args[@]}"
        times+=("$secs")
        echo "    ${secs}s (exit $rc): $(printf '%s\n' "$out" | grep -m1 'dhcp lease')"
    done
    median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n 3p)
    echo "median boot to lease: ${median}s"
    echo "== measure: empty activation round trip on native under TCG (test=bench, 3 boots)"
    for _ in 1 2 3; do
        boot "test=bench"
        printf '%s\n' "$out" | grep -E '\] bench: (Domain::activate|Nucleus::step|fuel rate)' | sed 's/^/    /'
    done
    echo "host figure for comparison: cargo run --release -p metta-nucleus --example activation"
    if [ "$cluster_up" = 1 ]; then
        echo "== measure: boot -> joined a real mettad under TCG (5 boots, metta.heartbeats=1)"
        joins=()
        walls=()
        for i in 1 2 3 4 5; do
            boot "$(join_args "$(new_token)" "measure-$i" metta.heartbeats=1)" -cpu max "${net_args[@]}"
            ms=$(printf '%s\n' "$out" | sed -nE 's/.*\] joined cluster .* in ([0-9]+) ms .*/\1/p')
            # QEMU's own share (start-up to kernel entry, and exit): its wall
            # clock minus the kernel's last timestamp; wall clock to joined is
            # that plus the kernel's figure.
            last=$(printf '%s\n' "$out" | sed -nE 's/^\[ *([0-9]+)\.([0-9]{3}).*/\1\2/p' | tail -n1)
            wall_ms=$(awk -v s="$secs" 'BEGIN { printf "%d", s * 1000 }')
            joins+=("${ms:-0}")
            walls+=($((wall_ms - 10#${last:-0} + ${ms:-0})))
            echo "    joined at ${ms:-?} ms (kernel clock); qemu start to exit ${secs}s (exit $rc);" \
                "wall clock to joined ~$((wall_ms - 10#${last:-0} + ${ms:-0})) ms"
            printf '%s\n' "$out" | grep -E '\] link: join timing' | sed 's/^.*link: /      /'
            printf '%s\n' "$out" | grep -E '\] memory: ' | sed 's/^.*\] /      /'
        done
        echo "median boot -> joined: $(printf '%s\n' "${joins[@]}" | sort -n | sed -n 3p) ms from kernel entry" \
            "(target <= 300 ms); ~$(printf '%s\n' "${walls[@]}" | sort -n | sed -n 3p) ms from QEMU start"
    fi
fi

finish
