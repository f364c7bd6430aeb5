"""Boot the bundled, unmodified Linux 6.1 on the virt board and use it.

The kernel, initramfs and disk were cross-built from Debian's source packages by
images/build.sh; nothing here knows it runs under popek rather than QEMU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from popek import images
from tests.linux_guest import popek_run, scratch_disk


def test_bundled_guest_reports_riscv64_isa_and_entropy(tmp_path: Path) -> None:
    disk = scratch_disk(tmp_path)
    result = popek_run(
        "--disk", str(disk), "-c",
        "uname -m; grep -m1 '^isa' /proc/cpuinfo; head -c 64 /dev/hwrng | wc -c;"
        " cat /sys/class/misc/hw_random/rng_current",
    )
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "riscv64"
    assert lines[1].split(":")[1].strip().startswith("rv64imafdc")
    assert lines[2].strip() == "64"
    assert lines[3].startswith("virtio_rng")


def test_command_exit_status_becomes_popek_status(tmp_path: Path) -> None:
    result = popek_run("--disk", str(scratch_disk(tmp_path)), "-c", "echo partial; exit 7")
    assert result.stdout == b"partial\n"
    assert result.returncode == 7


def test_disk_writes_survive_guest_reboot_and_a_second_run(tmp_path: Path) -> None:
    disk = scratch_disk(tmp_path)
    marker = "written-before-reboot-4711"
    # First boot writes and reboots the guest; the second boot (same popek) reads it back.
    script = (f"if [ -f /mnt/marker ]; then cat /mnt/marker; "
              f"else echo {marker} > /mnt/marker; sync; reboot -f; fi")
    first = popek_run("--disk", str(disk), "-c", script)
    assert first.returncode == 0, first.stderr.decode()
    # Before rebooting, the kernel says so on the console, during the first run.
    assert first.stdout.decode().splitlines() == ["reboot: Restarting system", marker]
    assert marker.encode() in disk.read_bytes()  # the data reached the image file
    second = popek_run("--disk", str(disk), "-c", "cat /mnt/marker")
    assert second.stdout.decode().strip() == marker


def test_read_only_disk_refuses_writes(tmp_path: Path) -> None:
    disk = scratch_disk(tmp_path)
    before = disk.read_bytes()
    result = popek_run("--disk", f"{disk},ro", "-c",
                       "cat /sys/block/vda/ro; touch /mnt/new 2>/dev/null && echo wrote")
    assert result.stdout.decode().split() == ["1"]
    assert disk.read_bytes() == before


def test_console_driven_through_a_pipe(tmp_path: Path) -> None:
    """Without a terminal, stdin feeds the guest shell and output comes back on stdout."""
    result = popek_run("--disk", str(scratch_disk(tmp_path)),
                       stdin=b"echo piped-$((6*7))\npoweroff -f\n")
    assert result.returncode == 0, result.stderr.decode()
    assert b"piped-42" in result.stdout


def test_boots_qemu_style_kernel_and_initrd_through_opensbi() -> None:
    """Debian's OpenSBI fw_jump runs in emulated M-mode, then starts the kernel."""
    result = popek_run("--bios", "opensbi", "--kernel", str(images.KERNEL),
                       "--initrd", str(images.INITRD), "-c", "uname -m")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"riscv64\n"


def test_two_harts_boot_with_the_smp_kernel() -> None:
    # Two harts time-share one host thread, and this kernel is larger: allow more time.
    result = popek_run("--kernel", str(images.KERNEL_SMP), "--initrd", str(images.INITRD),
                       "--cpus", "2", "-c", "grep -c ^processor /proc/cpuinfo; nproc",
                       timeout=1500)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().split() == ["2", "2"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kernel", "/nonexistent/Image"], "kernel not found"),
        (["--kernel", "/bin/true"], "not a 64-bit RISC-V ELF"),
        (["--mem", "1K"], "--mem"),
        (["--mem", "lots"], "not a memory size"),
        (["--disk", "/nonexistent/disk.img"], "disk image not found"),
        (["--cpus", "99"], "--cpus 99"),
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
