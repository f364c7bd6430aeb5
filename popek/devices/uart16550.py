"""16550A UART as on QEMU's virt board (ns16550a, reg-shift 0, PLIC source 10).

Registers follow the datasheet and QEMU's ``serial.c``, which Linux's 8250 driver and
OpenSBI's uart8250 driver are tested against. Transmission is instantaneous: a THR
write goes straight to the host, so THRE and TEMT always read 1 and, as on QEMU, the
THRE interrupt is re-armed after each write. The receive side has a real 16-byte FIFO
so the host can be held back (:meth:`Uart16550.has_room`) instead of losing input.

What a virtual line does not have is not modelled: no parity/framing errors or breaks,
and the modem lines are constant (DCD, DSR, CTS asserted), so the modem-status
interrupt never fires. The receiver's character timeout has zero length: the host
hands input over in bursts, so the line is idle as soon as a burst has arrived, and
data below the FIFO trigger level is signalled at once with the timeout ID (0xC).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from popek.devices.device import IrqLine, bits, pack_state, unpack_state

SIZE = 0x100
STATE_VERSION = 1

# register offsets (reg-shift 0)
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI = 0x01
IER_THRI = 0x02
IER_RLSI = 0x04

IIR_NO_INT = 0x01
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_CTI = 0x0C
IIR_FIFO_ENABLED = 0xC0

FCR_FE = 0x01
FCR_RFR = 0x02
FCR_XFR = 0x04
FCR_STICKY = 0xC9  # trigger level, DMA mode, enable; the reset bits self-clear

LCR_DLAB = 0x80
MCR_OUT2 = 0x08
MCR_LOOP = 0x10

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_IDLE = 0xB0  # DCD, DSR, CTS
FIFO_SIZE = 16
TRIGGER_LEVELS = (1, 4, 8, 14)


@dataclass
class UartState:
    rx: list[int] = field(default_factory=list, metadata=bits(8))  # received, not yet read
    ier: int = field(default=0, metadata=bits(8))
    lcr: int = field(default=0, metadata=bits(8))
    mcr: int = field(default=MCR_OUT2, metadata=bits(8))
    fcr: int = field(default=0, metadata=bits(8))
    scr: int = field(default=0, metadata=bits(8))
    # 9600 baud from the 1.8432 MHz reference, as QEMU resets to
    divisor: int = field(default=0x0C, metadata=bits(16))
    overrun: bool = False
    thr_ipending: bool = False  # THRE interrupt armed (QEMU's thr_ipending)


class Uart16550:
    """``output(data)`` receives transmitted bytes; ``irq(level)`` drives PLIC source 10."""

    def __init__(self, output: Callable[[bytes], None], irq: IrqLine) -> None:
        self.output = output
        self.irq = irq
        self.reset()

    def reset(self) -> None:
        self.s = UartState()
        self._update_irq()

    # -- host side ----------------------------------------------------------------------
    def receiving(self) -> bool:
        """Whether the driver listens (receive interrupt enabled): before that, Linux
        discards what arrives, so the host holds input back instead of losing it."""
        return bool(self.s.ier & IER_RDI)

    def has_room(self) -> bool:
        """Whether :meth:`push_input` would accept a byte now (host backpressure)."""
        return self._room() > 0

    def push_input(self, data: bytes) -> int:
        """Deliver host input; returns how many bytes fit, the host keeps the rest."""
        n = min(len(data), self._room())
        if n:
            self.s.rx.extend(data[:n])
            self._update_irq()
        return n

    def _room(self) -> int:
        if self.s.mcr & MCR_LOOP:  # the receiver listens to the transmitter only
            return 0
        return self._capacity() - len(self.s.rx)

    def _capacity(self) -> int:
        return FIFO_SIZE if self.s.fcr & FCR_FE else 1

    def _receive(self, byte: int) -> None:
        """One byte off the line (loopback); too many is an overrun, as on the chip."""
        s = self.s
        if len(s.rx) < self._capacity():
            s.rx.append(byte)
        else:
            s.overrun = True
            if not s.fcr & FCR_FE:  # without a FIFO the new byte overwrites RBR
                s.rx[-1] = byte

    # -- interrupts ---------------------------------------------------------------------
    def _interrupt_id(self) -> int:
        """The IIR interrupt ID: the highest-priority enabled condition, in datasheet order."""
        s = self.s
        if s.ier & IER_RLSI and s.overrun:
            return IIR_RLSI
        if s.ier & IER_RDI and s.rx:
            fifo = s.fcr & FCR_FE
            if fifo and len(s.rx) < TRIGGER_LEVELS[s.fcr >> 6]:
                return IIR_CTI
            return IIR_RDI
        if s.ier & IER_THRI and s.thr_ipending:
            return IIR_THRI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        """Drive the line at each change of the UART's state, as QEMU's serial.c does:
        raised again while high, it asks the PLIC for another interrupt (see Plic)."""
        self.irq(self._interrupt_id() != IIR_NO_INT)

    # -- bus ----------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        """Any access width reaches the byte register, as on QEMU; offsets 8.. are empty."""
        if size not in (1, 2, 4, 8) or not 0 <= offset < 8:
            return 0
        s = self.s
        dlab = s.lcr & LCR_DLAB
        if offset == RBR:
            if dlab:
                return s.divisor & 0xFF
            byte = s.rx.pop(0) if s.rx else 0
            self._update_irq()
            return byte
        if offset == IER:
            return s.divisor >> 8 if dlab else s.ier
        if offset == IIR:
            iid = self._interrupt_id()
            if iid == IIR_THRI:  # reading IIR acknowledges the THRE interrupt
                s.thr_ipending = False
                self._update_irq()
            return iid | (IIR_FIFO_ENABLED if s.fcr & FCR_FE else 0)
        if offset == LCR:
            return s.lcr
        if offset == MCR:
            return s.mcr
        if offset == LSR:
            lsr = LSR_THRE | LSR_TEMT | (LSR_DR if s.rx else 0) | (LSR_OE if s.overrun else 0)
            if s.overrun:
                s.overrun = False
                self._update_irq()
            return lsr
        if offset == MSR:
            if s.mcr & MCR_LOOP:  # outputs looped back: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD
                return (s.mcr & 0x0C) << 4 | (s.mcr & 0x02) << 3 | (s.mcr & 0x01) << 5
            return MSR_IDLE
        return s.scr

    def write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4, 8) or not 0 <= offset < 8:
            return
        value &= 0xFF
        s = self.s
        dlab = s.lcr & LCR_DLAB
        if offset == THR:
            if dlab:
                s.divisor = s.divisor & 0xFF00 | value
            else:
                self._transmit(value)
        elif offset == IER:
            if dlab:
                s.divisor = s.divisor & 0x00FF | value << 8
            else:
                self._write_ier(value & 0x0F)
        elif offset == FCR:
            self._write_fcr(value)
        elif offset == LCR:
            s.lcr = value
        elif offset == MCR:
            s.mcr = value & 0x1F
        elif offset == SCR:
            s.scr = value
        # LSR and MSR are read-only

    def _transmit(self, byte: int) -> None:
        if self.s.mcr & MCR_LOOP:
            self._receive(byte)
        else:
            self.output(bytes((byte,)))
        self.s.thr_ipending = True  # the holding register is empty again
        self._update_irq()

    def _write_ier(self, ier: int) -> None:
        """Enabling THRI while THR is empty re-arms the THRE interrupt (QEMU; Windows and
        Linux's THRE-bug probe rely on it)."""
        s = self.s
        if (s.ier ^ ier) & IER_THRI:
            s.thr_ipending = bool(ier & IER_THRI)
        s.ier = ier
        self._update_irq()

    def _write_fcr(self, value: int) -> None:
        s = self.s
        if value == s.fcr:
            return
        if (value ^ s.fcr) & FCR_FE:  # switching the FIFOs on or off empties them
            value |= FCR_RFR | FCR_XFR
        if value & FCR_RFR:
            s.rx.clear()
        if value & FCR_XFR:
            s.thr_ipending = True
        s.fcr = value & FCR_STICKY
        self._update_irq()

    # -- state --------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        return pack_state(STATE_VERSION, self.s)

    def load_state(self, state: dict[str, Any]) -> None:
        s = unpack_state(UartState, STATE_VERSION, state)
        s.rx = s.rx[:FIFO_SIZE]
        self.s = s
        self._update_irq()
