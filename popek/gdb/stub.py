"""The protocol's commands over one debugger connection, for any target with harts.

The stub is all-stop, as QEMU's: when one hart stops (a breakpoint, a watched write, a
step, Ctrl-C) the whole target stops, and each hart is a thread (thread ``n + 1`` is
hart ``n``). Breakpoints (software and hardware alike) are the engines' own
(:meth:`popek.engine.engine.Engine.set_breakpoints`); watchpoints are write watches
on guest memory (:meth:`popek.cpu.physmem.PhysicalMemory.watch`), and read watches for
read and access watchpoints: the watched access raises a
:class:`~popek.cpu.causes.DebugStop` before it happens, and the stub then steps that
one instruction with the watches let through, so the debugger sees the hart stopped
after the access, as QEMU reports it. Only a hart's instructions trip them, not a
system call, firmware or a device writing guest memory. Addresses are virtual, translated through
the guest's page tables as the selected hart sees them (with A/D bits untouched), or
physical after ``Qqemu.PhyMemMode:1``.

Everything the debugger sends is untrusted: a malformed command gets an error reply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from popek.cpu.causes import DebugStop, Trap
from popek.cpu.physmem import PAGE_MASK, PAGE_SIZE, BusError
from popek.gdb import rsp
from popek.gdb.registers import CORE_REGISTERS, RegisterMap

if TYPE_CHECKING:
    from popek.cpu.hart import Hart
    from popek.cpu.physmem import PhysicalMemory

SIGINT, SIGTRAP = 2, 5
MAX_TRANSFER = (rsp.PACKET_SIZE - 16) // 2  # bytes of memory an 'm' reply carries in hex
E_INVALID, E_FAULT = b"E16", b"E0e"  # EINVAL, EFAULT as QEMU answers them
SUPPORTED = (b"PacketSize=%x;qXfer:features:read+;swbreak+;hwbreak+;QStartNoAckMode+;"
             b"vContSupported+" % rsp.PACKET_SIZE)
SOFTWARE, HARDWARE, WRITE_WATCH, READ_WATCH, ACCESS_WATCH = range(5)
# The stop reason each watchpoint kind reports, and which accesses trip it.
WATCH_REASONS = {WRITE_WATCH: "watch", READ_WATCH: "rwatch", ACCESS_WATCH: "awatch"}
TRIPPED_BY_WRITES = (WRITE_WATCH, ACCESS_WATCH)
TRIPPED_BY_READS = (READ_WATCH, ACCESS_WATCH)


class Exited(Exception):
    """The target ended while it ran: the debugger hears ``W`` (status) or ``X`` (signal)."""

    def __init__(self, status: int = 0, signal: int | None = None) -> None:
        super().__init__(status, signal)
        self.reply = b"X%02x" % signal if signal is not None else b"W%02x" % (status & 0xFF)


class DebugTarget(Protocol):
    """What the stub needs from a machine or a process."""

    attached: bool  # the debugger found it running (it detaches at the end), or made it

    @property
    def harts(self) -> list[Hart]: ...

    @property
    def mem(self) -> PhysicalMemory: ...

    def translate(self, hart: Hart, vaddr: int) -> int:
        """The physical address ``hart`` reads at ``vaddr``; raises Trap if unmapped."""

    def step(self, hart: Hart) -> None:
        """One instruction of ``hart`` alone; raises Exited if the target ends."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class Link(Protocol):
    """The debugger's connection (a socket, or a VMM channel carrying its bytes)."""

    def sendall(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class GdbStub:
    """One debugger's session with ``target``, over ``conn``; what the debugger sends
    comes in through :meth:`feed`, its hanging up through :meth:`detach`."""

    def __init__(self, target: DebugTarget, conn: Link) -> None:
        self.target = target
        self.conn = conn
        self.reader = rsp.PacketReader()
        self.acks = True
        self.last_sent = b""
        self.halted = True
        self.closed = False
        self.killed = False
        self.regs = RegisterMap.of(target.harts[0])
        self.g_thread = self.c_thread = 0  # hart indexes for registers/memory and running
        self.points: dict[int, set[int]] = {SOFTWARE: set(), HARDWARE: set()}
        # (kind, address, length) -> the host offset ranges it covers
        self.watches: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
        self.watched_pages: set[int] = set()  # write-watched: for every kind (a read
        # watchpoint must see AMOs, which read through the write TLB)
        self.read_watched_pages: set[int] = set()
        self.passing = False  # let watched writes through: the stub steps past one
        self.physical = False
        self.swbreak = self.hwbreak = False  # the debugger understands these stop reasons
        self.stop_reply = b"T%02xthread:1;" % SIGTRAP
        self.target.pause()

    # -- the connection -------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        for event in self.reader.feed(data):
            if self.closed:
                return
            if isinstance(event, rsp.Packet):
                if self.acks:
                    self._send_raw(b"+")
                self._command(event.payload)
            elif isinstance(event, rsp.Malformed):
                self._send_raw(b"-")
            elif isinstance(event, rsp.Nak):
                self._send_raw(self.last_sent)
            elif not self.halted:  # Ctrl-C
                self._halt(self.c_thread, b"T%02xthread:%x;" % (SIGINT, self.c_thread + 1))

    def _send_raw(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.conn.sendall(data)
        except OSError:  # the debugger is gone: its breakpoints must not hold the target
            self.detach()

    def send(self, payload: bytes) -> None:
        self.last_sent = rsp.frame(payload)
        self._send_raw(self.last_sent)

    def detach(self) -> None:
        """The debugger leaves: drop its breakpoints and watchpoints, let the target run."""
        for kind in self.points:
            self.points[kind].clear()
        self.apply_breakpoints()
        self.watches.clear()
        self._watch_pages()
        self.closed = True
        self.halted = False
        self.target.resume()
        try:
            self.conn.close()
        except OSError:
            pass

    def exited(self, reason: Exited) -> None:
        """The target ended: tell the debugger and hang up."""
        self.send(reason.reply)
        self.closed = True
        self.conn.close()

    # -- stops ----------------------------------------------------------------------------
    def after_run(self) -> None:
        """The target ran for a while: report a hart that stopped for the debugger."""
        for index, hart in enumerate(self.target.harts):
            stop = hart.engine.debug_stop
            if stop is None:
                continue
            hart.engine.debug_stop = None
            self.target.pause()
            try:
                self._report(index, stop)
            except Exited as end:
                self.exited(end)
            return

    def _report(self, index: int, stop: DebugStop) -> None:
        thread = b"thread:%x;" % (index + 1)
        if stop.reason in WATCH_REASONS.values():
            self._pass_watch(index)
            self._halt(index, b"T%02x%s:%x;%s" % (SIGTRAP, stop.reason.encode(), stop.addr,
                                                   thread))
        elif stop.addr in self.points[HARDWARE] and self.hwbreak:
            self._halt(index, b"T%02xhwbreak:;%s" % (SIGTRAP, thread))
        else:
            why = b"swbreak:;" if self.swbreak else b""
            self._halt(index, b"T%02x%s%s" % (SIGTRAP, why, thread))

    def _pass_watch(self, index: int) -> None:
        """Complete the instruction whose watched access stopped hart ``index``."""
        self.passing = True
        try:
            self.target.step(self.target.harts[index])
        finally:
            self.passing = False

    def _halt(self, index: int, reply: bytes) -> None:
        self.target.pause()
        self.halted = True
        self.g_thread = self.c_thread = index
        self.stop_reply = reply
        self.send(reply)

    def _resume(self, step: int | None) -> None:
        self.apply_breakpoints()
        if step is None:
            self.halted = False
            self.target.resume()
            return
        hart = self.target.harts[step]
        try:
            self.target.step(hart)
            stop, hart.engine.debug_stop = hart.engine.debug_stop, None
            if stop is not None:
                self._report(step, stop)
            else:
                self._halt(step, b"T%02xthread:%x;" % (SIGTRAP, step + 1))
        except Exited as end:
            self.exited(end)

    def apply_breakpoints(self) -> None:
        pcs = frozenset(self.points[SOFTWARE] | self.points[HARDWARE])
        for hart in self.target.harts:
            hart.engine.set_breakpoints(pcs)

    # -- watchpoints (guest memory's write watches, and read watches) ----------------------
    def page_written(self, page: int, offset: int, size: int) -> bool:
        if page not in self.watched_pages:
            return False
        self._check_access(page + offset, size, TRIPPED_BY_WRITES)
        return True

    def page_read(self, page: int, offset: int, size: int) -> None:
        self._check_access(page + offset, size, TRIPPED_BY_READS)

    def _check_access(self, start: int, size: int, kinds: tuple[int, ...]) -> None:
        """Stop the hart before an access to host offsets ``[start, start + size)`` that
        trips a watchpoint of ``kinds``."""
        if self.passing or not any(h.engine.executing for h in self.target.harts):
            return  # the stub's own step, a system call, firmware or DMA: no instruction
        end = start + size
        for (kind, addr, _), ranges in self.watches.items():
            if kind in kinds and any(lo < end and start < hi for lo, hi in ranges):
                raise DebugStop(WATCH_REASONS[kind], addr)

    def _watch_pages(self) -> None:
        def pages(kinds: tuple[int, ...]) -> set[int]:
            return {p for (kind, _, _), ranges in self.watches.items() if kind in kinds
                    for lo, hi in ranges for p in range(lo & ~PAGE_MASK, hi, PAGE_SIZE)}

        mem = self.target.mem
        written, read = pages(tuple(WATCH_REASONS)), pages(TRIPPED_BY_READS)
        for page in self.watched_pages - written:
            mem.unwatch(page, self)
        for page in written - self.watched_pages:
            mem.watch(page, self)
        for page in self.read_watched_pages - read:
            mem.watch_reads(page, None)
        for page in read - self.read_watched_pages:
            mem.watch_reads(page, self)
        self.watched_pages, self.read_watched_pages = written, read

    def _host_ranges(self, addr: int, length: int) -> list[tuple[int, int]]:
        ranges = []
        for pa, size in self._pieces(addr, length):
            off = self.target.mem.ram_offset(pa)
            if off is None or off + size > self.target.mem.size:
                raise BusError(pa)
            ranges.append((off, off + size))
        return ranges

    # -- memory ---------------------------------------------------------------------------
    def _pieces(self, addr: int, length: int) -> list[tuple[int, int]]:
        """The physical (address, size) pieces of ``length`` bytes at ``addr``."""
        hart = self.target.harts[self.g_thread]
        pieces = []
        while length > 0:
            size = min(length, PAGE_SIZE - (addr & PAGE_MASK))
            pa = addr if self.physical else self.target.translate(hart, addr)
            pieces.append((pa, size))
            addr, length = (addr + size) & ((1 << 64) - 1), length - size
        return pieces

    def _read_memory(self, addr: int, length: int) -> bytes:
        out = bytearray()
        try:
            for pa, size in self._pieces(addr, min(length, MAX_TRANSFER)):
                out += self.target.mem.read(pa, size)
        except (Trap, BusError):
            if not out:
                raise
        return bytes(out)

    def _write_memory(self, addr: int, data: bytes) -> None:
        pieces = self._pieces(addr, len(data))  # all of it mapped before any is written
        for pa, size in pieces:
            self.target.mem.read(pa, size)
        done = 0
        for pa, size in pieces:
            self.target.mem.write(pa, data[done:done + size])
            done += size

    # -- commands -------------------------------------------------------------------------
    def _command(self, payload: bytes) -> None:
        try:
            reply = self._dispatch(payload)
        except (Trap, BusError):
            reply = E_FAULT
        except (ValueError, IndexError, KeyError, OverflowError):
            reply = E_INVALID
        if reply is not None:
            self.send(reply)

    def _dispatch(self, payload: bytes) -> bytes | None:
        """The reply to one command (None: sent already, or none is due); the empty reply
        to what popek does not support, as the protocol asks."""
        for prefix, handler in self._table:
            if payload.startswith(prefix):
                return handler(self, payload[len(prefix):])
        return b""

    def _query_supported(self, args: bytes) -> bytes:
        self.swbreak = b"swbreak+" in args
        self.hwbreak = b"hwbreak+" in args
        return SUPPORTED

    def _no_ack(self, args: bytes) -> bytes:
        self.send(b"OK")
        self.acks = False
        return None

    def _features(self, args: bytes) -> bytes:
        annex, _, span = args.partition(b":")
        if annex != b"target.xml":
            return E_INVALID
        offset, length = (int(x, 16) for x in span.split(b","))
        xml = self.regs.target_xml()
        chunk = xml[offset:offset + min(length, MAX_TRANSFER)]
        return (b"m" if offset + len(chunk) < len(xml) else b"l") + rsp.escape(chunk)

    def _thread(self, tid: bytes) -> int | None:
        """Hart index of thread id ``tid`` (hex; -1 all, 0 any: None)."""
        value = int(tid, 16) if tid != b"-1" else -1
        if value <= 0:
            return None
        if value > len(self.target.harts):
            raise ValueError(tid)
        return value - 1

    def _set_thread(self, args: bytes) -> bytes:
        index = self._thread(args[1:])
        if args[:1] == b"g":
            self.g_thread = self.g_thread if index is None else index
        elif args[:1] == b"c":
            self.c_thread = self.c_thread if index is None else index
        else:
            return E_INVALID
        return b"OK"

    def _thread_alive(self, args: bytes) -> bytes:
        return b"OK" if self._thread(args) is not None else E_INVALID

    def _thread_list(self, args: bytes) -> bytes:
        return b"m" + b",".join(b"%x" % (i + 1) for i in range(len(self.target.harts)))

    def _thread_info(self, args: bytes) -> bytes:
        index = self._thread(args.lstrip(b","))
        return f"hart {0 if index is None else index}".encode().hex().encode()

    def _hart(self) -> Hart:
        return self.target.harts[self.g_thread]

    def _read_registers(self, args: bytes) -> bytes:
        return b"".join(self.regs.encode(self._hart(), n) for n in range(CORE_REGISTERS))

    def _write_registers(self, args: bytes) -> bytes:
        data = bytes.fromhex(args.decode())
        for num in range(min(CORE_REGISTERS, len(data) // 8)):
            self.regs.write(self._hart(), num, int.from_bytes(data[8 * num:8 * num + 8], "little"))
        return b"OK"

    def _read_register(self, args: bytes) -> bytes:
        num = int(args, 16)
        return self.regs.encode(self._hart(), num) if self.regs.exists(num) else E_INVALID

    def _write_register(self, args: bytes) -> bytes:
        num_text, _, value = args.partition(b"=")
        num = int(num_text, 16)
        data = bytes.fromhex(value.decode())
        if not self.regs.exists(num) or len(data) != self.regs.size(num):
            return E_INVALID
        self.regs.write(self._hart(), num, int.from_bytes(data, "little"))
        return b"OK"

    @staticmethod
    def _span(text: bytes) -> tuple[int, int]:
        addr, length = (int(x, 16) for x in text.split(b","))
        if addr >> 64 or length >> 64:
            raise ValueError(text)
        return addr, length

    def _read_mem(self, args: bytes) -> bytes:
        addr, length = self._span(args)
        return self._read_memory(addr, length).hex().encode()

    def _write_mem(self, args: bytes) -> bytes:
        span, _, data = args.partition(b":")
        addr, length = self._span(span)
        data = bytes.fromhex(data.decode())
        if len(data) != length:
            return E_INVALID
        self._write_memory(addr, data)
        return b"OK"

    def _write_binary(self, args: bytes) -> bytes:
        span, _, data = args.partition(b":")
        addr, length = self._span(span)
        data = rsp.unescape(data)
        if len(data) != length:
            return E_INVALID
        self._write_memory(addr, data)
        return b"OK"

    def _point(self, args: bytes, insert: bool) -> bytes:
        kind_text, addr_text, size_text = args.split(b",")[:3]
        kind, addr, size = int(kind_text), int(addr_text, 16), int(size_text.split(b";")[0], 16)
        if addr >> 64:
            return E_INVALID
        if kind in (SOFTWARE, HARDWARE):
            (self.points[kind].add if insert else self.points[kind].discard)(addr)
            return b"OK"
        if kind not in WATCH_REASONS:
            return b""
        if not 0 < size <= PAGE_SIZE:
            return E_INVALID
        if insert:
            self.watches[(kind, addr, size)] = self._host_ranges(addr, size)
        else:
            self.watches.pop((kind, addr, size), None)
        self._watch_pages()
        return b"OK"

    def _continue(self, args: bytes) -> None:
        if args:
            self.target.harts[self.c_thread].pc = int(args.split(b";")[0], 16)
        self._resume(None)

    def _step(self, args: bytes) -> None:
        if args:
            self.target.harts[self.c_thread].pc = int(args.split(b";")[0], 16)
        self._resume(self.c_thread)

    def _signal_continue(self, args: bytes) -> None:
        _, _, addr = args.partition(b";")
        self._continue(addr)

    def _signal_step(self, args: bytes) -> None:
        _, _, addr = args.partition(b";")
        self._step(addr)

    def _vcont(self, args: bytes) -> bytes | None:
        if args == b"?":
            return b"vCont;c;C;s;S"
        actions = [a.split(b":") for a in args.lstrip(b";").split(b";")]
        for action in actions:
            if action[0][:1] not in (b"c", b"C", b"s", b"S"):
                return E_INVALID
        for action in actions:
            if action[0][:1] in (b"s", b"S"):
                index = self._thread(action[1]) if len(action) > 1 else None
                self._resume(self.c_thread if index is None else index)
                return None
        self._resume(None)
        return None

    def _detach(self, args: bytes) -> None:
        self.send(b"OK")
        self.detach()

    def _kill(self, args: bytes) -> None:
        if args.startswith(b";"):  # vKill;pid answers before the end
            self.send(b"OK")
        self.killed = True
        self.closed = True
        self.conn.close()

    def _phys_mode(self, args: bytes) -> bytes:
        if args not in (b"0", b"1"):
            return E_INVALID
        self.physical = args == b"1"
        return b"OK"

    _table: tuple[tuple[bytes, Callable[[GdbStub, bytes], bytes | None]], ...] = (
        (b"qSupported", _query_supported),
        (b"QStartNoAckMode", _no_ack),
        (b"qXfer:features:read:", _features),
        (b"qfThreadInfo", _thread_list),
        (b"qsThreadInfo", lambda self, args: b"l"),
        (b"qThreadExtraInfo", _thread_info),
        (b"qC", lambda self, args: b"QC%x" % (self.c_thread + 1)),
        (b"qAttached", lambda self, args: b"1" if self.target.attached else b"0"),
        (b"qqemu.PhyMemMode", lambda self, args: b"1" if self.physical else b"0"),
        (b"Qqemu.PhyMemMode:", _phys_mode),
        (b"?", lambda self, args: self.stop_reply),
        (b"H", _set_thread),
        (b"T", _thread_alive),
        (b"g", _read_registers),
        (b"G", _write_registers),
        (b"p", _read_register),
        (b"P", _write_register),
        (b"m", _read_mem),
        (b"M", _write_mem),
        (b"X", _write_binary),
        (b"Z", lambda self, args: self._point(args, True)),
        (b"z", lambda self, args: self._point(args, False)),
        (b"vCont", _vcont),
        (b"vKill", _kill),
        (b"c", _continue),
        (b"s", _step),
        (b"C", _signal_continue),
        (b"S", _signal_step),
        (b"D", _detach),
        (b"k", _kill),
    )
