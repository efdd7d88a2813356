#!/usr/bin/env bash
# Builds skerry's edge as a bootable disk image from Debian's packages: the
# same edge that `packer build` bakes on DigitalOcean, made on this machine.
#
#   sudo images/build-local.sh [--edge-agent FILE] [--out FILE.raw|FILE.qcow2]
#                              [--cache DIR] [--size 2G] [--ssh-key FILE]
#
# The image: Debian 12 (minbase), the cloud kernel, systemd, DHCP on every
# Ethernet interface (systemd-networkd), GRUB on an MBR disk with one ext4
# partition, a serial console, and images/provision.sh run inside it. It
# boots under qemu (the edge-image test does that) and can be uploaded to
# DigitalOcean as a custom image (see docs/edge-image.md).
#
# Two layers are cached under --cache (default target/skerry-image-cache):
#   base-<hash>.tar   the Debian system (mmdebstrap), keyed by its package
#                     list and mirror; rebuilt when older than
#                     SKERRY_IMAGE_BASE_MAX_AGE_DAYS (default 7) to pick up
#                     security updates
#   edge-<hash>.raw   the disk image, keyed by the base and by everything of
#                     ours that goes in: this script, provision.sh, the unit,
#                     the sysctl files, the edge-agent binary, the options
# Only the layer whose inputs changed is rebuilt. The last line printed on
# standard output is the cached image's path (or --out's).
#
# Needs root (chroot, file ownership), mmdebstrap, sfdisk, mke2fs and network
# access to a Debian mirror (SKERRY_DEBIAN_MIRROR, default deb.debian.org);
# scripts/install-deps installs the tools.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)

edge_agent=$repo/target/x86_64-unknown-linux-musl/release/edge-agent
out=
cache=$repo/target/skerry-image-cache
size=2G
ssh_key=
mirror=${SKERRY_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security_mirror=${SKERRY_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
max_age_days=${SKERRY_IMAGE_BASE_MAX_AGE_DAYS:-7}

say() { printf 'build-local: %s\n' "$*" >&2; }
die() { printf 'build-local: error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2; exit "${1:-2}"; }

while (($#)); do
  case $1 in
    --edge-agent) edge_agent=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --cache) cache=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --ssh-key) ssh_key=$2; shift 2 ;;
    -h | --help) usage 0 ;;
    *) printf 'build-local: unknown argument %s\n' "$1" >&2; usage ;;
  esac
done

[[ $(id -u) -eq 0 ]] || die "run as root (sudo): the build uses chroot and keeps file ownership"
for tool in mmdebstrap sfdisk mke2fs tar chroot flock sha256sum; do
  command -v "$tool" >/dev/null || die "$tool is missing: run scripts/install-deps"
done
[[ -z $out || $out != *.qcow2 ]] || command -v qemu-img >/dev/null ||
  die "qemu-img is missing (for --out *.qcow2): run scripts/install-deps"
[[ -f $edge_agent ]] || die "no edge-agent at $edge_agent: build it with
  cargo build --release --target x86_64-unknown-linux-musl -p edge-agent"
[[ -z $ssh_key || -f $ssh_key ]] || die "--ssh-key $ssh_key: no such file"
size_bytes=$(numfmt --from=iec "$size") || die "--size $size: not a size (e.g. 2G)"
((size_bytes >= 1 << 30)) || die "--size $size: at least 1G"

mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
exec 9>"$cache/.lock"
flock 9 # one build at a time per cache

hash() { sha256sum | cut -c1-16; }

# --- layer 1: the Debian system -------------------------------------------
ssh=0
[[ -z $ssh_key ]] || ssh=1
packages=systemd,systemd-sysv,udev,kmod,e2fsprogs,linux-image-cloud-amd64,initramfs-tools,grub-pc-bin
((ssh == 0)) || packages+=,openssh-server
# shellcheck disable=SC2016 # the hook's $1 is expanded by mmdebstrap
base_args=(
  --variant=minbase
  --include="$packages"
  --aptopt='APT::Install-Recommends "false"'
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  # Before the kernel is installed: initramfs-tools reads the root file
  # system's type from fstab to put its fsck into the initramfs.
  --essential-hook='printf "LABEL=skerry-root\t/\text4\terrors=remount-ro\t0\t1\n" >"$1/etc/fstab"'
  bookworm
)
sources=(
  "deb $mirror bookworm main"
  "deb $mirror bookworm-updates main"
  "deb $security_mirror bookworm-security main"
)
base_key=$(printf '%s\n' base-v1 "${base_args[@]}" "${sources[@]}" | hash)
base=$cache/base-$base_key.tar
if [[ -f $base ]] && [[ -n $(find "$base" -mtime "+$max_age_days" -print) ]]; then
  say "base layer $base is older than $max_age_days days: rebuilding it for updates"
  rm -f "$base"
fi
if [[ -f $base ]]; then
  say "base layer: cached ($base)"
else
  say "base layer: mmdebstrap bookworm ($packages)"
  started=$SECONDS
  rm -f "$cache"/base-*.tar "$cache"/base-*.tar.tmp
  mmdebstrap --quiet "${base_args[@]}" "$base.tmp.tar" "${sources[@]}" >&2 ||
    die "mmdebstrap failed (is a Debian mirror reachable? SKERRY_DEBIAN_MIRROR=$mirror)"
  mv "$base.tmp.tar" "$base"
  say "base layer: built in $((SECONDS - started)) s"
