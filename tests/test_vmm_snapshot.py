"""Snapshot files: a guest saved mid-run carries on exactly; bad files change nothing."""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path

import pytest

from popek.machine.config import DiskSpec, MachineConfig, config_to_json
from popek.machine.virt import VirtMachine
from popek.vmm import snapshot
from popek.vmm.snapshot import SnapshotError
from tests.vmm_guests import guest

MEM = 32 << 20


def _machine(name: str, out: bytearray, **kw) -> VirtMachine:
    return VirtMachine(MachineConfig(kernel=guest(name), **{"mem": MEM, **kw}), out.extend)


def _run_until(machine: VirtMachine, out: bytearray, pattern: bytes) -> None:
    for _ in range(20_000):
        if re.search(pattern, out):
            return
        machine.run_slice()
    raise AssertionError(f"guest never printed {pattern!r}; got {bytes(out[-200:])!r}")


def _ticks(out: bytes) -> list[int]:
    return [int(n) for n in re.findall(rb"tick (\d+)\n", out)]


def test_restored_counter_carries_on_without_repeating_or_skipping(tmp_path: Path) -> None:
    out = bytearray()
    original = _machine("counter", out)
    _run_until(original, out, rb"tick 5\n")
    original.run_slice()  # stop somewhere inside a line, most likely
    path = tmp_path / "vm.snap"
    saved = snapshot.save(path, original)
    assert saved.ram_bytes >= 1 << 20  # the counter's table
    before = bytes(out)

    after = bytearray()
    restored = snapshot.load(path).machine(after.extend)
    _run_until(restored, after, rb"tick 12\n")
    ticks = _ticks(before + bytes(after))
    assert ticks == list(range(len(ticks)))
    assert ticks[-1] >= 12
    assert sum(h.instret for h in restored.harts) > sum(h.instret for h in original.harts)


@pytest.mark.parametrize("options", [
    {"cpus": 2},
    {"bios": "opensbi", "mem": 256 << 20},  # fw_jump puts the device tree at RAM + 128M
], ids=["two-harts", "opensbi"])
def test_restore_carries_on_with_more_harts_or_real_firmware(tmp_path: Path,
                                                             options: dict) -> None:
    out = bytearray()
    original = _machine("counter", out, **options)
    _run_until(original, out, rb"tick 2\n")
    path = snapshot.save(tmp_path / "vm.snap", original).path
    after = bytearray()
    _run_until(snapshot.load(path).machine(after.extend), after, rb"tick 6\n")
    ticks = _ticks(bytes(out) + bytes(after))
    assert ticks == list(range(len(ticks)))


def test_saved_state_round_trips_through_a_restore(tmp_path: Path) -> None:
    out = bytearray()
    original = _machine("counter", out)
    _run_until(original, out, rb"tick 2\n")
    snapshot.save(tmp_path / "a.snap", original)
    restored = snapshot.load(tmp_path / "a.snap").machine(bytearray().extend)
    a, b = original.save_state(), restored.save_state()
    for state in (a, b):
        del state["devices"]["clint"]["mtime"]  # the clock moved on while we compared
    assert a == b
    assert bytes(restored.mem.ram) == bytes(original.mem.ram)


def test_diff_snapshot_holds_the_pages_written_since_its_base(tmp_path: Path) -> None:
    out = bytearray()
    machine = _machine("counter", out)
    _run_until(machine, out, rb"tick 1\n")
    base = snapshot.save(tmp_path / "base.snap", machine)
    log = machine.mem.dirty_log()
    _run_until(machine, out, rb"tick 4\n")
    with snapshot.NewFile(tmp_path / "diff.snap") as fd:
        diff = snapshot.write(fd, tmp_path / "diff.snap", machine,
                              base=snapshot.Base(str(base.path), base.meta_crc),
                              written=log.take())
    assert 0 < diff.ram_bytes < base.ram_bytes // 16
    restored = snapshot.load(diff.path)
    assert bytes(restored.memory.ram) == bytes(machine.mem.ram)
    before, after = bytes(out), bytearray()
    _run_until(restored.machine(after.extend), after, rb"tick 8\n")
    ticks = _ticks(before + bytes(after))
    assert ticks == list(range(len(ticks)))
    snapshot.save(tmp_path / "base.snap", machine)  # the base replaced by another
    with pytest.raises(SnapshotError, match="not the snapshot it was taken after"):
        snapshot.load(diff.path)


