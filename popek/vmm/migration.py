"""Live migration of one machine: pre-copy from the source, rebuild on the destination.

Both ends run in workers, on one connection (:mod:`popek.vmm.migration_wire`); the
VMMs only set it up and settle the outcome (:mod:`popek.vmm.migration_peers`). Copied
disks travel with the memory (:mod:`popek.vmm.migration_disks`); a post-copy's
destination fetches what it lacks through :mod:`popek.vmm.migration_postcopy`.

The source (:class:`Emigration`) is driven between the guest's slices, so the guest runs
on while its memory moves. It starts a dirty log (:meth:`PhysicalMemory.dirty_log`),
sends every non-zero page once (pages never touched and zero pages are not sent), then,
round after round, the pages the log names as written meanwhile. Once the pages left
would go in less than the downtime budget at the bandwidth measured so far, and another
round would not shrink them (a round that left more than an earlier one did gets
another try, a few times), the caller pauses the guest and
:meth:`Emigration.finish` sends the last dirty pages and the machine's state (the guest
clock with it: it stood still while the guest was paused, so the guest sees no jump).

Auto-converge, exact: the log counts every page the guest wrote in a round, and the
round's bytes sent are what the link drained meanwhile, so their ratio is the guest's
dirty rate over the link's drain rate, with no sampling. While that ratio is above
:data:`CONVERGE`, the guest's share shrinks in proportion (QEMU throttles its vCPUs by a
guessed step; popek knows by how much): each hart's slice gets that share of its
instruction budget (so one slice cannot dirty more than the link drains), and after each
slice the source sends, its sends waiting on the link, for as long as the share leaves
to it. A guest that dirties faster than the link drains is slowed until it does not, so
the migration always finishes; should even :data:`MIN_SHARE` not shrink the rounds, the
copy stops anyway and the downtime is what it is.

The destination (:func:`immigrate`) checks every frame before it uses it, builds the
machine (blank) as soon as the HELLO names it, so that building is not part of the
downtime, writes pages into its RAM while no one runs it, loads the state at the end and
only then says READY. The source answers GO, which commits it: from then on it never
runs the guest again. The destination runs the guest once GO has come; if the link fails
between READY and GO, neither end can know what the other did, so the destination keeps
the guest paused and the source's VMM, which knows, settles it over the API (resumes the
destination's copy if the source committed, deletes it otherwise). So there are never
two running copies, and a copy that can run always exists.
"""

from __future__ import annotations

import dataclasses
import json
import select
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from popek.cpu.physmem import PAGE_SHIFT, PAGE_SIZE, PhysicalMemory
from popek.devices.virtio.blk import LOG_BLOCK
from popek.machine.config import (
    ConfigError,
    MachineConfig,
    config_from_json,
    config_to_json,
)
from popek.machine.virt import RAM_BASE, SLICE, VirtMachine
from popek.vmm import migration_disks
from popek.vmm import migration_wire as wire
from popek.vmm.migration_disks import DiskCopy, MissingDisk
from popek.vmm.migration_postcopy import PostCopy, absent_from_source
from popek.vmm.migration_wire import Connection, WireError, os_reason
from popek.vmm.snapshot import nonzero_runs

DEFAULT_MAX_DOWNTIME = 0.05  # seconds the guest may stand still at the handover
LINK_TIMEOUT = 30.0  # seconds a send or receive may stall before the link counts as lost
HANDOVER_TIMEOUT = 60.0  # seconds the destination may take to build the machine
CHUNK = 1 << 20  # bytes sent between two slices of an unthrottled guest, at most
CONVERGE = 0.5  # a round may leave to the next this share of what it sent
MIN_SHARE = 0.01  # the least share of time a throttled guest keeps
SHORT_ENOUGH = 0.001  # seconds: a stop-and-copy this short is not worth another round
MAX_FITTING_ROUNDS = 8  # more rounds that fit the budget, hoping for a smaller rest
PACING_CREDIT = 0.1  # seconds of unused bandwidth cap that may be spent in a burst
_ZERO_FRAME = bytes(wire.MAX_PAGES_PER_FRAME * PAGE_SIZE)