fi

# --- layer 2: the edge on a bootable disk ---------------------------------
image_key=$(
  {
    echo "image-v1 $base_key $size_bytes $ssh"
    cat "$0" "$here/provision.sh" "$here/edge-agent.service" "$here"/sysctl.d/*.conf "$edge_agent"
    [[ -z $ssh_key ]] || cat "$ssh_key"
  } | hash
)
image=$cache/edge-$image_key.raw
if [[ -f $image ]]; then
  say "image layer: cached ($image)"
else
  say "image layer: provisioning and writing the disk"
  started=$SECONDS
  rm -f "$cache"/edge-*.raw "$cache"/edge-*.raw.tmp
  work=$(mktemp -d "$cache/work.XXXXXX")
  # Nothing is ever mounted under $work, so removing it is safe.
  trap 'rm -rf "$work"' EXIT
  root=$work/root
  mkdir "$root"
  tar -C "$root" --numeric-owner --xattrs --xattrs-include='*' -xpf "$base"

  # The same provisioning as on a droplet, in a chroot.
  src=$root/tmp/skerry-images
  mkdir -p "$src/sysctl.d"
  install -m 0755 "$edge_agent" "$src/edge-agent"
  install -m 0644 "$here/edge-agent.service" "$src/"
  install -m 0644 "$here"/sysctl.d/*.conf "$src/sysctl.d/"
  install -m 0755 "$here/provision.sh" "$src/"
  env_args=(SKERRY_SRC=/tmp/skerry-images SKERRY_TARGET=image "SKERRY_SSH=$ssh")
  if [[ -n $ssh_key ]]; then
    install -m 0600 "$ssh_key" "$src/authorized_keys"
    env_args+=(SKERRY_SSH_AUTHORIZED_KEYS=/tmp/skerry-images/authorized_keys)
  fi
  chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 \
    "${env_args[@]}" /bin/sh /tmp/skerry-images/provision.sh >&2
  rm -rf "$src"

  # The boot loader: GRUB for BIOS (DigitalOcean boots custom images with
  # BIOS). Its core image sits between the MBR and the partition and finds
  # its modules and grub.cfg in /boot/grub on the root file system.
  uuid=$(printf '%s' "$image_key$image_key" | sed -E 's/^(.{8})(.{4})(.{4})(.{4})(.{12}).*/\1-\2-\3-\4-\5/')
  mapfile -t kernels < <(cd "$root/boot" && ls vmlinuz-*)
  ((${#kernels[@]} == 1)) || die "expected one kernel in the image, found: ${kernels[*]}"
  kver=${kernels[0]#vmlinuz-}
  [[ -f $root/boot/initrd.img-$kver ]] || die "no initrd for kernel $kver"
  mkdir -p "$root/boot/grub/i386-pc"
  cp "$root"/usr/lib/grub/i386-pc/*.mod "$root"/usr/lib/grub/i386-pc/*.lst "$root/boot/grub/i386-pc/"
  chroot "$root" grub-mkimage --format=i386-pc --output=/boot/grub/i386-pc/core.img \
    --prefix='(hd0,msdos1)/boot/grub' biosdisk part_msdos ext2
  cp "$root/usr/lib/grub/i386-pc/boot.img" "$work/boot.img"
  mv "$root/boot/grub/i386-pc/core.img" "$work/core.img"
  cat >"$root/boot/grub/grub.cfg" <<EOF
# skerry edge: boots straight into the one kernel (written by build-local.sh).
set timeout=0
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
insmod part_msdos
insmod ext2
search --no-floppy --fs-uuid --set=root $uuid
linux /boot/vmlinuz-$kver root=UUID=$uuid ro console=tty0 console=ttyS0,115200n8
initrd /boot/initrd.img-$kver
boot
EOF
  printf 'UUID=%s\t/\text4\terrors=remount-ro\t0\t1\n' "$uuid" >"$root/etc/fstab"

  # The disk: MBR, one bootable Linux partition from 1 MiB to the end,
  # filled from the directory (no loop device, nothing mounted).
  disk=$image.tmp
  rm -f "$disk"
  truncate -s "$size_bytes" "$disk"
  printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk --quiet "$disk"
  fs_kib=$((size_bytes / 1024 - 1024))
  mke2fs -q -F -t ext4 -L skerry-root -U "$uuid" -d "$root" \
    -E offset=1048576,nodiscard "$disk" "${fs_kib}k"
  core_size=$(stat -c %s "$work/core.img")
  ((core_size <= 2047 * 512)) || die "GRUB's core image ($core_size bytes) does not fit before the partition"
  dd if="$work/boot.img" of="$disk" bs=440 count=1 conv=notrunc status=none
  dd if="$work/core.img" of="$disk" bs=512 seek=1 conv=notrunc status=none
  mv "$disk" "$image"
  rm -rf "$work"
  trap - EXIT
  say "image layer: built in $((SECONDS - started)) s ($(du -h "$image" | cut -f1) used of $size)"
fi

if [[ -n $out ]]; then
  case $out in
    *.qcow2) qemu-img convert -q -O qcow2 "$image" "$out" ;;
    *) cp --sparse=always "$image" "$out" ;;
  esac
  say "wrote $out"
  echo "$out"
else
  echo "$image"
fi