def test_zero_pages_are_holes_in_the_file(tmp_path: Path) -> None:
    out = bytearray()
    machine = _machine("counter", out)
    _run_until(machine, out, rb"tick 0\n")
    saved = snapshot.save(tmp_path / "vm.snap", machine)
    st = os.stat(saved.path)
    assert st.st_size > MEM
    assert st.st_blocks * 512 < 4 << 20  # 32 MiB of RAM, about 1 MiB of it used


def test_clones_map_the_file_privately_and_diverge_without_touching_it(tmp_path: Path) -> None:
    out = bytearray()
    machine = _machine("counter", out)
    _run_until(machine, out, rb"tick 1\n")
    path = snapshot.save(tmp_path / "vm.snap", machine).path
    image = path.read_bytes()
    outs = [bytearray(), bytearray()]
    clones = [snapshot.load(path).machine(o.extend) for o in outs]
    clones[0].mem.write(0x8100_0000, b"only in clone 0")
    for clone, o in zip(clones, outs, strict=True):
        _run_until(clone, o, rb"tick 4\n")
    assert clones[1].mem.read(0x8100_0000, 15) == bytes(15)
    assert clones[0].mem.read(0x8100_0000, 15) == b"only in clone 0"
    assert path.read_bytes() == image
    maps = Path("/proc/self/maps").read_text().splitlines()
    private = [line for line in maps if line.endswith(str(path))]
    assert len(private) == 2 and all(line.split()[1] == "rw-p" for line in private)


@pytest.fixture
def good_snapshot(tmp_path: Path) -> Path:
    out = bytearray()
    machine = _machine("counter", out)
    _run_until(machine, out, rb"tick 0\n")
    return snapshot.save(tmp_path / "vm.snap", machine).path


def _damaged(path: Path, damage) -> Path:
    data = bytearray(path.read_bytes())
    damage(data)
    path.write_bytes(data)
    return path


def test_truncated_snapshot_is_refused(good_snapshot: Path) -> None:
    _damaged(good_snapshot, lambda d: d.__delitem__(slice(len(d) - 100, None)))
    with pytest.raises(SnapshotError, match="truncated"):
        snapshot.load(good_snapshot)


def test_corrupt_ram_page_is_refused(good_snapshot: Path) -> None:
    def flip(d: bytearray) -> None:
        d[snapshot.MEM_OFFSET + 0x20_0000 + 100] ^= 0xFF  # inside the loaded program
    _damaged(good_snapshot, flip)
    with pytest.raises(SnapshotError, match="RAM pages .* fail their checksum"):
        snapshot.load(good_snapshot)


def test_data_where_zero_pages_belong_is_refused(good_snapshot: Path) -> None:
    _damaged(good_snapshot, lambda d: d.__setitem__(snapshot.MEM_OFFSET + 100, 1))
    with pytest.raises(SnapshotError, match="where the snapshot holds zero pages"):
        snapshot.load(good_snapshot)


def test_corrupt_metadata_is_refused(good_snapshot: Path) -> None:
    _damaged(good_snapshot, lambda d: d.__setitem__(-5, d[-5] ^ 1))
    with pytest.raises(SnapshotError, match="metadata checksum"):
        snapshot.load(good_snapshot)


def test_newer_format_is_refused_with_advice(good_snapshot: Path) -> None:
    _damaged(good_snapshot, lambda d: d.__setitem__(slice(8, 12), (99).to_bytes(4, "little")))
    with pytest.raises(SnapshotError, match="format 99 is newer"):
        snapshot.load(good_snapshot)


def test_other_files_are_not_snapshots(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="not a popek snapshot"):
        snapshot.load(guest("hello"))
    with pytest.raises(SnapshotError, match="cannot open"):
        snapshot.load(tmp_path / "missing.snap")


