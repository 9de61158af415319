"""A throw-away VM running Debian's stock kernel, for tests that need ip6tnl, ppp or dummy.

The host root is shared read-only over 9p under a tmpfs overlay (the guest sees a writable copy
of this machine, gone at power-off); the project folder is shared read-write at the same path, so
the guest runs the project's own .venv. One command runs as root; its output streams to our
stdout and its exit status comes back through a run folder inside the project.

Usage: python -m tests.lab.vm [--systemd] [--timeout S] -- COMMAND...   (or --shell)
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import os
import re
import selectors
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
CACHE = PROJECT / ".lab-cache"
GUEST_INIT = Path(__file__).with_name("guest-init.sh")
BOOT_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay"]

EXIT_TIMEOUT = 124  # like timeout(1)
EXIT_VM_DIED = 125  # the VM ended without reporting a status

INITRAMFS_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod "/modules/$m" || echo "lab: insmod $m failed"; done
project=$(sed -n 's/.*mape.project=\([^ ]*\).*/\1/p' /proc/cmdline)
mkdir -p /ro /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /ro || exec sh
mount -t tmpfs -o mode=0755 tmpfs /rw && mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/ro,upperdir=/rw/upper,workdir=/rw/work /newroot || exec sh
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 project "/newroot$project" || exec sh
umount /proc /sys /dev
exec switch_root /newroot /bin/sh "$project/tests/lab/guest-init.sh"
"""


class LabError(RuntimeError):
    """The lab could not be built or started: a test that needs it must fail, never skip."""


@dataclass
class Result:
    status: int
    output: str
    seconds: float


def kernel_version() -> str:
    """The newest Debian kernel with its modules installed (package linux-image-amd64)."""
    versions = [
        Path(p).name.removeprefix("vmlinuz-")
        for p in glob.glob("/boot/vmlinuz-*")
        if Path("/lib/modules", Path(p).name.removeprefix("vmlinuz-")).is_dir()
    ]
    if not versions:
        raise LabError("no Debian kernel in /boot (install linux-image-amd64: `make test` does)")
    return sorted(versions, key=lambda v: [int(x) if x.isdigit() else x for x in re.split(r"[.-]", v)])[-1]


def _vmlinux(kver: str) -> Path:
    """The uncompressed kernel: booting it directly (PVH) saves the in-guest decompression."""
    out = CACHE / f"vmlinux-{kver}"
    if out.exists():
        return out
    data = Path(f"/boot/vmlinuz-{kver}").read_bytes()
    for magic, cmd in ((b"\xfd7zXZ\x00", ["xz", "-dc"]), (b"\x28\xb5\x2f\xfd", ["zstd", "-dc"])):
        at = data.find(magic)
        if at >= 0:
            # Trailing bytes after the stream make the tool complain; the output is complete.
            raw = subprocess.run(cmd, input=data[at:], capture_output=True).stdout
            if raw[:4] == b"\x7fELF":
                tmp = out.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")  # boots may start side by side
                tmp.write_bytes(raw)
                tmp.rename(out)
                return out
    return Path(f"/boot/vmlinuz-{kver}")  # qemu boots a bzImage too, a few seconds slower


def _initramfs(kver: str) -> Path:
    key = hashlib.sha256((kver + INITRAMFS_INIT).encode()).hexdigest()[:12]
    out = CACHE / f"initramfs-{kver}-{key}.cpio.gz"
    if out.exists():
        return out
    busybox = shutil.which("busybox")
    if not busybox:
        raise LabError("busybox not found (install busybox-static: `make test` does)")
    deps = subprocess.run(
        ["modprobe", "-S", kver, "-a", "--show-depends", *BOOT_MODULES], capture_output=True, text=True
    )
    modules = [line.split()[1] for line in deps.stdout.splitlines() if line.startswith("insmod ")]
    if deps.returncode or not modules:
        raise LabError(f"cannot resolve the boot modules of kernel {kver}: {deps.stderr.strip()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "proc", "sys", "dev", "modules"):
            (root / d).mkdir()
        shutil.copy(busybox, root / "bin/busybox")
        order = []
        for i, mod in enumerate(dict.fromkeys(modules)):
            name = f"{i:02d}-{Path(mod).name.split('.ko')[0]}.ko"
            raw = Path(mod).read_bytes()
            if mod.endswith(".xz"):
                raw = subprocess.run(["xz", "-dc"], input=raw, capture_output=True, check=True).stdout
            elif mod.endswith(".zst"):
                raw = subprocess.run(["zstd", "-dc"], input=raw, capture_output=True, check=True).stdout
            (root / "modules" / name).write_bytes(raw)
            order.append(name)
        (root / "modules.order").write_text("\n".join(order) + "\n")
        (root / "init").write_text(INITRAMFS_INIT)
        (root / "init").chmod(0o755)
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True, check=True).stdout
        cpio = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files.encode(), capture_output=True, check=True
        ).stdout
    tmp_out = out.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
    tmp_out.write_bytes(gzip.compress(cpio, compresslevel=1))
    tmp_out.rename(out)
    return out


