#!/usr/bin/env bash
# Build static (musl) release binaries of gaia-balancer for x86_64 and aarch64
# Linux, copy them to dist/, check that they are static and start, and print
# their sizes.
#
#   scripts/build-release.sh                  # both targets
#   scripts/build-release.sh aarch64          # one target (x86_64 | aarch64 | full triple)
#   scripts/build-release.sh --install-deps   # first apt-get install the C toolchains
#
# Needs: rustup (to add the musl standard libraries), a C compiler for each
# target (ring, under rustls, compiles C and assembly): musl-gcc from Debian's
# musl-tools for x86_64, aarch64-linux-gnu-gcc from gcc-aarch64-linux-gnu for
# aarch64 (it is also the linker there; Rust links musl's own crt and libc,
# which ship with the target, so the glibc cross toolchain is enough). x86_64
# links with the host cc. qemu-user, if
# present, lets the aarch64 binary be started here as a check.
#
# Environment: CARGO_TARGET_DIR (default target/), DIST (default dist/).
# Exit status: 0 when every requested target was built, 1 otherwise; each
# failure says which step failed and what to install.
set -euo pipefail

cd "$(dirname "$0")/.."
dist=${DIST:-dist}
target_dir=${CARGO_TARGET_DIR:-target}
install_deps=0
targets=()
for arg in "$@"; do
    case "$arg" in
        --install-deps) install_deps=1 ;;
        x86_64 | x86_64-unknown-linux-musl) targets+=(x86_64-unknown-linux-musl) ;;
        aarch64 | arm64 | aarch64-unknown-linux-musl) targets+=(aarch64-unknown-linux-musl) ;;
        -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "build-release: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || targets=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl)

if [ "$install_deps" = 1 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq musl-tools gcc-aarch64-linux-gnu qemu-user >/dev/null
fi

# The C compiler (and linker) each target needs, and the Debian package with it.
c_compiler() {
    case "$1" in
        x86_64-unknown-linux-musl) echo musl-gcc ;;
        aarch64-unknown-linux-musl) echo aarch64-linux-gnu-gcc ;;
    esac
}
debian_package() {
    case "$1" in
        x86_64-unknown-linux-musl) echo musl-tools ;;
        aarch64-unknown-linux-musl) echo gcc-aarch64-linux-gnu ;;
    esac
}

fail() {
    echo "build-release: $1: $2" >&2
    failed+=("$1")
}

built=()
failed=()
mkdir -p "$dist"
for t in "${targets[@]}"; do
    echo "== $t"
    if ! command -v rustup >/dev/null; then
        fail "$t" "rustup not found; the musl standard library comes from 'rustup target add $t'"
        continue
    fi
    if ! rustup target list --installed | grep -qx "$t"; then
        if ! rustup target add "$t"; then
            fail "$t" "'rustup target add $t' failed: rustup could not download the standard library for this target (no access to the Rust distribution server?). Nothing else provides it; build on a machine that can fetch it, or copy ~/.rustup/toolchains/*/lib/rustlib/$t from one."
            continue
        fi
    fi
    cc_bin=$(c_compiler "$t")
    if ! command -v "$cc_bin" >/dev/null; then
        fail "$t" "C compiler '$cc_bin' not found (ring needs one for the target): apt-get install $(debian_package "$t"), or rerun with --install-deps"
        continue
    fi
    # CC_<triple> is the C compiler for ring. The linker is set only when
    # cross-compiling: for x86_64 Rust's default (the host cc with musl's
    # self-contained crt and libc) gives a static binary, while musl-gcc as
    # linker would add a dynamic loader (/lib/ld-musl-x86_64.so.1) that a
    # board does not have.
    build_env=("CC_$(echo "$t" | tr '-' '_')=$cc_bin")
    case "$t" in
        aarch64-*) build_env+=("CARGO_TARGET_$(echo "$t" | tr 'a-z-' 'A-Z_')_LINKER=$cc_bin") ;;
    esac
    if ! env "${build_env[@]}" cargo build --release --locked --target "$t"; then
        fail "$t" "cargo build failed (see above)"
        continue
    fi
    bin="$target_dir/$t/release/gaia-balancer"
    out="$dist/gaia-balancer-$t"
    cp "$bin" "$out"
    # A static binary has no program interpreter (no dynamic loader).
    if readelf -l "$out" | grep -q 'Requesting program interpreter'; then
        fail "$t" "$out is dynamically linked"
        continue
    fi
    case "$t" in
        x86_64-*) runner=() ;;
        aarch64-*) runner=(qemu-aarch64) ;;
    esac
    if [ ${#runner[@]} -eq 0 ] || command -v "${runner[0]}" >/dev/null; then
        if ! version=$("${runner[@]}" "$out" --version); then
            fail "$t" "$out does not start"
            continue
        fi
        echo "   starts: $version"
    else
        echo "   (not started here: install qemu-user to run the aarch64 binary on x86_64)"
    fi
    built+=("$out")
done

echo
echo "static release binaries:"
for f in "${built[@]}"; do
    bytes=$(stat -c %s "$f")
    awk -v f="$f" -v b="$bytes" 'BEGIN { printf "  %-48s %9d bytes  %5.2f MiB\n", f, b, b / 1048576 }'
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "not built: ${failed[*]}" >&2
    exit 1
fi
