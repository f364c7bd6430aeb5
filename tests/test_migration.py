"""Live migration of a machine, both ends in this process over a socket pair.

The guest is QEMU's migration test idea (tests/vmm_guests.py's ``migrant``): it keeps
incrementing a byte in every page of 8 MiB and checks each holds the pass it expects.
After the handover the destination's memory must hold a consistent pattern (each hart's
pages a run of pass v+1 then a run of pass v, nothing else) and the guest must go on
without noticing. The VMM-level migration (two ``popek serve``) is in test_vmm_migrate.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from popek.cpu.physmem import PAGE_SIZE
from popek.engine.engine import TIERS
from popek.machine.config import DiskSpec, MachineConfig
from popek.machine.virt import VirtMachine
from popek.vmm import migration
from popek.vmm import migration_wire as wire
from popek.vmm.migration import Arrival, Emigration, MigrationError, immigrate
from popek.vmm.migration_postcopy import PagesLost, PostCopy
from tests.vmm_guests import guest

MEM = 32 << 20
AREA, PAGES = 0x8040_0000, 2048


def _run_until(machine: VirtMachine, out: bytearray, pattern: bytes) -> re.Match[bytes]:
    for _ in range(100_000):
        if match := re.search(pattern, out):
            return match
        machine.run_slice()
    raise AssertionError(f"guest never printed {pattern!r}; got {bytes(out[-200:])!r}")


def _migrant(engine: str = "translate", cpus: int = 1,
             passes: int = 16) -> tuple[VirtMachine, bytearray, bytearray]:
    """The migrant guest, run to its ``passes``-th pass; (the machine, its output, an
    empty buffer for the destination's)."""
    out = bytearray()
    source = VirtMachine(MachineConfig(kernel=guest("migrant"), mem=MEM, engine=engine,
                                       cpus=cpus), out.extend)
    _run_until(source, out, rb"pass %d\n" % passes)
    return source, out, bytearray()


def _passes(out: bytes) -> list[int]:
    return [int(n) for n in re.findall(rb"pass (\d+)\n", out)]


def _builder(config: MachineConfig, out: bytearray) -> Callable[..., VirtMachine]:
    return lambda memory: VirtMachine(config, out.extend, memory=memory, blank=True)


def migrate(source: VirtMachine, dest_out: bytearray, *, max_downtime: float = 0.05,
            tamper: Callable[[socket.socket], Any] | None = None,
            watch: Callable[[migration.Progress], None] = lambda progress: None,
            dest_config: MachineConfig | None = None, copy_disks: tuple[int, ...] = (),
            at_handover: Callable[[], None] = lambda: None, postcopy: bool = False,
            lost: list[PagesLost] | None = None, max_bandwidth: float | None = None,
            ) -> tuple[dict[str, Any] | MigrationError, Arrival | MigrationError, bool]:
    """Run ``source`` while it migrates; (the source's figures or error, the arrival or
    the destination's error, whether GO came). ``at_handover`` runs once the destination
    is READY, before it goes. In a post-copy the destination runs at once, installing
    the pages the source pushes as they come, until it has them all (or, ``lost``, until
    it cannot get one)."""
    ours, theirs = socket.socketpair()
    if tamper is not None:
        ours = tamper(ours)
    arrived: list[Arrival | MigrationError] = []
    went: list[bool] = []

    def destination() -> None:
        try:
            config = dest_config or source.config
            arrival = immigrate(theirs, config, _builder(config, dest_out))
        except MigrationError as err:
            arrived.append(err)
            return
        arrived.append(arrival)
        at_handover()
        went.append(arrival.wait_for_go())
        if went[0] and arrival.postcopy is not None:
            try:
                while not arrival.postcopy.done:
                    if select.select([arrival.conn.sock], [], [], 0)[0]:
                        arrival.postcopy.take_pushed()
                    else:
                        arrival.machine.run_slice()
            except PagesLost as err:
                assert lost is not None, err
                lost.append(err)
            arrival.conn.close()

    thread = threading.Thread(target=destination, daemon=True)  # a hang fails, not lingers
    thread.start()
    try:
        outcome: dict[str, Any] | MigrationError
        try:
            emigration = Emigration(source, ours, max_downtime, copy_disks, postcopy,
                                    max_bandwidth)
            try:
                while not emigration.pump():
                    watch(emigration.progress)
                    source.run_slice()
                outcome = emigration.finish(lambda: {"machine": source.save_state()})
            finally:
                emigration.close()
        except MigrationError as err:
            outcome = err
    finally:
        thread.join(60)
    assert not thread.is_alive(), "the destination did not finish within 60 s"
    return outcome, arrived[0], bool(went and went[0])


def _consistent(machine: VirtMachine, harts: int) -> None:
    """Each hart's pages: pass v+1 up to where it was, pass v after (mod 256)."""
    for hart in range(harts):
        values = [machine.mem.read(AREA + p * PAGE_SIZE, 1)[0] for p in range(hart, PAGES, harts)]
        low = values[-1]
        cut = next((i for i, v in enumerate(values) if v == low), len(values))
        assert values[cut:] == [low] * (len(values) - cut), f"hart {hart}: {values}"
        assert values[:cut] == [(low + 1) % 256] * cut, f"hart {hart}: {values}"


@pytest.mark.parametrize(("engine", "cpus"), [
    *((tier, 1) for tier in TIERS), ("translate", 2)])
def test_migrated_guest_keeps_every_increment_and_goes_on(engine: str, cpus: int) -> None:
    source, out, dest_out = _migrant(engine=engine, cpus=cpus, passes=32)
    # Both ends share this process (and its GIL): a budget the link here can meet.
    figures, arrival, went = migrate(source, dest_out, max_downtime=1.0)
    assert isinstance(figures, dict) and isinstance(arrival, Arrival), (figures, arrival)
    assert went
    # Only what the guest touched moved: its 8 MiB and its program, not the 32 MiB.
    assert PAGES * PAGE_SIZE <= figures["bytes_sent"] < 3 * PAGES * PAGE_SIZE + (4 << 20)
    _consistent(arrival.machine, cpus)
    assert arrival.machine.mem.ram[:] == source.mem.ram[:]
    _goes_on_without_a_gap(arrival.machine, out, dest_out)


def _goes_on_without_a_gap(dest: VirtMachine, out: bytearray, dest_out: bytearray) -> None:
    """The migrant carries on at the destination: its passes go on from the source's,
    none lost or repeated, and it finds every page as it left it."""
    last = _passes(bytes(out))[-1]
    _run_until(dest, dest_out, rb"pass %d\n" % (last + 48))
    assert b"MISMATCH" not in dest_out
    passes = _passes(bytes(out) + bytes(dest_out))
    assert passes == sorted(set(passes)) and passes[-1] - passes[0] == 16 * (len(passes) - 1)


class SlowSocket:
    """A link that drains ``rate`` bytes a second: each send waits its bytes' time."""

    def __init__(self, sock: socket.socket, rate: float) -> None:
        self.sock, self.rate = sock, rate

    def sendmsg(self, parts: list[Any]) -> int:
        time.sleep(sum(map(len, parts)) / self.rate)
        return self.sock.sendmsg(parts)

    def sendall(self, data: bytes) -> None:
        time.sleep(len(data) / self.rate)
        self.sock.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


@pytest.mark.parametrize("engine", TIERS)
def test_postcopy_guest_runs_there_at_once_and_pulls_its_pages(
        engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """--postcopy: after one pass the guest, which rewrites all its 8 MiB every pass, runs
    on the destination with the pages it wrote since absent; its first touch of each
    (any tier's TLB fill) fetches it from the source, which pushes the rest meanwhile.
    The link is capped at 32 MiB/s, so that the push (~0.25 s) cannot win the race
    against the destination's first touch however the host schedules the two threads."""
    source, out, dest_out = _migrant(engine=engine, passes=32)
    fetched: list[int] = []
    fetch = PostCopy.fetch
    monkeypatch.setattr(PostCopy, "fetch", lambda self, runs, ram: (
        fetched.append(sum(count for _, count in runs)), fetch(self, runs, ram))[1])
    figures, arrival, went = migrate(source, dest_out, postcopy=True, max_bandwidth=32 << 20)
    assert isinstance(figures, dict) and isinstance(arrival, Arrival) and went, figures
    assert figures["rounds"] == 0 and figures["postcopy_pages"] > PAGES // 2, figures
    assert "postcopy_error" not in figures
    assert fetched and arrival.machine.mem.absent_pages == 0
    _consistent(arrival.machine, 1)
    _goes_on_without_a_gap(arrival.machine, out, dest_out)


class CutAfterGo:
    """A link that fails right after the source's GO went through."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)
        if data[0] == wire.GO:
            self.sock.shutdown(socket.SHUT_RDWR)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def test_postcopy_link_lost_after_the_handover_fails_the_guest_once() -> None:
    """From GO on the guest is the destination's: a link lost then fails it there, with
    one line, when it touches a page it lacks; the source reports the loss and never
    runs the guest again (no second copy)."""
    source, out, dest_out = _migrant()
    lost: list[PagesLost] = []
    figures, arrival, went = migrate(source, dest_out, postcopy=True, lost=lost,
                                     tamper=CutAfterGo)
    assert isinstance(figures, dict) and went, figures  # committed all the same
    assert "postcopy_error" in figures
    assert len(lost) == 1 and "\n" not in str(lost[0])
    assert "the source cannot send pages the guest needs" in str(lost[0])


def test_a_guest_dirtying_faster_than_the_link_converges_throttled() -> None:
    """The guest rewrites its 8 MiB every ~15 ms: far beyond a 32 MiB/s link, so no round
    would ever be smaller than the last without auto-converge."""
    source, out, dest_out = _migrant()
    throttles: list[float] = []
    figures, arrival, went = migrate(source, dest_out, max_downtime=0.05,
                                     tamper=lambda sock: SlowSocket(sock, 32 << 20),
                                     watch=lambda progress: throttles.append(
                                         progress.throttle_percent))
    assert isinstance(arrival, Arrival) and went, (figures, arrival)
    assert isinstance(figures, dict)
    # The progress showed the guest throttled, by more than half of its time at the end
    assert max(throttles) > 50 and figures["throttle_percent"] > 50, (throttles, figures)
    # and the last pages went within the budget (plus this loaded host's scheduling).
    assert figures["downtime_ms"] < 250, figures
    _consistent(arrival.machine, 1)
    last = _passes(bytes(out))[-1]
    _run_until(arrival.machine, dest_out, rb"pass %d\n" % (last + 32))
    assert b"MISMATCH" not in dest_out


def test_copied_disk_arrives_whole_with_the_writes_made_meanwhile(tmp_path: Path) -> None:
    """--copy-disks: the guest rewrites every block of its disk's first MiB, pass after
    pass, while the migration copies the disk to a new image; at the handover the new
    image is the old one byte for byte, and the guest carries on, on it, finding each
    block as it left it (its own check: no MISMATCH)."""
    source_image, dest_image = tmp_path / "disk.img", tmp_path / "copy.img"
    source_image.write_bytes(b"".join(bytes([0, sector // 8 % 256]) + bytes(510)
                                      for sector in range(2048)) + bytes(3 << 20))
    dest_image.write_bytes(bytes(4 << 20))  # what the destination's VMM creates
    config = MachineConfig(kernel=guest("scribe"), mem=MEM, engine="translate",
                           disks=[DiskSpec(source_image)])
    out, dest_out = bytearray(), bytearray()
    source = VirtMachine(config, out.extend)
    _run_until(source, out, rb"disk pass 8\n")
    digests: list[tuple[str, str]] = []
    figures, arrival, went = migrate(
        source, dest_out, dest_config=dataclasses.replace(config, disks=[DiskSpec(dest_image)]),
        copy_disks=(0,), at_handover=lambda: digests.append(
            (_sha256(source_image), _sha256(dest_image))))
    assert isinstance(arrival, Arrival) and went, (figures, arrival)
    assert isinstance(figures, dict) and figures["bytes_sent"] > 1 << 20
    assert digests[0][0] == digests[0][1]  # nothing the guest wrote was lost
    last = int(re.findall(rb"disk pass (\d+)", out)[-1])
    _run_until(arrival.machine, dest_out, rb"disk pass %d\n" % (last + 8))
    assert b"MISMATCH" not in dest_out and b"IOERR" not in dest_out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class CorruptingSocket:
    """A socket that flips a bit in the checksum of the ``nth`` page frame it sends."""

    def __init__(self, sock: socket.socket, nth: int) -> None:
        self.sock = sock
        self.frames = nth

    def sendmsg(self, parts: list[Any]) -> int:
        if len(parts) == 2:  # a frame's header and its pages
            self.frames -= 1
            if self.frames == 0:
                head = bytearray(parts[0])
                head[8] ^= 1
                parts = [head, parts[1]]
        return self.sock.sendmsg(parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def test_corrupt_chunk_is_refused_and_the_source_can_go_on() -> None:
    source, out, dest_out = _migrant()
    figures, arrival, _ = migrate(source, dest_out,
                                  tamper=lambda sock: CorruptingSocket(sock, 3))
    assert isinstance(arrival, MigrationError) and "checksum" in str(arrival)
    assert isinstance(figures, MigrationError) and "PAGES frame fails its checksum" in str(figures)
    last = _passes(bytes(out))[-1]
    _run_until(source, out, rb"pass %d\n" % (last + 32))
    assert b"MISMATCH" not in out and dest_out == b""


def test_destination_gone_mid_migration_fails_cleanly() -> None:
    config = MachineConfig(kernel=guest("migrant"), mem=MEM, engine="translate")
    out = bytearray()
    source = VirtMachine(config, out.extend)
    _run_until(source, out, rb"pass 16\n")
    ours, theirs = socket.socketpair()
    emigration = Emigration(source, ours)  # the destination took nothing, and now dies
    theirs.close()
    with pytest.raises(MigrationError, match="lost the link"):
        while not emigration.pump():
            source.run_slice()
        emigration.finish(lambda: {"machine": source.save_state()})
    emigration.close()
    last = _passes(bytes(out))[-1]
    _run_until(source, out, rb"pass %d\n" % (last + 32))
    assert b"MISMATCH" not in out


# -- the wire format's reader ----------------------------------------------------------------------
def _stream() -> bytes:
    return (wire.preamble() + wire.encode_json(wire.HELLO, {"config": {}, "ram_bytes": 4096})
            + wire.header(wire.PAGES, bytes(PAGE_SIZE), first=3, count=1) + bytes(PAGE_SIZE)
            + wire.header(wire.ZERO, b"", first=4, count=2) + wire.encode(wire.END))


def test_reader_decodes_a_stream_it_wrote() -> None:
    frames = wire.decode_stream(_stream())
    assert [f.name for f in frames] == ["HELLO", "PAGES", "ZERO", "END"]
    assert frames[1].run() == (3, 1) and len(frames[1].pages()) == PAGE_SIZE
    assert frames[2].run() == (4, 2)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: d.__setitem__(slice(8, 12), (3).to_bytes(4, "little")),
     "format 3 is newer than this popek reads"),
    (lambda d: d.__setitem__(0, 0), "bad magic"),
    (lambda d: d.__setitem__(100, d[100] ^ 4), "fails its checksum"),
    (lambda d: d.__setitem__(wire.PREAMBLE_SIZE, 99), "unknown frame kind 99"),
    (lambda d: d.__delitem__(slice(-3, None)), "truncated"),
    (lambda d: d.__setitem__(slice(wire.PREAMBLE_SIZE + 4, wire.PREAMBLE_SIZE + 8),
                             (1 << 31).to_bytes(4, "little")), "more than the"),
])
def test_reader_refuses_damaged_streams(damage: Callable[[bytearray], None], message: str) -> None:
    data = bytearray(_stream())
    damage(data)
    with pytest.raises(wire.WireError, match=message):
        wire.decode_stream(bytes(data))


def test_reader_refuses_frames_of_the_wrong_shape() -> None:
    bad = [wire.encode(wire.HELLO, b"[1]"), wire.encode(wire.STATE, b"{"),
           wire.encode(wire.PAGES, (1).to_bytes(4, "little") + (2).to_bytes(4, "little")),
           wire.encode(wire.ZERO, bytes(8))]
    for frame in bad:
        with pytest.raises(wire.WireError):
            wire.decode_stream(wire.preamble() + frame)
