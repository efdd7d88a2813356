#!/usr/bin/env bash
# skerry's benchmark, one command: installs the peers, builds skerry (release)
# and runs the whole comparison, then the port-change benchmark.
#
#   sudo bench/run.sh                 # 3 runs per setup (about 30 min on 2 cores)
#   sudo bench/run.sh --quick         # 1 short run: a smoke test (about 6 min)
#   sudo bench/run.sh --runs 5 --setups skerry,rathole-noise
#   sudo bench/run.sh --port-changes-only
#   sudo bench/run.sh --no-port-changes
#   sudo bench/run.sh --no-install    # use what is installed, do not build
#   sudo bench/run.sh --skerry-rev HEAD   # measure a committed revision (built
#                                     # from `git archive` under bench/.tools)
#
# Everything it starts lives in network namespaces named skb-<pid>-{c,e,h}
# and is removed on exit. Writes bench/RESULTS.md, bench/chart.svg and
# bench/results/latest.json.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=bench
TOOLS="$BENCH/.tools"
export PATH="$PATH:$HOME/.cargo/bin:/root/.cargo/bin"
if [[ -n ${SUDO_USER:-} ]]; then  # sudo from a user whose Rust lives in their home
  PATH="$PATH:$(getent passwd "$SUDO_USER" | cut -d: -f6)/.cargo/bin"
fi

if [[ $EUID -ne 0 ]]; then
  echo "bench/run.sh: needs root (network namespaces, TUN devices): sudo bench/run.sh $*" >&2
  exit 2
fi

install=1 compare=1 port_changes=1 quick=() rev=""
pass=()
while [[ $# -gt 0 ]]; do
  a=$1; shift
  case "$a" in
    --skerry-rev) rev=${1:?--skerry-rev needs a git revision}; shift ;;
    --no-install) install=0 ;;
    --port-changes-only) compare=0 ;;
    --no-port-changes) port_changes=0 ;;
    --quick) quick=(--quick); pass+=("$a") ;;
    *) pass+=("$a") ;;
  esac
done

cleanup() { python3 "$BENCH/harness.py" --sweep || true; }
trap cleanup EXIT

if [[ $install -eq 1 ]]; then
  # Debian packages: the load generator, the innisfree-style relays, WireGuard tools.
  # musl-tools: the edge-agent is measured as shipped, a static musl build.
  want=(iperf3 socat nginx-light libnginx-mod-stream wireguard-tools iproute2 procps musl-tools)
  if apt-cache policy wireguard-go 2>/dev/null | grep -q 'Candidate: [0-9]'; then want+=(wireguard-go); fi
  missing=()
  for p in "${want[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
  if [[ ${#missing[@]} -gt 0 ]]; then
    echo "installing ${missing[*]}"
    apt-get update -qq
    # policy-rc.d (if any) keeps the nginx and iperf3 packages from starting daemons
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
    if ! apt-cache policy wireguard-go 2>/dev/null | grep -q 'Candidate: [0-9]'; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q wireguard-go >/dev/null 2>&1 || true
    fi
  fi
  # Peers from crates.io, built once into bench/.tools (minutes each on 2 cores).
  for c in boringtun-cli:boringtun-cli rathole:rathole bore-cli:bore; do
    crate=${c%%:*} bin=${c##*:}
    if [[ ! -x "$TOOLS/bin/$bin" ]]; then
      echo "cargo install $crate (into $TOOLS)"
      cargo install --quiet --locked --root "$TOOLS" "$crate" || cargo install --quiet --root "$TOOLS" "$crate" \
        || echo "warning: could not install $crate; its setup will be skipped" >&2
    fi
  done
  if ! rustup target list --installed 2>/dev/null | grep -x x86_64-unknown-linux-musl >/dev/null; then
    command -v rustup >/dev/null || { echo "bench/run.sh: rustup is needed to add the x86_64-unknown-linux-musl target (the edge-agent is measured as shipped, static)" >&2; exit 1; }
    rustup target add x86_64-unknown-linux-musl
  fi
  echo "building bench/loadgen and skerry (release; the edge-agent static, for musl, as in the image)"
  cargo build --quiet --release --manifest-path "$BENCH/loadgen/Cargo.toml" --target-dir "$TOOLS/target"
  mkdir -p "$TOOLS/bin"
  install -m 0755 "$TOOLS/target/release/skb-loadgen" "$TOOLS/bin/skb-loadgen"
  if [[ -z $rev ]]; then
    cargo build --quiet --release -p home-agent
    cargo build --quiet --release --target x86_64-unknown-linux-musl -p edge-agent
  fi
fi
if [[ -n $rev ]]; then
  # A committed revision, built on its own: the work tree may be mid-edit.
  sha=$(git rev-parse --verify "$rev^{commit}")
  src="$TOOLS/skerry-src/$sha"
  if [[ ! -f "$src/Cargo.toml" ]]; then
    mkdir -p "$src"
    git archive "$sha" | tar -x -C "$src"
  fi
  stamp="$TOOLS/skerry-target/release/.skb-rev"
  edge_bin="$TOOLS/skerry-target/x86_64-unknown-linux-musl/release/edge-agent"
  if [[ $install -eq 1 || "$(cat "$stamp" 2>/dev/null)" != "$sha" || ! -x $edge_bin ]]; then
    echo "building skerry $rev (${sha:0:12}) in $src"
    (cd "$src" && cargo build --quiet --release -p home-agent --target-dir "$PWD/../../skerry-target" &&
      cargo build --quiet --release --target x86_64-unknown-linux-musl -p edge-agent --target-dir "$PWD/../../skerry-target")
    echo "$sha" > "$stamp"
  fi
  export SKB_SKERRY_BIN_DIR="$PWD/$TOOLS/skerry-target/release"
  export SKB_SKERRY_EDGE_BIN="$PWD/$edge_bin"
  export SKB_SKERRY_DESC="$(git log -1 --format='%h %cs' "$sha") (--skerry-rev $rev)"
fi

if [[ $compare -eq 1 ]]; then
  python3 "$BENCH/compare.py" "${pass[@]}"
fi
if [[ $port_changes -eq 1 ]]; then
  python3 "$BENCH/port_changes.py" "${quick[@]}"
fi