class MigrationError(Exception):
    """The migration failed; the message says why, in one line."""


@dataclass
class Progress:
    """What ``GET /v1/vms/{vm}`` shows while a migration runs."""

    phase: str = "first pass"  # then "dirty rounds", "stop-and-copy", "done"
    round: int = 0
    bytes_sent: int = 0
    pages_sent: int = 0
    pages_left: int = 0  # in this round
    dirty_rate: float = 0.0  # bytes the guest dirtied per second, last round
    bandwidth: float = 0.0  # bytes per second the link took
    expected_downtime_ms: float | None = None
    throttle_percent: float = 0.0  # of the guest's time, taken by auto-converge
    disk_bytes_left: int = 0  # of the disks it copies, in this round

    def as_json(self) -> dict[str, Any]:
        return {key: round(value, 1) if isinstance(value, float) else value
                for key, value in asdict(self).items()}


class Emigration:
    """The source's side of one migration of ``machine`` over ``sock``, copying the
    disks ``copy_disks`` names (indexes into ``machine.disks``)."""

    def __init__(self, machine: VirtMachine, sock: socket.socket,
                 max_downtime: float = DEFAULT_MAX_DOWNTIME,
                 copy_disks: Sequence[int] = (), postcopy: bool = False,
                 max_bandwidth: float | None = None) -> None:
        self.machine = machine
        self.postcopy = postcopy
        self.max_bandwidth = max_bandwidth  # bytes a second the link may take, if capped
        self.max_downtime = max_downtime
        self.progress = Progress()
        self.started = time.monotonic()
        self.share = 1.0  # of time the guest runs; auto-converge lowers it
        self._send_seconds = 0.0
        self._round_started = self.started
        self._round_sent = 0  # conn.sent when the round began
        self._last_left = 0  # pages (disk blocks counted as pages) the last round left
        self._fitting_rounds = 0  # rounds whose rest fitted the budget
        self._smallest_fit = 1 << 62  # the least any of them left, in pages
        self._guest_ran_from = self.started  # when pump last returned
        self._paced_from = (self.started, 0)  # (time, conn.sent) the cap counts from
        sock.settimeout(LINK_TIMEOUT)
        self.conn = Connection(sock)
        self.log = machine.mem.dirty_log()  # before the first pass reads a page
        self.disks = [DiskCopy(index, machine.disks[index]) for index in copy_disks]
        machine.mem.make_present(0, machine.mem.size)  # a swapped-out guest's too
        self.pending: deque[tuple[int, int]] = deque(nonzero_runs(machine.mem))
        self.progress.pages_left = sum(count for _, count in self.pending)
        self.progress.disk_bytes_left = sum(copy.size for copy in self.disks)
        self._last_left = self.progress.pages_left + self.progress.disk_bytes_left // PAGE_SIZE
        try:
            self._guarded(self._hello)
        except MigrationError:
            self._close_logs()  # the caller closes the socket
            raise

    def _hello(self) -> None:
        self.conn.send_preamble()
        self.conn.send_json(wire.HELLO, {
            "config": config_to_json(self.machine.config), "ram_bytes": self.machine.mem.size,
            "disks": [{"index": copy.index, "bytes": copy.size} for copy in self.disks]})

    def _pending(self) -> bool:
        return bool(self.pending) or any(copy.pending for copy in self.disks)

    def pump(self) -> bool:
        """Send pages, for as long as the guest's share leaves to the migration since
        the guest last ran (unthrottled: up to a chunk, as fast as the link takes it);
        True once what is left is best sent with the guest paused: the caller then
        pauses it and calls :meth:`finish`."""
        if self._pending():
            now = time.monotonic()
            if self.share < 1.0:
                until = now + (now - self._guest_ran_from) * (1 - self.share) / self.share
                self._guarded(self._send_pages,
                              lambda sent: time.monotonic() < until and self._paced(True))
            else:
                self._guarded(self._send_pages,
                              lambda sent: sent < CHUNK and self._writable() and
                              self._paced(False))
            self._guest_ran_from = time.monotonic()
            return False
        return self.postcopy or self._next_round()  # post-copy: hand over after one pass

    def _next_round(self) -> bool:
        runs = self.log.take()
        now = time.monotonic()
        left = sum(count for _, count in runs)
        disk_left = sum(copy.take() for copy in self.disks) * LOG_BLOCK
        dirtied, drained = left * PAGE_SIZE + disk_left, max(self.conn.sent - self._round_sent, 1)
        progress = self.progress
        progress.round += 1
        progress.phase = "dirty rounds"
        progress.pages_left, progress.disk_bytes_left = left, disk_left
        progress.dirty_rate = dirtied / max(now - self._round_started, 1e-6)
        expected = dirtied / self._bandwidth()
        progress.expected_downtime_ms = 1000 * expected
        units = left + disk_left // PAGE_SIZE  # what is left, in pages
        shrinking, growing = 2 * units <= self._last_left, units >= self._last_left
        self._round_started, self._round_sent = now, self.conn.sent
        self._last_left = units
        self.pending.extend(runs)
        if expected <= self.max_downtime:  # fits: stop, unless another round may do better
            self._fitting_rounds += 1
            smallest, self._smallest_fit = self._smallest_fit, min(self._smallest_fit, units)
            return expected <= SHORT_ENOUGH or self._fitting_rounds > MAX_FITTING_ROUNDS or \
                (not shrinking and units <= smallest)
        if dirtied > CONVERGE * drained:  # the guest outruns the link: slow it down
            if self.share <= MIN_SHARE and not shrinking:
                return True  # even the least share does not converge: copy it now
            # A round no smaller than the last: the guest rewrote its whole working set,
            # so its true rate is higher still than the log's count: cut twice as hard.
            cut = CONVERGE * drained / dirtied * (CONVERGE if growing else 1.0)
            self._throttle(max(MIN_SHARE, self.share * cut))
        else:  # converging: give the guest back some time
            self._throttle(min(1.0, self.share * CONVERGE * drained / max(dirtied, 1)))
        self._guest_ran_from = time.monotonic()
        return False

    def _throttle(self, share: float) -> None:
        self.share = share
        self.machine.slice_instructions = max(1, int(SLICE * share))
        self.progress.throttle_percent = 100 * (1 - share)

    def finish(self, capture: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The guest was paused just now: send the last pages and the state ``capture``
        takes (``"machine"`` and the caller's extras), wait for the destination's READY
        and commit with GO. Returns the figures of the migration; MigrationError (the
        guest may run on here) if the handover did not happen. In a post-copy it returns
        once the destination has every page (or the link failed after the handover: the
        figures say so, and the guest is the destination's all the same)."""
        paused, paused_at = time.monotonic(), time.time()
        self.progress.phase = "stop-and-copy"
        state = capture()
        later = self.log.take() if self.postcopy else []  # the destination fetches these
        if later:
            state = {**state, "postcopy": later}
        else:
            self.pending.extend(self.log.take())
        for copy in self.disks:
            copy.take()
        self._guarded(self._send_pages, lambda sent: self._paced(True))
        self._guarded(self.conn.send_json, wire.STATE, state)
        self._guarded(self.conn.send, wire.END)
        self.conn.sock.settimeout(HANDOVER_TIMEOUT)
        reply = self._guarded(self.conn.receive)
        if reply.kind == wire.ERROR:
            raise MigrationError(f"the destination refused the guest: {_reason(reply)}")
        if reply.kind != wire.READY:
            raise MigrationError(f"the destination answered {reply.name}, not READY")
        self._guarded(self.conn.send, wire.GO)  # the commitment: the guest never runs here again
        went = time.monotonic()
        failed = None
        if later:
            try:  # committed: whatever happens now, the guest never runs here again
                self._guarded(self._serve_postcopy, later)
            except MigrationError as err:
                failed = str(err)
        done = time.monotonic()
        self.progress.phase = "done"
        self.progress.bytes_sent = self.conn.sent
        return {"downtime_ms": round(1000 * (went - paused), 1), "paused_at": paused_at,
                "total_seconds": round(done - self.started, 3),
                "bytes_sent": self.conn.sent, "pages_sent": self.progress.pages_sent,
                "rounds": self.progress.round, "ram_bytes": self.machine.mem.size,
                "throttle_percent": round(self.progress.throttle_percent, 1),
                "postcopy_pages": sum(count for _, count in later),
                "postcopy_seconds": round(done - went, 3),
                **({"postcopy_error": failed} if failed else {})}

    def _serve_postcopy(self, later: list[tuple[int, int]]) -> None:
        """The guest runs on the destination, which lacks the pages ``later`` names: send
        those it asks for at once, push the rest meanwhile, say DONE, and answer what it
        asked in the meantime until it hangs up. The guest's RAM here stands still."""
        self.progress.phase = "post-copy"
        self.conn.sock.settimeout(LINK_TIMEOUT)
        left = bytearray(self.machine.mem.size >> PAGE_SHIFT)
        for first, count in later:
            left[first:first + count] = b"\1" * count
        self.progress.pages_left = sum(count for _, count in later)
        cursor = 0
        while (cursor := left.find(b"\1", cursor)) >= 0:
            if select.select([self.conn.sock], [], [], 0)[0]:
                self._answer(self.conn.receive(), left)
                continue
            end = left.find(b"\0", cursor)
            end = len(left) if end < 0 else min(end, cursor + wire.MAX_PAGES_PER_FRAME)
            self._paced(True)
            self._send_later(cursor, end - cursor, left)
        self.conn.send(wire.DONE)
        while True:
            try:
                frame = self.conn.receive()
            except ConnectionResetError:
                return  # the destination has every page and hung up
            self._answer(frame, left)

    def _answer(self, frame: wire.Frame, left: bytearray) -> None:
        if frame.kind != wire.REQUEST:
            raise WireError(f"a {frame.name} frame during post-copy, not a REQUEST")
        for first, count in frame.runs():
            if first + count > len(left):
                raise WireError(f"a REQUEST for pages {first}+{count}, beyond RAM")
            self._send_later(first, count, left)

    def _send_later(self, first: int, count: int, left: bytearray) -> None:
        with memoryview(self.machine.mem.ram) as ram:
            self.conn.send_run(wire.PAGES, first, count,
                               ram[first << PAGE_SHIFT:(first + count) << PAGE_SHIFT])
        self.progress.pages_left -= left.count(1, first, first + count)
        left[first:first + count] = bytes(count)
        self.progress.pages_sent += count

    def close(self) -> None:
        self.machine.slice_instructions = SLICE  # should the guest run on here
        self._close_logs()
        self.conn.close()

    def _close_logs(self) -> None:
        self.log.close()
        for copy in self.disks:
            copy.close()

    # -- sending --------------------------------------------------------------------------------
    def _send_pages(self, more: Callable[[int], bool]) -> None:
        """Send pending runs, each page as it is now, then the disks' pending blocks, while
        ``more(bytes sent so far)``."""
        start = time.monotonic()
        sent = 0
        ram = memoryview(self.machine.mem.ram)
        try:
            while self.pending and more(sent):
                first, count = self.pending.popleft()
                take = min(count, wire.MAX_PAGES_PER_FRAME)
                if take < count:
                    self.pending.appendleft((first + take, count - take))
                data = ram[first << PAGE_SHIFT:(first + take) << PAGE_SHIFT]
                if data == _ZERO_FRAME[:len(data)]:
                    self.conn.send_run(wire.ZERO, first, take)
                else:
                    self.conn.send_run(wire.PAGES, first, take, data)
                    sent += len(data)
                data.release()
                self.progress.pages_sent += take
                self.progress.pages_left -= take
            for copy in self.disks:
                while copy.pending and more(sent):
                    done = copy.send_next(self.conn)
                    sent += done
                    self.progress.disk_bytes_left = max(0, self.progress.disk_bytes_left - done)
        finally:
            ram.release()
            self._send_seconds += time.monotonic() - start
            self.progress.bytes_sent = self.conn.sent
            self.progress.bandwidth = self._bandwidth()

    def _writable(self) -> bool:
        """Whether the socket takes more now: while the link is behind, the guest runs
        instead of waiting in a send (a frame already begun may still wait its turn)."""
        return bool(select.select([], [self.conn.sock], [], 0)[1])

    def _paced(self, wait: bool) -> bool:
        """Whether the bandwidth cap lets the next frame go now (``wait``: once it does,
        sleeping till then). At most :data:`PACING_CREDIT` seconds of unused link carry
        over, so an idle spell does not buy a burst."""
        if self.max_bandwidth is None:
            return True
        now = time.monotonic()
        since, sent = self._paced_from
        ahead = (self.conn.sent - sent) / self.max_bandwidth - (now - since)
        if ahead < -PACING_CREDIT:
            self._paced_from = (now - PACING_CREDIT, self.conn.sent)
        elif ahead > 0:
            if not wait:
                return False
            time.sleep(ahead)
        return True

    def _bandwidth(self) -> float:
        measured = max(self.conn.sent / max(self._send_seconds, 1e-6), 1.0)
        return min(measured, self.max_bandwidth or measured)

    def _guarded(self, action: Callable[..., Any], *args: Any) -> Any:
        """``action``; a failed link or a refusal becomes MigrationError, with the
        destination's own reason when it sent one before it closed."""
        try:
            return action(*args)
        except WireError as err:
            raise MigrationError(f"the destination sent garbage: {err}") from None
        except OSError as err:
            raise MigrationError(self._their_reason() or
                                 f"lost the link to the destination ({os_reason(err)})") \
                from None

    def _their_reason(self) -> str | None:
        try:
            self.conn.sock.settimeout(1.0)
            frame = self.conn.receive()
        except (OSError, WireError):
            return None
        return f"the destination refused the guest: {_reason(frame)}" \
            if frame.kind == wire.ERROR else None


# -- the destination -------------------------------------------------------------------------------
Builder = Callable[[PhysicalMemory], VirtMachine]  # the board on this RAM, blank (not booted)


@dataclass
class Arrival:
    """A machine that came in, its state loaded, READY said: it runs once
    :meth:`wait_for_go` says the source committed."""

    machine: VirtMachine
    state: dict[str, Any]  # the source's STATE: "machine" and the worker's extras
    conn: Connection
    postcopy: PostCopy | None  # the pages still at the source, if any

    def wait_for_go(self) -> bool:
        """Whether the source said GO; False if the link failed first (the source's VMM
        settles it). The caller does all it can before, so that the guest runs the
        moment GO comes. In a post-copy the connection then stays open for the pages
        (:class:`PostCopy`)."""
        try:
            self.conn.sock.settimeout(HANDOVER_TIMEOUT)
            go = self.conn.receive().kind == wire.GO
        except (OSError, WireError):
            go = False
        if not go or self.postcopy is None:
            self.conn.close()
        else:
            self.conn.sock.settimeout(LINK_TIMEOUT)
        return go


def immigrate(sock: socket.socket, config: MachineConfig, build: Builder) -> Arrival:
    """Take a guest from the source on ``sock``: RAM for ``config``, the machine ``build``
    makes on it (at once, while the pages come), filled from the stream and given the
    source's STATE (``"machine"``). MigrationError if the stream is refused (the source is
    told why), the machine cannot be built, or the link fails before READY."""
    sock.settimeout(LINK_TIMEOUT)
    conn = Connection(sock)
    try:
        machine, state = _receive(conn, config, build)
        postcopy = absent_from_source(conn, machine.mem, state.get("postcopy"))
        conn.send(wire.READY)
    except WireError as err:
        _tell(conn, str(err))
        raise MigrationError(f"refused the incoming guest: {err}") from None
    except OSError as err:
        conn.close()
        raise MigrationError(f"lost the link to the source ({os_reason(err)})") from None
    except MigrationError as err:
        _tell(conn, str(err))
        raise
    return Arrival(machine, state, conn, postcopy)


def _receive(conn: Connection, config: MachineConfig,
             build: Builder) -> tuple[VirtMachine, dict[str, Any]]:
    conn.receive_preamble()
    hello = conn.receive()
    if hello.kind != wire.HELLO:
        raise WireError(f"the stream begins with {hello.name}, not HELLO")
    copied = _check_hello(hello.json(), config)
    memory = PhysicalMemory(RAM_BASE, config.mem)
    try:
        machine = build(memory)
        # Loading the blank board's own state once warms what loading the source's will
        # run (type checks, lazily built tables) before the guest stands still for it.
        machine.load_state(json.loads(json.dumps(machine.save_state())))
    except (ConfigError, OSError) as err:
        raise MigrationError(f"the destination cannot build the machine: {err}") from None
    try:
        disks = migration_disks.copied_disks(machine, copied)
    except MissingDisk as err:
        raise MigrationError(str(err)) from None
    pages = config.mem >> PAGE_SHIFT
    state = None
    while True:
        frame = conn.receive()
        if frame.kind in (wire.PAGES, wire.ZERO):
            first, count = frame.run()
            if first + count > pages:
                raise WireError(f"pages {first}..{first + count - 1} lie outside the "
                                f"{pages} pages of RAM (corrupt stream)")
            if frame.kind == wire.PAGES:
                memory.write(RAM_BASE + (first << PAGE_SHIFT), frame.pages())
            else:
                memory.discard(first << PAGE_SHIFT, count << PAGE_SHIFT)
        elif frame.kind == wire.DISK:
            migration_disks.write(disks, frame)
        elif frame.kind == wire.STATE:
            state = frame.json()
        elif frame.kind == wire.END and state is not None:
            try:
                machine.load_state(state["machine"])
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                raise WireError(f"the machine state does not fit: {err}") from None
            migration_disks.sync(disks)
            return machine, state
        elif frame.kind == wire.ERROR:
            raise MigrationError(f"the source gave up: {_reason(frame)}")
        else:
            raise WireError(f"unexpected {frame.name} frame (corrupt stream)")


def _check_hello(hello: dict[str, Any], config: MachineConfig) -> dict[int, int]:
    """The disks the source copies (index: bytes), once its machine is the one
    ``config`` describes (but for the paths of the disks it copies)."""
    try:
        theirs = config_from_json(hello.get("config"))
    except ConfigError as err:
        raise WireError(f"the source's machine configuration is not valid: {err}") from None
    disks = hello.get("disks", [])
    if not isinstance(disks, list) or not all(
            isinstance(d, dict) and type(d.get("index")) is int and type(d.get("bytes")) is int
            for d in disks):
        raise WireError("the HELLO's disks are not a list of disk indexes and sizes")
    copied = {d["index"]: d["bytes"] for d in disks}
    if len(theirs.disks) == len(config.disks):  # a copied disk may live elsewhere here
        theirs = dataclasses.replace(theirs, disks=[
            dataclasses.replace(disk, path=ours.path) if index in copied else disk
            for index, (disk, ours) in enumerate(zip(theirs.disks, config.disks, strict=True))])
    if theirs != config or hello.get("ram_bytes") != config.mem:
        raise WireError("the source's machine is not the one the destination prepared")
    return copied


def _tell(conn: Connection, reason: str) -> None:
    try:
        conn.send_json(wire.ERROR, {"error": reason})
    except OSError:
        pass
    conn.close()


def _reason(frame: wire.Frame) -> str:
    return str(frame.json().get("error", "no reason given")) if frame.kind == wire.ERROR \
        else frame.name


