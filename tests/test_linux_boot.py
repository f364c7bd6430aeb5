"""Boot the bundled, unmodified Linux 6.1 on the virt board and use it.

The kernel, initramfs and disk were cross-built from Debian's source packages by
images/build.sh; nothing here knows it runs under popek rather than QEMU.

A boot costs tens of seconds of CPU, so the tests share boots: one ``popek run -c``
writes to a disk and reboots the guest, and after the reboot one command gathers
everything the tests below check (sections of its output, one ``name: value`` line
each); one interactive boot through OpenSBI is driven through a pipe. Each test
still asserts one behaviour of those runs.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from popek import images
from popek.cpu import extensions
from tests.linux_guest import BOOT_TIMEOUT, popek_run, scratch_disk

MARKER = "written-before-reboot-4711"
# Before the reboot: write the marker to the writable disk (init mounts /dev/vda on /mnt).
# After it: report, then exit with 7. /dev/vdb is the read-only disk; mounting it may
# only succeed read-only, and neither a file nor a raw write may reach it.
COMMAND = f"""
if [ ! -f /mnt/marker ]; then echo {MARKER} > /mnt/marker; sync; reboot -f; fi
echo "marker: $(cat /mnt/marker)"
echo "machine: $(uname -m)"
echo "isa: $(grep -m1 '^isa' /proc/cpuinfo | cut -d: -f2)"
echo "hwrng bytes: $(head -c 64 /dev/hwrng | wc -c)"
echo "rng: $(cat /sys/class/misc/hw_random/rng_current)"
echo "clock: $(date +%s)"
echo "ro flag: $(cat /sys/block/vdb/ro)"
mkdir /tmp/ro && mount -t ext4 /dev/vdb /tmp/ro 2>/dev/null
echo "ro mounted: $(ls /tmp/ro | wc -l) entries"
touch /tmp/ro/new 2>/dev/null && echo "ro file: written"
dd if=/dev/zero of=/dev/vdb bs=4096 count=1 conv=notrunc 2>/dev/null && echo "ro raw: written"
echo partial; exit 7
"""
KEYS = ["marker", "machine", "isa", "hwrng bytes", "rng", "clock", "ro flag", "ro mounted"]


@dataclass
class RebootedRun:
    """One ``popek run -c COMMAND`` across a guest reboot, and its disks afterwards."""

    result: subprocess.CompletedProcess[bytes]
    lines: list[str]
    report: dict[str, str]
    disk: Path
    ro_disk: Path
    ro_before: bytes


@pytest.mark.boots_linux
class TestOneCommandAcrossAGuestReboot:
    """One boot serves these tests (tests/conftest.py keeps them in one worker): the
    command writes to the disk and reboots the guest, then reports what they check."""

    @pytest.fixture(scope="class")
    @classmethod
    def run(cls, tmp_path_factory: pytest.TempPathFactory) -> RebootedRun:
        disk, ro_disk = (scratch_disk(tmp_path_factory.mktemp(name)) for name in ("rw", "ro"))
        ro_before = ro_disk.read_bytes()
        result = popek_run("--disk", str(disk), "--disk", f"{ro_disk},ro", "-c", COMMAND,
                           timeout=2 * BOOT_TIMEOUT)  # two boots
        lines = result.stdout.decode().splitlines()
        report = dict(line.split(": ", 1) for line in lines if ": " in line)
        return RebootedRun(result, lines, report, disk, ro_disk, ro_before)

    def test_bundled_guest_reports_riscv64_isa_and_entropy(self, run: RebootedRun) -> None:
        assert run.report.get("machine") == "riscv64", run.result.stderr.decode()
        assert run.report["isa"].strip().startswith("rv64imafdc")
        assert run.report["hwrng bytes"].strip() == "64"
        assert run.report["rng"].startswith("virtio_rng")
        # date reads the time CSR in user mode (the vDSO): the firmware must allow it
        assert run.report["clock"].isdigit()

    def test_only_the_command_output_and_its_exit_status_come_out(self, run: RebootedRun
                                                                  ) -> None:
        """stdout holds what the command printed (and the kernel's reboot line), no more."""
        assert run.result.returncode == 7, run.result.stderr.decode()
        assert [line.split(": ", 1)[0] for line in run.lines[1:-1]] == KEYS
        assert run.lines[-1] == "partial"

    def test_disk_writes_reach_the_image_and_survive_a_guest_reboot(self, run: RebootedRun
                                                                    ) -> None:
        # Before rebooting, the kernel says so on the console; the rebooted guest (a fresh
        # machine in the same popek, reopening the image) reads the marker back.
        assert run.lines[:1] == ["reboot: Restarting system"], run.result.stderr.decode()
        assert run.report["marker"] == MARKER
        assert MARKER.encode() in run.disk.read_bytes()  # the data reached the image file

    def test_read_only_disk_refuses_writes(self, run: RebootedRun) -> None:
        assert run.report.get("ro flag") == "1", run.result.stderr.decode()
        assert run.report["ro mounted"] != "0 entries"  # it mounted, read-only
        assert not any(line.endswith(": written") for line in run.lines)
        assert run.ro_disk.read_bytes() == run.ro_before


@pytest.mark.boots_linux
def test_console_driven_through_a_pipe_under_opensbi() -> None:
    """Debian's OpenSBI fw_jump runs in emulated M-mode and starts the QEMU-style kernel
    and initrd; without a terminal, stdin feeds the guest shell, output comes back on
    stdout, and the shell's poweroff goes through OpenSBI's system reset."""
    result = popek_run("--bios", "opensbi", "--kernel", str(images.KERNEL),
                       "--initrd", str(images.INITRD), "--append", "console=ttyS0 quiet",
                       stdin=b"echo piped-$((6*7)) on $(uname -m)\npoweroff -f\n")
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert "OpenSBI v" in out and "popek guest: Linux 6.1" in out
    assert "piped-42 on riscv64" in out


@pytest.mark.boots_linux
def test_two_harts_boot_with_the_smp_kernel_and_see_the_extensions() -> None:
    # Under every tier: guest time gives each hart at least 10 MIPS, so Linux's tick no
    # longer eats the slow tiers' harts (an RCU stall that took many minutes).
    # Both harts have the extensions the device tree names (Linux 6.1 lists those it
    # knows), and each programs its timer through stimecmp rather than SBI calls.
    result = popek_run("--kernel", str(images.KERNEL_SMP), "--initrd", str(images.INITRD),
                       "--cpus", "2", "-c", "grep -c ^processor /proc/cpuinfo; nproc; "
                       "grep ^isa /proc/cpuinfo; cat /proc/device-tree/cpus/cpu@1/riscv,isa; "
                       "echo; dmesg | grep -c 'S-mode is available via sstc'")
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert lines[:2] == ["2", "2"]
    known = "rv64imafdc_sstc_svpbmt_zicbom_zihintpause"
    assert [line.split(":", 1)[1].strip() for line in lines[2:4]] == [known, known]
    assert [lines[4].rstrip("\0"), *lines[5:]] == [extensions.ISA_STRING, "1"]  # ends in NUL


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kernel", "/nonexistent/Image"], "kernel not found"),
        (["--kernel", "/bin/true"], "not a 64-bit RISC-V ELF"),
        (["--mem", "1K"], "--mem"),
        (["--mem", "lots"], "not a memory size"),
        (["--disk", "/nonexistent/disk.img"], "disk image not found"),
        (["--cpus", "99"], "--cpus: 99 is impossible"),
    ],
)
def test_bad_input_gives_one_line_error_and_status_2(args: list[str], message: str) -> None:
    result = popek_run(*args, "-c", "true", timeout=60)
    assert result.returncode == 2
    err = result.stderr.decode()
    assert message in err and "Traceback" not in err, err


def test_truncated_kernel_is_refused(tmp_path: Path) -> None:
    truncated = tmp_path / "Image.xz"
    truncated.write_bytes(images.KERNEL.read_bytes()[:100_000])
    result = popek_run("--kernel", str(truncated), timeout=60)
    assert result.returncode == 2
    assert "corrupt or truncated" in result.stderr.decode()
