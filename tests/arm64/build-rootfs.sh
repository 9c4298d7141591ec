#!/usr/bin/env bash
# Build (or refresh) an emulated Raspberry Pi: a Debian bookworm arm64 root file system run through
# qemu-user-static, with a virtual environment at /opt/nefl holding the edge client and aarch64 onnxruntime
# from PyPI. Usage: build-rootfs.sh ROOT WHEEL. Needs root, debootstrap and qemu-user-static (apt).
set -euo pipefail
root=$1
wheel=$2

[[ $(id -u) == 0 ]] || { echo "build-rootfs.sh: needs root (debootstrap, chroot, binfmt_misc)" >&2; exit 2; }
for tool in debootstrap qemu-aarch64-static chroot; do
    command -v "$tool" >/dev/null || { echo "build-rootfs.sh: $tool missing: apt-get install debootstrap qemu-user-static" >&2; exit 2; }
done

# Run aarch64 binaries transparently: binfmt_misc with qemu's handler, opened once (F flag) so it works in the chroot.
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
if [[ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]]; then
    cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
fi

if [[ ! -x $root/opt/nefl/bin/python ]]; then
    rm -rf "$root"
    mkdir -p "$(dirname "$root")"
    echo "debootstrap: Debian bookworm arm64 into $root (a few minutes under emulation)"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$root" http://deb.debian.org/debian >"$root.debootstrap.log" 2>&1 \
        || { echo "debootstrap failed; see $root.debootstrap.log" >&2; exit 1; }
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    # Trust the same extra CAs as the host (a TLS-inspecting proxy between this machine and PyPI, say).
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
        chroot "$root" update-ca-certificates >/dev/null
    fi
    chroot "$root" /usr/bin/python3 -m venv /opt/nefl
fi

# The device install, exactly as a Pi owner would do it: pip resolves the markers on aarch64 itself.
mkdir -p "$root/tmp/wheel"
rm -f "$root"/tmp/wheel/*.whl
cp "$wheel" "$root/tmp/wheel/"
inside=/tmp/wheel/$(basename "$wheel")
clean_env=(env -i PATH=/usr/bin:/bin HOME=/root PIP_DISABLE_PIP_VERSION_CHECK=1)
chroot "$root" "${clean_env[@]}" /opt/nefl/bin/pip install -q --force-reinstall --no-deps "$inside"
chroot "$root" "${clean_env[@]}" /opt/nefl/bin/pip install -q "$inside"
chroot "$root" "${clean_env[@]}" /opt/nefl/bin/python -c \
    "import platform, onnxruntime; print('emulated device ready:', platform.machine(), 'onnxruntime', onnxruntime.__version__)"
