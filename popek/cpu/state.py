"""Architectural state of one hart, in flat buffers shared by every execution tier.

The interpreter indexes these arrays directly, a translated block copies registers
into locals and writes them back at exit, and a native tier can take their
addresses (``buffer_info()``), so no tier ever copies state into a private form.

``x`` has 33 slots: the decoder sends every write to ``x0`` into slot 32 (a sink),
so handlers never test for ``rd == 0`` and ``x[0]`` stays zero.
"""

from __future__ import annotations

from array import array

XLEN_MASK = (1 << 64) - 1
X_SINK = 32

PRIV_U = 0
PRIV_S = 1
PRIV_M = 3

# Slots of the control buffer.
CTL_PC = 0
CTL_PRIV = 1
CTL_WFI = 2  # non-zero while the hart waits for an interrupt
CTL_INSTRET = 3
CTL_RESERVATION = 4  # the address an LR reserved, or NO_RESERVATION
CTL_SLOTS = 5
NO_RESERVATION = 1  # never a reserved address: LR/SC addresses are aligned

N_CSRS = 4096


class HartState:
    """Registers, pc, privilege and CSR storage of one hart."""

    def __init__(self, hartid: int = 0) -> None:
        self.hartid = hartid
        self.x = array("Q", bytes(8 * 33))
        self.f = array("Q", bytes(8 * 32))
        self.ctl = array("Q", bytes(8 * CTL_SLOTS))
        self.ctl[CTL_RESERVATION] = NO_RESERVATION
        # Raw storage for every CSR, indexed by CSR number. Views (sstatus, sip, sie,
        # fflags, frm...) are not stored; the CSR file derives them from their base.
        self.csr = array("Q", bytes(8 * N_CSRS))

    @property
    def pc(self) -> int:
        return self.ctl[CTL_PC]

    @pc.setter
    def pc(self, value: int) -> None:
        self.ctl[CTL_PC] = value & XLEN_MASK

    @property
    def priv(self) -> int:
        return self.ctl[CTL_PRIV]

    @priv.setter
    def priv(self, value: int) -> None:
        self.ctl[CTL_PRIV] = value

    @property
    def reservation(self) -> int | None:
        value = self.ctl[CTL_RESERVATION]
        return None if value == NO_RESERVATION else value

    @reservation.setter
    def reservation(self, value: int | None) -> None:
        self.ctl[CTL_RESERVATION] = NO_RESERVATION if value is None else value

    @property
    def instret(self) -> int:
        return self.ctl[CTL_INSTRET]

    @instret.setter
    def instret(self, value: int) -> None:
        self.ctl[CTL_INSTRET] = value & XLEN_MASK
