#!/usr/bin/env bash
# Build the example domains (wasm32-unknown-unknown, release profile tuned for
# size), check each against the domain ABI v1 (imports only from module
# "metta" with the ABI's signatures; exports memory and metta_activate), copy
# them to domains/out/<name>.wasm and print their sizes.
#
# Usage: domains/build.sh [extra cargo build args]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
manifest="$here/Cargo.toml"

# rustup does not add a pinned toolchain's targets when the toolchain is
# already installed: add the one this needs (a no-op when present).
if command -v rustup >/dev/null &&
    ! (cd "$here" && rustup target list --installed) | grep -qx wasm32-unknown-unknown; then
    (cd "$here" && rustup target add wasm32-unknown-unknown)
fi

cargo build --release --target wasm32-unknown-unknown --manifest-path "$manifest" "$@"

target_dir=$(cargo metadata --format-version 1 --no-deps --manifest-path "$manifest" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
release="$target_dir/wasm32-unknown-unknown/release"

mkdir -p "$here/out"
names=()
for dir in "$here"/*/; do
    name=$(basename "$dir")
    [ -f "$dir/Cargo.toml" ] || continue
    cp "$release/$name.wasm" "$here/out/$name.wasm"
    names+=("$name")
done

cd "$here/out"
python3 "$here/check_wasm.py" "${names[@]/%/.wasm}"
