"""SBI v2.0 implemented by the VMM: the guest kernel's hypercall interface.

With ``--bios popek`` (the default) no guest code runs in M-mode. The kernel starts in S-mode
with every delegable trap delegated to it; its ``ecall``s (environment calls from
S-mode, the only traps left for M-mode) land here, in Python, and return to the
next instruction. Extensions: base, TIME, IPI, RFENCE, HSM, SRST, DBCN and the
legacy (v0.1) calls Linux may still use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

from popek.cpu.causes import IRQ_S_SOFT, IRQ_S_TIMER, Trap
from popek.cpu.csr import (
    ENVCFG_CBCFE,
    ENVCFG_CBIE,
    ENVCFG_CBZE,
    ENVCFG_PBMTE,
    ENVCFG_STCE,
    MENVCFG,
    STIMECMP,
)
from popek.cpu.state import PRIV_S
from popek.devices.device import check_version

SPEC_VERSION = (2 << 24) | 0  # SBI 2.0
IMPL_ID = 0x706F  # "po": not an ID assigned by the SBI spec; identifies popek
IMPL_VERSION = 1

A0, A1, A2, A3, A4, A5, A6, A7 = 10, 11, 12, 13, 14, 15, 16, 17
M64 = (1 << 64) - 1


class SbiError(IntEnum):
    SUCCESS = 0
    FAILED = -1
    NOT_SUPPORTED = -2
    INVALID_PARAM = -3
    DENIED = -4
    INVALID_ADDRESS = -5
    ALREADY_AVAILABLE = -6
    ALREADY_STARTED = -7
    ALREADY_STOPPED = -8


class Ext(IntEnum):
    LEGACY_SET_TIMER = 0x00
    LEGACY_PUTCHAR = 0x01
    LEGACY_GETCHAR = 0x02
    LEGACY_CLEAR_IPI = 0x03
    LEGACY_SEND_IPI = 0x04
    LEGACY_REMOTE_FENCE_I = 0x05
    LEGACY_REMOTE_SFENCE_VMA = 0x06
    LEGACY_REMOTE_SFENCE_VMA_ASID = 0x07
    LEGACY_SHUTDOWN = 0x08
    BASE = 0x10
    TIME = 0x54494D45
    IPI = 0x735049
    RFENCE = 0x52464E43
    HSM = 0x48534D
    SRST = 0x53525354
    DBCN = 0x4442434E


class HartStatus(IntEnum):
    STARTED = 0
    STOPPED = 1
    START_PENDING = 2
    STOP_PENDING = 3
    SUSPENDED = 4


_HART_STATUSES = frozenset(HartStatus)

# Traps the firmware hands to the S-mode kernel (as OpenSBI does, plus illegal
# instruction and access faults, which only the kernel can handle).
MEDELEG = sum(1 << c for c in (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 13, 15))
MIDELEG = (1 << 1) | (1 << 5) | (1 << 9)


class MachineControl(Protocol):
    """What the firmware needs from the machine (implemented by the board)."""

    harts: list

    def console_write(self, data: bytes) -> None: ...

    def console_read(self, limit: int) -> bytes: ...

    def request_shutdown(self, kind: str, code: int) -> None: ...


@dataclass
class FirmwareState:
    """Per-hart firmware state: HSM status and the S-mode timer deadline."""

    status: list[int] = field(default_factory=list)
    timer_deadline: list[int | None] = field(default_factory=list)

    def save(self) -> dict:
        return {"version": 1, "status": list(self.status), "timer": list(self.timer_deadline)}

    def load(self, state: dict) -> None:
        """Raises ValueError unless ``state`` is what :meth:`save` writes for as many harts."""
        check_version(state, 1)
        status, timer, n = state.get("status"), state.get("timer"), len(self.status)
        if not (type(status) is list and len(status) == n
                and all(type(s) is int and s in _HART_STATUSES for s in status)):
            raise ValueError(f"saved firmware hart status {status!r:.40} is not {n} statuses")
        if not (type(timer) is list and len(timer) == n
                and all(t is None or type(t) is int and 0 <= t < 1 << 64 for t in timer)):
            raise ValueError(f"saved firmware timers {timer!r:.40} are not {n} deadlines")
        self.status = status
        self.timer_deadline = timer


class Sbi:
    """The SBI implementation, shared by all harts of one machine."""

    def __init__(self, machine: MachineControl) -> None:
        self.machine = machine
        n = len(machine.harts)
        self.state = FirmwareState([HartStatus.STOPPED] * n, [None] * n)
        self.calls = 0

    # -- boot ---------------------------------------------------------------------------
    def boot_hart(self, hart, entry: int, a1: int) -> None:
        """Enter the kernel in S-mode, as firmware would after its own set-up."""
        hart.csr[0x302] = MEDELEG  # medeleg
        hart.csr[0x303] = MIDELEG  # mideleg
        hart.csr[0x306] = 0xFFFF_FFFF  # mcounteren: let S-mode read the counters
        # scounteren too, as OpenSBI's hart set-up does: Linux without a PMU driver never
        # writes it, yet its vDSO reads the time CSR in U-mode (clock_gettime).
        hart.csr[0x106] = 0xFFFF_FFFF
        # menvcfg as OpenSBI sets it for a hart with Zicbom, Zicboz, Svpbmt and Sstc: S-mode
        # may use the cache-block operations and page memory types, and programs its timer
        # itself through stimecmp (Linux then makes no set_timer call).
        hart.csr[MENVCFG] = (ENVCFG_CBIE | ENVCFG_CBCFE | ENVCFG_CBZE | ENVCFG_PBMTE
                             | ENVCFG_STCE)
        hart.priv = PRIV_S
        hart.mmu.flush()
        hart.x[A0] = hart.hartid
        hart.x[A1] = a1
        hart.pc = entry
        hart.ctl[2] = 0  # not waiting
        self.state.status[hart.hartid] = HartStatus.STARTED

    # -- timers -------------------------------------------------------------------------
    def update_timers(self, now: int) -> None:
        """Raise STIP on harts whose SBI timer deadline has passed."""
        for hart, deadline in zip(self.machine.harts, self.state.timer_deadline, strict=True):
            if deadline is not None and now >= deadline:
                hart.set_interrupt(IRQ_S_TIMER, True)
                self.state.timer_deadline[hart.hartid] = None

    def next_deadline(self) -> int | None:
        pending = [d for d in self.state.timer_deadline if d is not None]
        return min(pending) if pending else None

    def _set_timer(self, hart, when: int) -> None:
        if hart.csr[MENVCFG] & ENVCFG_STCE:  # STIP follows stimecmp: set the timer there
            hart.csr[STIMECMP] = when & M64
            hart.csrs.update_stimecmp()
            return
        hart.set_interrupt(IRQ_S_TIMER, False)
        self.state.timer_deadline[hart.hartid] = when
        self.update_timers(hart.time())

    # -- dispatch -----------------------------------------------------------------------
    def handle_ecall(self, hart, pc: int) -> int:
        """Perform the SBI call in a7/a6 with arguments a0..a5; returns the next pc."""
        self.calls += 1
        x = hart.x
        ext, fid = x[A7], x[A6]
        args = [x[A0], x[A1], x[A2], x[A3], x[A4], x[A5]]
        if ext <= Ext.LEGACY_SHUTDOWN:
            x[A0] = self._legacy(hart, ext, args) & M64
        else:
            handler = self._extensions().get(ext)
            error, value = (SbiError.NOT_SUPPORTED, 0) if handler is None else handler(hart, fid,
                                                                                       args)
            x[A0] = int(error) & M64
            x[A1] = value & M64
        return pc + 4

    def _extensions(self) -> dict[int, Callable[[object, int, list[int]], tuple[int, int]]]:
        return {
            Ext.BASE: self._base,
            Ext.TIME: self._time,
            Ext.IPI: self._ipi,
            Ext.RFENCE: self._rfence,
            Ext.HSM: self._hsm,
            Ext.SRST: self._srst,
            Ext.DBCN: self._dbcn,
        }

    def _base(self, hart, fid: int, args: list[int]) -> tuple[int, int]:
        if fid == 0:
            return SbiError.SUCCESS, SPEC_VERSION
        if fid == 1:
            return SbiError.SUCCESS, IMPL_ID
        if fid == 2:
            return SbiError.SUCCESS, IMPL_VERSION
        if fid == 3:
            probed = args[0]
            known = probed in self._extensions() or probed <= Ext.LEGACY_SHUTDOWN
            return SbiError.SUCCESS, int(known)
        if fid in (4, 5, 6):  # mvendorid, marchid, mimpid
            return SbiError.SUCCESS, hart.csr[(0xF11, 0xF12, 0xF13)[fid - 4]]
        return SbiError.NOT_SUPPORTED, 0

    def _time(self, hart, fid: int, args: list[int]) -> tuple[int, int]:
        if fid != 0:
            return SbiError.NOT_SUPPORTED, 0
        self._set_timer(hart, args[0])
        return SbiError.SUCCESS, 0

    def _selected_harts(self, mask: int, base: int) -> list | None:
        """Harts named by an SBI hart mask; None if it names a hart that doesn't exist."""
        harts = self.machine.harts
        if base == M64:
            return list(harts)
        chosen = []
        for bit in range(64):
            if mask >> bit & 1:
                hid = base + bit
                if hid >= len(harts):
                    return None
                chosen.append(harts[hid])
        return chosen

    def _ipi(self, hart, fid: int, args: list[int]) -> tuple[int, int]:
        if fid != 0:
            return SbiError.NOT_SUPPORTED, 0
        targets = self._selected_harts(args[0], args[1])
        if targets is None:
            return SbiError.INVALID_PARAM, 0
        for target in targets:
            target.set_interrupt(IRQ_S_SOFT, True)
        return SbiError.SUCCESS, 0

    def _rfence(self, hart, fid: int, args: list[int]) -> tuple[int, int]:
        if fid > 6:
            return SbiError.NOT_SUPPORTED, 0
        targets = self._selected_harts(args[0], args[1])
        if targets is None:
            return SbiError.INVALID_PARAM, 0
        for target in targets:
            if fid == 0:
                target.fence_i()
            else:
                target.mmu.flush()
        return SbiError.SUCCESS, 0

    def _hsm(self, hart, fid: int, args: list[int]) -> tuple[int, int]:
        harts = self.machine.harts
        status = self.state.status
        if fid == 0:  # hart_start(hartid, start_addr, opaque)
            hid = args[0]
            if hid >= len(harts):
                return SbiError.INVALID_PARAM, 0
            if status[hid] != HartStatus.STOPPED:
                return SbiError.ALREADY_AVAILABLE, 0
            self.boot_hart(harts[hid], args[1], args[2])
            return SbiError.SUCCESS, 0
        if fid == 1:  # hart_stop
            status[hart.hartid] = HartStatus.STOPPED
            return SbiError.SUCCESS, 0
        if fid == 2:  # hart_get_status
            hid = args[0]
            if hid >= len(harts):
                return SbiError.INVALID_PARAM, 0
            return SbiError.SUCCESS, status[hid]
        if fid == 3:  # hart_suspend: only the retentive default suspend, which is a WFI
            if args[0] != 0:
                return SbiError.NOT_SUPPORTED, 0
            hart.ctl[2] = 1
            return SbiError.SUCCESS, 0
        return SbiError.NOT_SUPPORTED, 0

    def _srst(self, hart, fid: int, args: list[int]) -> tuple[int, int]:
        if fid != 0:
            return SbiError.NOT_SUPPORTED, 0
        reset_type, reason = args[0], args[1]
        if reset_type == 0:
            self.machine.request_shutdown("poweroff", 0 if reason == 0 else 1)
        elif reset_type in (1, 2):
            self.machine.request_shutdown("reboot", 0)
        else:
            return SbiError.INVALID_PARAM, 0
        return SbiError.SUCCESS, 0

    def _dbcn(self, hart, fid: int, args: list[int]) -> tuple[int, int]:
        mem = hart.mem
        if fid == 0:  # console_write(num_bytes, base_lo, base_hi)
            try:
                data = mem.read(args[1] | (args[2] << 32), args[0])
            except Exception:
                return SbiError.INVALID_PARAM, 0
            self.machine.console_write(data)
            return SbiError.SUCCESS, len(data)
        if fid == 1:  # console_read(num_bytes, base_lo, base_hi)
            data = self.machine.console_read(args[0])
            try:
                mem.write(args[1] | (args[2] << 32), data)
            except Exception:
                return SbiError.INVALID_PARAM, 0
            return SbiError.SUCCESS, len(data)
        if fid == 2:  # console_write_byte
            self.machine.console_write(bytes([args[0] & 0xFF]))
            return SbiError.SUCCESS, 0
        return SbiError.NOT_SUPPORTED, 0

    def _legacy(self, hart, ext: int, args: list[int]) -> int:
        if ext == Ext.LEGACY_SET_TIMER:
            self._set_timer(hart, args[0])
            return 0
        if ext == Ext.LEGACY_PUTCHAR:
            self.machine.console_write(bytes([args[0] & 0xFF]))
            return 0
        if ext == Ext.LEGACY_GETCHAR:
            data = self.machine.console_read(1)
            return data[0] if data else -1
        if ext == Ext.LEGACY_CLEAR_IPI:
            hart.set_interrupt(IRQ_S_SOFT, False)
            return 0
        if ext == Ext.LEGACY_SHUTDOWN:
            self.machine.request_shutdown("poweroff", 0)
            return 0
        # The rest take a pointer (an S-mode virtual address) to a hart mask.
        try:
            mask = hart.mmu.load_slow(args[0], 8) if args[0] else M64
        except Trap:
            return SbiError.INVALID_ADDRESS
        targets = self._selected_harts(mask, 0) or []
        for target in targets:
            if ext == Ext.LEGACY_SEND_IPI:
                target.set_interrupt(IRQ_S_SOFT, True)
            elif ext == Ext.LEGACY_REMOTE_FENCE_I:
                target.fence_i()
            else:
                target.mmu.flush()
        return 0
