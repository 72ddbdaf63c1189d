#!/bin/sh
# Side-by-side benchmark: fake upstream direct, through gaia-balancer, and
# through nginx, all on 127.0.0.1; prints one Markdown table (stdout) and
# progress (stderr). Installs wrk and nginx-light with apt-get when they are
# missing and we can (root); without them it still runs, with our own load
# generator and no nginx column. Extra arguments go to the bench example
# (e.g. --quick, --reps 3, --secs 3, --no-nginx, --keep).
set -eu
cd "$(dirname "$0")/.."

missing=""
command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx-light"
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bench: installing$missing" >&2
    # Debian's postinst would start a system nginx on port 80; policy-rc.d
    # (present in most containers) prevents that, and we never use it.
    apt-get update -qq >&2 || true
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >&2 \
      || echo "bench: could not install$missing; going on without" >&2
  else
    echo "bench: not installed:$missing (run as root to install); going on without" >&2
  fi
fi

# 1,000 streams need ~4,000 descriptors in the balancer and as many here.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo build --release --quiet --bin gaia-balancer --example fake_upstream --example bench
target="${CARGO_TARGET_DIR:-target}"
exec "$target/release/examples/bench" \
  --balancer "$target/release/gaia-balancer" \
  --fake "$target/release/examples/fake_upstream" "$@"
