#!/bin/sh
# Installs skerry's static edge-agent onto a minimal Debian 12 and makes the
# host an edge: the systemd unit, kernel settings, and nothing else listening.
#
# Runs as root on the machine being turned into the image:
#   - Packer's digitalocean builder runs it on a live droplet booted from
#     debian-12-x64 (SKERRY_TARGET=droplet, the default);
#   - images/build-local.sh runs it in a chroot of the image it builds
#     (SKERRY_TARGET=image), where nothing is running.
#
# Inputs (environment):
#   SKERRY_SRC      directory holding edge-agent (the static musl binary),
#                   edge-agent.service and sysctl.d/ (default: this
#                   script's directory)
#   SKERRY_TARGET   droplet | image (see above)
#   SKERRY_SSH      0 (default): SSH is disabled and masked.
#                   1: SSH is enabled, public key only (no passwords, no
#                   keyboard-interactive), root by key only.
#   SKERRY_SSH_AUTHORIZED_KEYS
#                   image target only: a file of public keys for root
#                   (a droplet gets the keys chosen at creation instead)
#
# It is idempotent: running it twice leaves the same result.
set -eu

say() { printf 'provision: %s\n' "$*"; }
die() { printf 'provision: error: %s\n' "$*" >&2; exit 1; }

SKERRY_SRC=${SKERRY_SRC:-$(cd "$(dirname "$0")" && pwd)}
SKERRY_TARGET=${SKERRY_TARGET:-droplet}
SKERRY_SSH=${SKERRY_SSH:-0}
SKERRY_SSH_AUTHORIZED_KEYS=${SKERRY_SSH_AUTHORIZED_KEYS:-}

[ "$(id -u)" -eq 0 ] || die "run as root"
case $SKERRY_TARGET in droplet | image) ;; *) die "SKERRY_TARGET must be droplet or image, not '$SKERRY_TARGET'" ;; esac
case $SKERRY_SSH in 0 | 1) ;; *) die "SKERRY_SSH must be 0 or 1, not '$SKERRY_SSH'" ;; esac
# shellcheck disable=SC1091 # the target's own file
. /etc/os-release
if [ "${ID:-}" != debian ] || [ "${VERSION_ID:-}" != 12 ]; then
  die "expected Debian 12, found ${PRETTY_NAME:-an unknown system}"
fi
for f in edge-agent edge-agent.service sysctl.d; do
  [ -e "$SKERRY_SRC/$f" ] || die "$SKERRY_SRC/$f is missing"
done

# --- the edge-agent -------------------------------------------------------
# A static binary: nothing to install from the network, no libc to match.
magic=$(od -An -tx1 -N4 "$SKERRY_SRC/edge-agent" | tr -d ' \n')
[ "$magic" = 7f454c46 ] || die "$SKERRY_SRC/edge-agent is not an ELF binary"
install -D -m 0755 -o root -g root "$SKERRY_SRC/edge-agent" /usr/local/bin/edge-agent
version=$(/usr/local/bin/edge-agent --version) ||
  die "/usr/local/bin/edge-agent does not run here (is it the static musl build?)"
say "installed $version"

install -D -m 0644 "$SKERRY_SRC/edge-agent.service" /etc/systemd/system/edge-agent.service
# The TUN driver is a module in Debian's kernels; load it at boot, since the
# sandboxed agent may not load modules itself.
install -d /etc/modules-load.d /etc/modprobe.d
echo tun >/etc/modules-load.d/skerry-edge.conf
# The edge runs no virtual machines: no /dev/kvm.
printf 'blacklist kvm_intel\nblacklist kvm_amd\nblacklist kvm\n' >/etc/modprobe.d/skerry-edge.conf
systemctl enable edge-agent.service