def test_failed_save_leaves_no_file(tmp_path: Path) -> None:
    machine = _machine("hello", bytearray())
    with pytest.raises(SnapshotError, match="cannot write"):
        snapshot.save(tmp_path / "no-such-dir" / "vm.snap", machine)
    assert list(tmp_path.iterdir()) == []


def test_disks_are_flushed_recorded_and_reopened(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    out = bytearray()
    machine = _machine("counter", out, disks=[DiskSpec(disk)])
    _run_until(machine, out, rb"tick 0\n")
    path = snapshot.save(tmp_path / "vm.snap", machine).path
    restored = snapshot.load(path)
    assert restored.config.disks == [DiskSpec(disk)]
    restored.machine(bytearray().extend)
    disk.write_bytes(bytes(2 << 20))  # the image changed shape since the save
    with pytest.raises(SnapshotError, match="does not fit"):
        snapshot.load(path).machine(bytearray().extend)


def test_recorded_configuration_is_read_without_mapping_ram(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    machine = _machine("hello", bytearray(), disks=[DiskSpec(disk)])
    path = snapshot.save(tmp_path / "vm.snap", machine).path
    assert snapshot.read_config(path) == machine.config
    _damaged(path, lambda d: d.__setitem__(-5, d[-5] ^ 1))
    with pytest.raises(SnapshotError, match="metadata checksum"):
        snapshot.read_config(path)


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "vm.snap")
    for read in (snapshot.read_config, snapshot.load):
        with pytest.raises(SnapshotError, match="not a regular file"):
            read(tmp_path / "vm.snap")


def test_a_header_promising_huge_metadata_is_refused_before_reading_it(
        good_snapshot: Path) -> None:
    """A sparse file can be as large as its header says: 64 GiB of 'metadata' would be
    read into memory if only the file size were checked."""
    meta_len, ram = 64 << 30, 4096
    head = snapshot._HEAD.pack(snapshot.MAGIC, snapshot.FORMAT_VERSION, 0, meta_len, ram,
                               snapshot.MEM_OFFSET + ram + meta_len)
    with open(good_snapshot, "r+b") as file:
        file.write(head + snapshot._CRC.pack(zlib.crc32(head)))
        file.truncate(snapshot.MEM_OFFSET + ram + meta_len)
    for read in (snapshot.read_config, snapshot.load):
        with pytest.raises(SnapshotError, match="beyond what a snapshot can need"):
            read(good_snapshot)


def test_a_snapshot_from_before_the_agent_port_restores_without_one(tmp_path: Path) -> None:
    out = bytearray()
    original = _machine("counter", out, agent=False)
    _run_until(original, out, rb"tick 2\n")
    older = {k: v for k, v in config_to_json(original.config).items() if k != "agent"}
    snapshot.save(tmp_path / "old.snap", original, {"config": older})  # as popek wrote it
    after = bytearray()
    restored = snapshot.load(tmp_path / "old.snap").machine(after.extend)
    assert restored.agent_port is None and len(restored.virtio) == len(original.virtio)
    _run_until(restored, after, rb"tick 5\n")


def test_a_snapshot_from_before_bios_popek_restores_with_popeks_sbi(tmp_path: Path) -> None:
    """Snapshots written before configurations had a version said "bios": "none" for
    popek's SBI, which is "popek" now that "none" means no firmware, as on QEMU."""
    out = bytearray()
    original = _machine("counter", out)
    _run_until(original, out, rb"tick 2\n")
    older = {**config_to_json(original.config), "bios": "none"}
    snapshot.save(tmp_path / "old.snap", original, {"config": older, "config_version": 1})
    after = bytearray()
    restored = snapshot.load(tmp_path / "old.snap").machine(after.extend)
    assert restored.config.bios == "popek" and restored.sbi is not None
    _run_until(restored, after, rb"tick 5\n")
    ticks = _ticks(bytes(out) + bytes(after))
    assert ticks == list(range(len(ticks)))

    current = {**config_to_json(original.config), "bios": "none"}  # no firmware: not this one
    snapshot.save(tmp_path / "wrong.snap", original, {"config": current})
    with pytest.raises(SnapshotError, match="saved machine ran popek's SBI, this one has "
                                            "--bios none"):
        snapshot.load(tmp_path / "wrong.snap").machine(bytearray().extend)