def qemu_command(run_dir: Path, memory: str = "2G", cpus: int = 2) -> list[str]:
    kver = kernel_version()
    CACHE.mkdir(exist_ok=True)
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        raise LabError("qemu-system-x86_64 not found (install qemu-system-x86: `make test` does)")
    append = f"console=ttyS0 quiet loglevel=1 panic=-1 mape.project={PROJECT} mape.run={run_dir}"
    # /dev/kvm here only runs special guests, so TCG; -nodefaults keeps ROMs and devices out.
    return [
        qemu,
        "-accel", "tcg", "-M", "pc", "-m", memory, "-smp", str(cpus),
        "-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio",
        "-kernel", str(_vmlinux(kver)), "-initrd", str(_initramfs(kver)), "-append", append,
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={PROJECT},mount_tag=project,security_model=none,multidevs=remap",
    ]  # fmt: skip


def run(
    command: list[str] | str,
    *,
    systemd: bool = False,
    timeout: float = 900,
    echo=None,
    env: dict[str, str] | None = None,
    cpus: int = 2,
) -> Result:
    """Boot, run `command` as root in the project folder, power off. Never raises on a bad run:
    the status says what happened (EXIT_TIMEOUT, EXIT_VM_DIED, or the command's own)."""
    CACHE.mkdir(exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE))
    script = command if isinstance(command, str) else shlex.join(command)
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in (env or {}).items())
    (run_dir / "cmd.sh").write_text(f"cd {shlex.quote(str(PROJECT))}\n{exports}{script}\n")
    (run_dir / "mode").write_text("systemd" if systemd else "plain")
    started = time.monotonic()
    lines: list[str] = []
    proc = subprocess.Popen(
        qemu_command(run_dir, cpus=cpus),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    timed_out = False
    try:
        deadline = started + timeout
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            if not sel.select(timeout=min(left, 1.0)):
                continue
            # Whatever is there, not a whole line: pytest's progress dots end no line, and a
            # blocking readline would sleep through the deadline.
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            text = chunk.decode(errors="replace").replace("\r", "")
            lines.append(text)
            if echo:
                echo(text)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    status_file = run_dir / "status"
    if timed_out:
        status = EXIT_TIMEOUT
        lines.append(f"lab: timed out after {timeout:.0f} s\n")
    elif status_file.exists() and status_file.read_text().strip().isdigit():
        status = int(status_file.read_text())
    else:
        status = EXIT_VM_DIED
        lines.append(f"lab: the VM ended without a status (qemu exit {proc.returncode})\n")
    shutil.rmtree(run_dir, ignore_errors=True)
    return Result(status, "".join(lines), time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.lab.vm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--systemd", action="store_true", help="boot systemd as PID 1, run the command as a unit")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--shell", action="store_true", help="an interactive shell on the serial console")
    ap.add_argument("command", nargs="*")
    args = ap.parse_args(argv)
    if args.shell:
        os.execvp("qemu-system-x86_64", _shell_command())
    if not args.command:
        ap.error("give a COMMAND (after --) or --shell")
    try:
        result = run(args.command, systemd=args.systemd, timeout=args.timeout, echo=sys.stdout.write)
    except LabError as e:
        print(f"lab: {e}", file=sys.stderr)
        return EXIT_VM_DIED
    print(f"lab: exit {result.status} after {result.seconds:.1f} s", file=sys.stderr)
    return result.status


def _shell_command() -> list[str]:
    CACHE.mkdir(exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="shell-", dir=CACHE))
    (run_dir / "mode").write_text("shell")
    return qemu_command(run_dir)


if __name__ == "__main__":
    sys.exit(main())
