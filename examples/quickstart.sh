#!/usr/bin/env bash
# Quickstart: builds wasnap, then walks a container image's layers through their life
# with the embedded CLI, on a fresh root (the default root is left alone).
#
#   ./examples/quickstart.sh [ROOT]
#
# As root it mounts every snapshot for real; otherwise it writes through the native
# driver's directories, which is what a bind mount would show.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --locked --quiet -p wasnap-cli
wasnap() { ./target/debug/wasnap "$@"; }

root="${1:-$(mktemp -d /tmp/wasnap-quickstart.XXXXXX)}"
export WASNAP_ROOT="$root"
mnt=$(mktemp -d /tmp/wasnap-mnt.XXXXXX)
mounted=""
cleanup() { if [ -n "$mounted" ]; then wasnap unmount "$mnt" || true; fi; rmdir "$mnt" 2>/dev/null || true; }
trap cleanup EXIT

step() { if [ -t 1 ]; then printf '\n\033[1m$ wasnap %s\033[0m\n' "$*"; else printf '\n$ wasnap %s\n' "$*"; fi; wasnap "$@"; }

# Opens snapshot $1 for writing or reading at $mnt (or its directory when not root).
open() {
    if [ "$(id -u)" = 0 ]; then
        step mount "$1" "$mnt"; mounted=1; dir="$mnt"
    else
        dir=$(wasnap --format json mounts "$1" | sed -n 's/.*"source": "\(.*\)".*/\1/p')
    fi
}
close() { if [ -n "$mounted" ]; then step unmount "$mnt"; mounted=""; fi; }

echo "root: $root"

step prepare layer-1-active
open layer-1-active
mkdir -p "$dir/etc" && echo "hello from layer 1" > "$dir/etc/motd" && echo "v1" > "$dir/etc/version"
close
step commit layer-1 layer-1-active --label org.example/layer=base

step prepare layer-2-active layer-1
open layer-2-active
echo "v2" > "$dir/etc/version" && rm "$dir/etc/motd" && echo "added in layer 2" > "$dir/added"
close
step commit layer-2 layer-2-active

step view inspect layer-2
open inspect
echo; echo "a read-only view of layer-2:"; ls -l "$dir" "$dir/etc"; cat "$dir/etc/version"
if [ -n "$mounted" ]; then
    touch "$dir/nope" 2>/dev/null && echo "view is writable?!" && exit 1
    echo "(writing to the view fails: read-only file system)"
fi
close

step ls
step ls --filter kind==committed
step tree
step usage
step label layer-2 org.example/pinned=true
step --format json stat layer-2
step rm layer-1 || echo "(refused: layer-1 still has children)"
step rm inspect layer-2 layer-1
step ls
echo; echo "quickstart done; state kept in $root"
