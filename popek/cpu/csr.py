"""The control and status registers of an RV64GC hart with M, S and U modes (priv. spec 1.12).

Every real CSR lives at its own number in ``hart.csr`` so that every tier (and a
snapshot) sees one flat buffer; views such as ``sstatus``, ``sie``, ``sip``, ``fflags``
and ``frm`` are derived from their base register on each access and never stored.
``mstatus.SD`` is derived too, because FP instructions dirty ``FS`` without going
through this module.

``mip`` is shared with the devices, which drive MSIP/MTIP/MEIP/SEIP through
``Hart.set_interrupt``; M-mode software may also write SSIP, STIP and SEIP there (OpenSBI
forwards timer and software interrupts that way). The software-written SEIP and the
external SEIP line share one bit, a simplification of the spec's "OR of the two" that
matters only to firmware injecting external interrupts while a PLIC drives the line.

CSR instructions are the slow path, so access goes through one dict from CSR number
to ``(check, read, write)``: ``check`` raises for access rules beyond the number's
privilege and read-only bits, ``write`` is ``None`` where writes are silently ignored
(WARL fields hardwired to their only legal value).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from popek.cpu import pmp
from popek.cpu.causes import ILLEGAL_INSN, IRQ_S_TIMER, Trap
from popek.cpu.state import CTL_INSTRET, CTL_PRIV, PRIV_M, PRIV_S, PRIV_U, XLEN_MASK

if TYPE_CHECKING:
    from popek.cpu.hart import Hart

# --- CSR numbers --------------------------------------------------------------------------
FFLAGS, FRM, FCSR = 0x001, 0x002, 0x003
SSTATUS, SIE, STVEC, SCOUNTEREN, SENVCFG = 0x100, 0x104, 0x105, 0x106, 0x10A
SSCRATCH, SEPC, SCAUSE, STVAL, SIP, STIMECMP = 0x140, 0x141, 0x142, 0x143, 0x144, 0x14D
SATP = 0x180
MSTATUS, MISA, MEDELEG, MIDELEG, MIE, MTVEC, MCOUNTEREN = (
    0x300, 0x301, 0x302, 0x303, 0x304, 0x305, 0x306)
MENVCFG, MCOUNTINHIBIT = 0x30A, 0x320
MHPMEVENT3 = 0x323
MSCRATCH, MEPC, MCAUSE, MTVAL, MIP = 0x340, 0x341, 0x342, 0x343, 0x344
MCYCLE, MINSTRET, MHPMCOUNTER3 = 0xB00, 0xB02, 0xB03
CYCLE, TIME, INSTRET, HPMCOUNTER3 = 0xC00, 0xC01, 0xC02, 0xC03
MVENDORID, MARCHID, MIMPID, MHARTID, MCONFIGPTR = 0xF11, 0xF12, 0xF13, 0xF14, 0xF15
TSELECT, TINFO = 0x7A0, 0x7A4  # tdata1..3 lie between

# --- mstatus fields -----------------------------------------------------------------------
MSTATUS_SIE = 1 << 1
MSTATUS_MIE = 1 << 3
MSTATUS_SPIE = 1 << 5
MSTATUS_MPIE = 1 << 7
MSTATUS_SPP = 1 << 8
MSTATUS_MPP_SHIFT = 11
MSTATUS_MPP = 3 << MSTATUS_MPP_SHIFT
MSTATUS_FS = 3 << 13
MSTATUS_MPRV = 1 << 17
MSTATUS_SUM = 1 << 18
MSTATUS_MXR = 1 << 19
MSTATUS_TVM = 1 << 20
MSTATUS_TW = 1 << 21
MSTATUS_TSR = 1 << 22
MSTATUS_UXL = 3 << 32
MSTATUS_SXL = 3 << 34
MSTATUS_SD = 1 << 63
XL_64 = 2

MSTATUS_WMASK = (
    MSTATUS_SIE | MSTATUS_MIE | MSTATUS_SPIE | MSTATUS_MPIE | MSTATUS_SPP | MSTATUS_MPP
    | MSTATUS_FS | MSTATUS_MPRV | MSTATUS_SUM | MSTATUS_MXR | MSTATUS_TVM | MSTATUS_TW
    | MSTATUS_TSR
)
SSTATUS_WMASK = MSTATUS_SIE | MSTATUS_SPIE | MSTATUS_SPP | MSTATUS_FS | MSTATUS_SUM | MSTATUS_MXR
SSTATUS_RMASK = SSTATUS_WMASK | MSTATUS_UXL | MSTATUS_SD

# --- interrupts ---------------------------------------------------------------------------
MIP_SSIP, MIP_MSIP, MIP_STIP, MIP_MTIP, MIP_SEIP, MIP_MEIP = (
    1 << 1, 1 << 3, 1 << 5, 1 << 7, 1 << 9, 1 << 11)
S_INTERRUPTS = MIP_SSIP | MIP_STIP | MIP_SEIP
ALL_INTERRUPTS = S_INTERRUPTS | MIP_MSIP | MIP_MTIP | MIP_MEIP
# M-mode software may raise the S-level lines; M-level ones belong to the CLINT and PLIC.
MIP_WMASK = S_INTERRUPTS
# Every exception except ecall from M-mode (11) and the reserved causes 10 and 14.
MEDELEG_MASK = 0x3FF | (1 << 12) | (1 << 13) | (1 << 15)

# --- misc ---------------------------------------------------------------------------------
MISA_VALUE = (XL_64 << 62) | sum(1 << (ord(e) - ord("A")) for e in "IMAFDCSU")
SATP_MODE_SHIFT = 60
SATP_BARE, SATP_SV39, SATP_SV48 = 0, 8, 9
SATP_PPN_MASK = (1 << 44) - 1
# envcfg fields: fence I/O implies memory, cache-block invalidate (00 illegal, 01 flush,
# 11 invalidate; 10 is reserved), clean/flush and zero enables (Zicbom, Zicboz), page-based
# memory types (Svpbmt) and the supervisor timer compare (Sstc); the last two in menvcfg only.
ENVCFG_FIOM = 1
ENVCFG_CBIE = 3 << 4
ENVCFG_CBIE_RESERVED = 2 << 4
ENVCFG_CBCFE = 1 << 6
ENVCFG_CBZE = 1 << 7
ENVCFG_PBMTE = 1 << 62
ENVCFG_STCE = 1 << 63
SENVCFG_WMASK = ENVCFG_FIOM | ENVCFG_CBIE | ENVCFG_CBCFE | ENVCFG_CBZE
MENVCFG_WMASK = SENVCFG_WMASK | ENVCFG_PBMTE | ENVCFG_STCE
COUNTEREN_TM = 1 << 1
COUNTINHIBIT_CY, COUNTINHIBIT_IR = 1 << 0, 1 << 2
COUNTINHIBIT_MASK = 0xFFFF_FFFD  # bit 1 (TM) does not exist: time is not a hart counter
FS_DIRTY = MSTATUS_FS



class Window(NamedTuple):  # (not a frozen dataclass, whose six methods take ~0.5 ms to make)
    """A CSR that reads and writes bits of one storage slot, where most writes need no more
    than the store: CsrFile's entry for it is built from this, and the native tiers run
    its quiet accesses themselves (popek.engine.stencils), leaving the rest to CsrFile."""

    slot: int  # the storage it is a window on (C[slot])
    read_mask: int  # of the CSR's value, which is C[slot] >> shift
    write_mask: int
    shift: int = 0
    # Bits whose setting or clearing needs more than the store (dropping translations,
    # a new decoding mode): writes that change them run CsrFile's write.
    loud_set: int = 0
    loud_clear: int = 0
    # Bits whose setting may let a pending interrupt in: loud only while one is pending
    # and enabled (mip & mie).
    wakes: int = 0
    status: bool = False  # a view of mstatus, whose SD bit summarizes FS
    fp: bool = False  # an FP CSR: illegal while mstatus.FS is off, and a write dirties FS


# The CSRs an S-mode kernel uses most: Linux sets and clears SIE and SUM in sstatus
# ~60,000 times a boot, and its trap entry and return go through the other four.
WINDOWS = {
    SSTATUS: Window(MSTATUS, SSTATUS_RMASK, SSTATUS_WMASK, loud_set=MSTATUS_FS,
                    loud_clear=MSTATUS_FS | MSTATUS_SUM | MSTATUS_MXR, wakes=MSTATUS_SIE,
                    status=True),
    # glibc reads and sets these around FP conversions (each printf of a double)
    FFLAGS: Window(FCSR, 0x1F, 0x1F, fp=True),
    FRM: Window(FCSR, 0x7, 0x7, shift=5, fp=True),
    FCSR: Window(FCSR, 0xFF, 0xFF, fp=True),
    SSCRATCH: Window(SSCRATCH, XLEN_MASK, XLEN_MASK),
    SEPC: Window(SEPC, XLEN_MASK, XLEN_MASK & ~1),
    SCAUSE: Window(SCAUSE, XLEN_MASK, XLEN_MASK),
    STVAL: Window(STVAL, XLEN_MASK, XLEN_MASK),
}

Check = Callable[[], None]
Read = Callable[[], int]
Write = Callable[[int], None]


def illegal() -> Trap:
    """The trap for a refused CSR access; the engine fills in the instruction bits."""
    return Trap(ILLEGAL_INSN, None)


def _zero() -> int:
    return 0


def _with_sd(status: int) -> int:
    """mstatus with SD summarizing FS (XS is always 0): the engine may set FS alone."""
    if status & MSTATUS_FS == MSTATUS_FS:
        return status | MSTATUS_SD
    return status & ~MSTATUS_SD


class CsrFile:
    """The behaviour of ``csrrw``/``csrrs``/``csrrc`` over the hart's CSR storage."""

    def __init__(self, hart: Hart) -> None:
        self.hart = hart
        self.c = hart.csr
        self._table: dict[int, tuple[Check | None, Read, Write | None]] = {}
        self._build()

    def reset(self) -> None:
        """Power-on values: RV64 IMAFDC+S+U, 64-bit U and S modes, everything else zero."""
        c = self.c
        for i in range(len(c)):
            c[i] = 0
        c[MISA] = MISA_VALUE
        c[MSTATUS] = (XL_64 << 32) | (XL_64 << 34)
        c[MHARTID] = self.hart.hartid

    def op(self, num: int, kind: int, value: int, do_read: bool, do_write: bool) -> int:
        """csrrw (kind 0), csrrs (1) or csrrc (2): return the old value, then write."""
        entry = self._table.get(num)
        if entry is None or (num >> 8) & 3 > self.hart.ctl[CTL_PRIV]:
            raise illegal()
        if do_write and num >= 0xC00:  # bits 11:10 == 3: read-only
            raise illegal()
        check, read, write = entry
        if check is not None:
            check()
        old = read()
        if do_write and write is not None:
            if kind == 1:
                value |= old
            elif kind == 2:
                value = old & ~value
            write(value & XLEN_MASK)
        return old if do_read else 0

    # -- a debugger's view: every CSR, with no privilege or FP-state check ------------------
    def numbers(self) -> list[int]:
        """The numbers of the CSRs this hart has, ascending."""
        return sorted(self._table)

    def debug_read(self, num: int) -> int:
        return self._table[num][1]()

    def debug_write(self, num: int, value: int) -> None:
        """Write as ``csrrw`` would (WARL masks, side effects); read-only CSRs stay."""
        write = self._table[num][2]
        if write is not None and num < 0xC00:
            write(value & XLEN_MASK)

    # -- table ---------------------------------------------------------------------------
    def _build(self) -> None:
        c = self.c
        t = self._table

        def plain(num: int, mask: int = XLEN_MASK) -> None:
            def write(v: int) -> None:
                c[num] = (c[num] & ~mask) | (v & mask)
            t[num] = (None, lambda: c[num], write)

        def constant(num: int, check: Check | None = None) -> None:
            t[num] = (check, lambda: c[num], None)

        for num, window in WINDOWS.items():
            t[num] = (self._check_fp if window.fp else None, *self._window(window))
        t[SIE] = (None, lambda: c[MIE] & c[MIDELEG], self._write_sie)
        t[STVEC] = (None, lambda: c[STVEC], lambda v: self._write_tvec(STVEC, v))
        plain(SCOUNTEREN, 0xFFFF_FFFF)
        t[SENVCFG] = (None, lambda: c[SENVCFG], lambda v: self._write_envcfg(SENVCFG, v))
        t[STIMECMP] = (self._check_stimecmp, lambda: c[STIMECMP], self._write_stimecmp)
        t[SIP] = (None, lambda: c[MIP] & c[MIDELEG], self._write_sip)
        t[SATP] = (self._check_satp, lambda: c[SATP], self._write_satp)

        t[MSTATUS] = (None, self._mstatus, self._write_mstatus)
        constant(MISA)
        plain(MEDELEG, MEDELEG_MASK)
        plain(MIDELEG, S_INTERRUPTS)
        plain(MIE, ALL_INTERRUPTS)
        t[MTVEC] = (None, lambda: c[MTVEC], lambda v: self._write_tvec(MTVEC, v))
        plain(MCOUNTEREN, 0xFFFF_FFFF)
        t[MENVCFG] = (None, lambda: c[MENVCFG], lambda v: self._write_envcfg(MENVCFG, v))
        t[MCOUNTINHIBIT] = (None, lambda: c[MCOUNTINHIBIT], self._write_countinhibit)
        plain(MSCRATCH)
        t[MEPC] = (None, lambda: c[MEPC], lambda v: self._set(MEPC, v & ~1))
        plain(MCAUSE)
        plain(MTVAL)
        t[MIP] = (None, lambda: c[MIP], self._write_mip)

        for i in range(pmp.N_CFG_CSRS):
            num = pmp.PMPCFG0 + 2 * i  # RV64: only the even pmpcfg registers exist
            t[num] = (None, lambda n=num: c[n], lambda v, n=num: pmp.write_cfg(self.hart, n, v))
        for i in range(pmp.N_ADDR_CSRS):
            num = pmp.PMPADDR0 + i
            t[num] = (None, lambda n=num: c[n], lambda v, i=i: pmp.write_addr(self.hart, i, v))

        # Counters: cycle counts retired instructions; no hardware performance monitors.
        t[MCYCLE] = (None, lambda: self._counter(MCYCLE, COUNTINHIBIT_CY),
                     lambda v: self._set_counter(MCYCLE, COUNTINHIBIT_CY, v))
        t[MINSTRET] = (None, lambda: self._counter(MINSTRET, COUNTINHIBIT_IR),
                       lambda v: self._set_counter(MINSTRET, COUNTINHIBIT_IR, v))
        for i in range(29):
            t[MHPMCOUNTER3 + i] = (None, _zero, None)
            t[MHPMEVENT3 + i] = (None, _zero, None)
            t[HPMCOUNTER3 + i] = (lambda b=3 + i: self._check_counter(b), _zero, None)
        t[CYCLE] = (lambda: self._check_counter(0), t[MCYCLE][1], None)
        t[TIME] = (lambda: self._check_counter(1), lambda: self.hart.time(), None)
        t[INSTRET] = (lambda: self._check_counter(2), t[MINSTRET][1], None)

        for num in (MVENDORID, MARCHID, MIMPID, MHARTID, MCONFIGPTR):
            constant(num)

        # The debug triggers' CSRs with no trigger behind them (tdata1 reads type 0, "no
        # trigger", and tinfo says only that type exists), as the debug spec allows: code
        # that probes for triggers, like the ISA tests' breakpoint test, finds none.
        for num in range(TSELECT, TINFO):
            t[num] = (None, _zero, None)
        t[TINFO] = (None, lambda: 1, None)

    # -- helpers -------------------------------------------------------------------------
    def _set(self, num: int, value: int) -> None:
        self.c[num] = value & XLEN_MASK

    def _mstatus(self) -> int:
        return _with_sd(self.c[MSTATUS])

    def _write_mstatus(self, v: int) -> None:
        old = self.c[MSTATUS]
        new = (old & ~MSTATUS_WMASK) | (v & MSTATUS_WMASK)
        if new & MSTATUS_MPP == 2 << MSTATUS_MPP_SHIFT:  # no H-mode: keep the legal MPP
            new = (new & ~MSTATUS_MPP) | (old & MSTATUS_MPP)
        self._store_mstatus(old, new)

    def _window(self, w: Window) -> tuple[Read, Write]:
        c, slot, rmask, wmask, shift = self.c, w.slot, w.read_mask, w.write_mask, w.shift
        if w.status:
            def write_status(v: int) -> None:
                old = c[MSTATUS]
                self._store_mstatus(old, (old & ~wmask) | (v & wmask))
            return lambda: self._mstatus() & rmask, write_status

        def write(v: int) -> None:
            c[slot] = (c[slot] & ~(wmask << shift)) | ((v & wmask) << shift)
            if w.fp:
                c[MSTATUS] |= FS_DIRTY | MSTATUS_SD
        return lambda: (c[slot] >> shift) & rmask, write

    def _store_mstatus(self, old: int, new: int) -> None:
        """Setting SUM or MXR only grants access, so cached translations stay valid;
        Linux sets and clears SUM around every copy from or to user memory."""
        self.c[MSTATUS] = new = _with_sd(new)
        changed = old ^ new
        if changed & MSTATUS_MPRV or changed & old & MSTATUS_MXR or (
                new & MSTATUS_MPRV and changed & MSTATUS_MPP):
            self.hart.mmu.flush()
        elif changed & old & MSTATUS_SUM:
            self.hart.mmu.drop_sum_pages()

    def _write_sie(self, v: int) -> None:
        c = self.c
        mask = c[MIDELEG]
        c[MIE] = (c[MIE] & ~mask) | (v & mask)

    def _write_sip(self, v: int) -> None:
        c = self.c
        mask = c[MIDELEG] & MIP_SSIP  # STIP and SEIP are read-only in sip
        c[MIP] = (c[MIP] & ~mask) | (v & mask)

    def _write_tvec(self, num: int, v: int) -> None:
        if v & 3 < 2:  # direct or vectored; other modes are reserved: keep the old value
            self.c[num] = v

    def _write_satp(self, v: int) -> None:
        """A new address space: its global translations stay, unless the mode changes."""
        mode = v >> SATP_MODE_SHIFT
        if mode in (SATP_BARE, SATP_SV39, SATP_SV48):
            old, self.c[SATP] = self.c[SATP], v
            if old >> SATP_MODE_SHIFT == mode:
                self.hart.mmu.flush_local()
            else:
                self.hart.mmu.flush()

    def _write_mip(self, v: int) -> None:
        """With Sstc enabled STIP follows stimecmp alone: software cannot write it."""
        c = self.c
        mask = MIP_WMASK & ~MIP_STIP if c[MENVCFG] & ENVCFG_STCE else MIP_WMASK
        c[MIP] = (c[MIP] & ~mask) | (v & mask)

    def _write_envcfg(self, num: int, v: int) -> None:
        c = self.c
        old = c[num]
        new = v & (MENVCFG_WMASK if num == MENVCFG else SENVCFG_WMASK)
        if new & ENVCFG_CBIE == ENVCFG_CBIE_RESERVED:  # WARL: keep the legal old value
            new = (new & ~ENVCFG_CBIE) | (old & ENVCFG_CBIE)
        c[num] = new
        if (old ^ new) & ENVCFG_PBMTE:  # PTEs with PBMT bits become (in)valid
            self.hart.mmu.flush()
        if (old ^ new) & ENVCFG_STCE:
            self.update_stimecmp()

    def _write_stimecmp(self, v: int) -> None:
        self.c[STIMECMP] = v
        self.update_stimecmp()

    def update_stimecmp(self) -> None:
        """Sstc: STIP is pending exactly while time >= stimecmp (when menvcfg.STCE is set).
        The machine calls this at its device updates, as it updates the CLINT."""
        c = self.c
        if c[MENVCFG] & ENVCFG_STCE:
            self.hart.set_interrupt(IRQ_S_TIMER, self.hart.time() >= c[STIMECMP])

    def stimecmp_deadline(self) -> int | None:
        """The time at which Sstc will raise STIP, if it is armed and not yet pending."""
        c = self.c
        if c[MENVCFG] & ENVCFG_STCE and not c[MIP] & MIP_STIP:
            return c[STIMECMP]
        return None

    def _write_countinhibit(self, v: int) -> None:
        """Freeze or restart mcycle/minstret: a frozen counter's slot holds its value."""
        c = self.c
        old = c[MCOUNTINHIBIT]
        new = v & COUNTINHIBIT_MASK
        for num, bit in ((MCYCLE, COUNTINHIBIT_CY), (MINSTRET, COUNTINHIBIT_IR)):
            if (old ^ new) & bit:
                value = self._counter(num, bit)
                c[MCOUNTINHIBIT] = (c[MCOUNTINHIBIT] & ~bit) | (new & bit)
                self._set_counter(num, bit, value)
        c[MCOUNTINHIBIT] = new

    def _counter(self, num: int, bit: int) -> int:
        """A running counter's slot holds its offset from the hart's retired-instruction count."""
        c = self.c
        if c[MCOUNTINHIBIT] & bit:
            return c[num]
        return (self.hart.ctl[CTL_INSTRET] + c[num]) & XLEN_MASK

    def _set_counter(self, num: int, bit: int, value: int) -> None:
        # The written value replaces the writing instruction's own increment, which the
        # engine counts when the instruction completes: hence the extra 1.
        c = self.c
        if c[MCOUNTINHIBIT] & bit:
            c[num] = value
        else:
            c[num] = (value - self.hart.ctl[CTL_INSTRET] - 1) & XLEN_MASK

    # -- access checks -------------------------------------------------------------------
    def _check_fp(self) -> None:
        if not self.c[MSTATUS] & MSTATUS_FS:
            raise illegal()

    def _check_satp(self) -> None:
        if self.hart.ctl[CTL_PRIV] == PRIV_S and self.c[MSTATUS] & MSTATUS_TVM:
            raise illegal()

    def _check_stimecmp(self) -> None:
        """Below M-mode stimecmp exists only where M-mode enabled it and lets time be read."""
        if self.hart.ctl[CTL_PRIV] != PRIV_M and (
                not self.c[MENVCFG] & ENVCFG_STCE or not self.c[MCOUNTEREN] & COUNTEREN_TM):
            raise illegal()

    def _check_counter(self, bit: int) -> None:
        priv = self.hart.ctl[CTL_PRIV]
        if priv == PRIV_M:
            return
        if not (self.c[MCOUNTEREN] >> bit) & 1:
            raise illegal()
        if priv == PRIV_U and not (self.c[SCOUNTEREN] >> bit) & 1:
            raise illegal()