# --- kernel settings ----------------------------------------------------
install -d /etc/sysctl.d
for f in "$SKERRY_SRC"/sysctl.d/*.conf; do
  install -m 0644 "$f" /etc/sysctl.d/
done
if [ "$SKERRY_TARGET" = droplet ]; then
  sysctl -q --system >/dev/null
fi

# --- nothing else listening ---------------------------------------------
# Services that listen on a network address in some Debian images. Absent
# ones are skipped; present ones are disabled and masked, so that nothing
# (a package, cloud-init) starts them again.
quiet_units="rpcbind.service rpcbind.socket exim4.service postfix.service
  avahi-daemon.service avahi-daemon.socket cups.service cups.socket
  cups-browsed.service nfs-server.service smbd.service nmbd.service
  apache2.service nginx.service snmpd.service ntp.service ntpsec.service
  do-agent.service"
for unit in $quiet_units; do
  if systemctl cat "$unit" >/dev/null 2>&1; then
    if [ "$SKERRY_TARGET" = droplet ]; then
      systemctl disable --now "$unit" >/dev/null 2>&1 || true
    fi
    systemctl mask "$unit" >/dev/null
    say "masked $unit"
  fi
done
# chrony keeps the clock (TLS needs it) but opens no command port.
if [ -d /etc/chrony ]; then
  install -d /etc/chrony/conf.d
  printf 'cmdport 0\n' >/etc/chrony/conf.d/skerry-edge.conf
  [ "$SKERRY_TARGET" = image ] || systemctl try-restart chrony.service || true
fi
# systemd-resolved's stub stays on 127.0.0.53 (loopback); LLMNR and mDNS,
# which listen on every interface, go.
if systemctl cat systemd-resolved.service >/dev/null 2>&1; then
  install -d /etc/systemd/resolved.conf.d
  printf '[Resolve]\nLLMNR=no\nMulticastDNS=no\n' >/etc/systemd/resolved.conf.d/skerry-edge.conf
  [ "$SKERRY_TARGET" = image ] || systemctl try-restart systemd-resolved.service || true
fi

# --- SSH: off, or key only ------------------------------------------------
ssh_units="ssh.service ssh.socket"
if [ "$SKERRY_SSH" = 1 ]; then
  [ -x /usr/sbin/sshd ] || die "SKERRY_SSH=1 but openssh-server is not installed"
  install -d /etc/ssh/sshd_config.d
  cat >/etc/ssh/sshd_config.d/50-skerry-edge.conf <<'CONF'
# skerry edge: public keys only.
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AuthenticationMethods publickey
PermitEmptyPasswords no
X11Forwarding no
CONF
  # Host keys are made on each machine's first boot, never baked in.
  install -d /etc/systemd/system/ssh.service.d
  printf '[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n' \
    >/etc/systemd/system/ssh.service.d/10-skerry-host-keys.conf
  rm -f /etc/ssh/ssh_host_*
  for unit in $ssh_units; do systemctl unmask "$unit" >/dev/null 2>&1 || true; done
  systemctl enable ssh.service
  if [ -n "$SKERRY_SSH_AUTHORIZED_KEYS" ]; then
    [ "$SKERRY_TARGET" = image ] || die "SKERRY_SSH_AUTHORIZED_KEYS is for the image target; a droplet gets its keys at creation"
    install -d -m 0700 /root/.ssh
    install -m 0600 "$SKERRY_SSH_AUTHORIZED_KEYS" /root/.ssh/authorized_keys
  fi
  say "SSH enabled, public keys only"
else
  for unit in $ssh_units; do
    if systemctl cat "$unit" >/dev/null 2>&1; then
      # Not --now on a droplet: Packer is connected through it. The
      # snapshot boots with it off.
      systemctl disable "$unit" >/dev/null 2>&1 || true
      systemctl mask "$unit" >/dev/null
    fi
  done
  # DigitalOcean's web console agent logs in through SSH: useless without it.
  if systemctl cat droplet-agent.service >/dev/null 2>&1; then
    systemctl disable droplet-agent.service >/dev/null 2>&1 || true
    systemctl mask droplet-agent.service >/dev/null
  fi
  say "SSH disabled"
fi

# --- target specifics -----------------------------------------------------
if [ "$SKERRY_TARGET" = image ]; then
  # Networking: DHCP (IPv4, and IPv6 router advertisements) on every
  # Ethernet interface, by systemd-networkd. A custom image on DigitalOcean
  # gets its addresses this way; the metadata service is then reached
  # through the default route.
  install -d /etc/systemd/network
  cat >/etc/systemd/network/80-skerry-dhcp.network <<'CONF'
[Match]
Type=ether

[Network]
DHCP=yes
IPv6AcceptRA=yes
LinkLocalAddressing=ipv6

[DHCPv4]
UseHostname=no
CONF
  systemctl enable systemd-networkd.service
  # Online once any one interface is configured: a second, private NIC that
  # gets no lease must not hold the agent back.
  install -d /etc/systemd/system/systemd-networkd-wait-online.service.d
  printf '[Service]\nExecStart=\nExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=60\n' \
    >/etc/systemd/system/systemd-networkd-wait-online.service.d/10-skerry-any.conf
  # Without dbus and logind, Debian's getty-static starts gettys on tty2-6
  # as well: tty1 and the serial console are enough.
  systemctl mask getty-static.service >/dev/null
  # No DNS and nothing to update in place (the image is rebuilt instead),
  # no LVM for e2scrub: timers that would only wake up to fail.
  systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
    e2scrub_reap.service >/dev/null
  echo skerry-edge >/etc/hostname
  printf '127.0.0.1\tlocalhost\n127.0.1.1\tskerry-edge\n::1\tlocalhost ip6-localhost ip6-loopback\n' >/etc/hosts
  # No password for anyone: the console shows the agent's logs, SSH (if on)
  # takes keys.
  passwd -l root >/dev/null
  # Journal in memory and small; the agent holds no state worth keeping.
  install -d /etc/systemd/journald.conf.d
  printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=32M\n' >/etc/systemd/journald.conf.d/skerry-edge.conf
  # Each machine makes its own identity on first boot.
  : >/etc/machine-id
  rm -f /var/lib/dbus/machine-id
  rm -f /etc/resolv.conf
  apt-get clean
  rm -rf /var/lib/apt/lists/*
else
  # The snapshot must not carry this build's identity or Packer's key: a
  # droplet made from it gets its own machine id, host keys and SSH keys.
  : >/etc/machine-id
  rm -f /var/lib/dbus/machine-id
  rm -f /root/.ssh/authorized_keys
  apt-get clean
  # Show what still listens on a non-loopback address (SSH goes at the
  # snapshot's first boot) and refuse to make an image with anything else.
  if command -v ss >/dev/null; then
    unexpected=$(ss -Hltunp | awk '
      { split($5, a, ":"); port = a[length(a)]; addr = substr($5, 1, length($5) - length(port) - 1) }
      addr ~ /^(127\.|\[::1\]|\[::ffff:127\.)/ { next }
      /"sshd"/ { next }
      $1 == "udp" && (port == 68 || port == 546) { next }
      { print }')
    if [ -n "$unexpected" ]; then
      printf '%s\n' "$unexpected" >&2
      die "something else listens on this machine (above): mask it in provision.sh"
    fi
  fi
  # What Packer uploaded (never a checkout this was run from).
  case $SKERRY_SRC in /tmp/?*) rm -rf "$SKERRY_SRC" ;; esac
fi
say "done: edge-agent.service enabled, target $SKERRY_TARGET"
