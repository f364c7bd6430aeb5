"""Register-level tests of the virt board's small devices, from their specifications.

Expected values come from the 16550A datasheet, the RISC-V PLIC and ACLINT specs, the
goldfish RTC and SiFive test-finisher documentation (and QEMU where a spec is silent),
not from popek's output. Interrupt outputs are checked on real harts' ``mip``.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from popek.cpu.hart import Hart
from popek.cpu.physmem import PhysicalMemory
from popek.devices.clint import Clint
from popek.devices.device import Device
from popek.devices.goldfish_rtc import GoldfishRtc
from popek.devices.plic import Plic
from popek.devices.test_finisher import Finisher
from popek.devices.uart16550 import Uart16550

MIP = 0x344
MSIP, MTIP, SEIP, MEIP = 3, 7, 9, 11
M64 = (1 << 64) - 1


def make_harts(n: int = 1) -> list[Hart]:
    mem = PhysicalMemory(0x8000_0000, 1 << 20)
    return [Hart(mem, h) for h in range(n)]


def mip(hart: Hart, bit: int) -> bool:
    return bool(hart.csr[MIP] >> bit & 1)


def json_round_trip(state: dict[str, Any]) -> dict[str, Any]:
    """Snapshots travel as JSON: a state that does not survive it is a bug."""
    return json.loads(json.dumps(state))


class FakeClock:
    def __init__(self, now: int = 0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


class Line:
    """An interrupt wire that remembers its level."""

    def __init__(self) -> None:
        self.level = False

    def __call__(self, level: bool) -> None:
        self.level = level


# ---------------------------------------------------------------------------------------
# CLINT
# ---------------------------------------------------------------------------------------
CLINT_MSIP, CLINT_MTIMECMP, CLINT_MTIME = 0x0, 0x4000, 0xBFF8


@pytest.fixture
def clint_setup() -> tuple[Clint, list[Hart], FakeClock]:
    harts = make_harts(2)
    clock = FakeClock(1_000)
    return Clint(harts, clock), harts, clock


def test_clint_mtime_starts_at_zero_and_follows_the_clock(clint_setup):
    clint, _, clock = clint_setup
    assert clint.read(CLINT_MTIME, 8) == 0
    clock.now += 250
    assert clint.read(CLINT_MTIME, 8) == 250
    assert clint.mtime() == 250


def test_clint_mtimecmp_in_the_future_raises_mtip_when_update_sees_it_reached(clint_setup):
    clint, harts, clock = clint_setup
    clint.write(CLINT_MTIMECMP, 8, 100)
    assert not mip(harts[0], MTIP)
    clock.now += 99
    clint.update()
    assert not mip(harts[0], MTIP)
    clock.now += 1
    clint.update()
    assert mip(harts[0], MTIP)


def test_clint_mtimecmp_write_updates_mtip_immediately(clint_setup):
    clint, harts, clock = clint_setup
    clock.now += 500
    clint.write(CLINT_MTIMECMP + 8, 8, 400)  # hart 1, already in the past
    assert mip(harts[1], MTIP)
    clint.write(CLINT_MTIMECMP + 8, 8, M64)  # moved to never: cleared at once
    assert not mip(harts[1], MTIP)


def test_clint_mtimecmp_resets_to_zero_so_mtip_is_pending_at_boot_like_qemu(clint_setup):
    clint, harts, _ = clint_setup
    assert clint.read(CLINT_MTIMECMP, 8) == 0
    assert mip(harts[0], MTIP) and mip(harts[1], MTIP)


def test_clint_msip_drives_msip_of_its_hart_only(clint_setup):
    clint, harts, _ = clint_setup
    clint.write(CLINT_MSIP + 4, 4, 0xFFFF_FFFF)  # only bit 0 is implemented
    assert mip(harts[1], MSIP) and not mip(harts[0], MSIP)
    assert clint.read(CLINT_MSIP + 4, 4) == 1
    clint.write(CLINT_MSIP + 4, 4, 0)
    assert not mip(harts[1], MSIP)
    assert clint.read(CLINT_MSIP + 4, 4) == 0


def test_clint_mtimecmp_halves_are_independent_32_bit_registers(clint_setup):
    clint, _, _ = clint_setup
    clint.write(CLINT_MTIMECMP, 8, 0x1111_2222_3333_4444)
    assert clint.read(CLINT_MTIMECMP, 4) == 0x3333_4444
    assert clint.read(CLINT_MTIMECMP + 4, 4) == 0x1111_2222
    clint.write(CLINT_MTIMECMP + 4, 4, 0xAAAA_BBBB)
    assert clint.read(CLINT_MTIMECMP, 8) == 0xAAAA_BBBB_3333_4444
    clint.write(CLINT_MTIMECMP, 4, 0xCCCC_DDDD)
    assert clint.read(CLINT_MTIMECMP, 8) == 0xAAAA_BBBB_CCCC_DDDD


def test_clint_mtime_writes_move_time_and_time_keeps_running(clint_setup):
    clint, _, clock = clint_setup
    clint.write(CLINT_MTIME, 8, 0x5_0000_0000)
    clock.now += 7
    assert clint.read(CLINT_MTIME, 8) == 0x5_0000_0007
    clint.write(CLINT_MTIME + 4, 4, 0x9)  # high half only
    assert clint.read(CLINT_MTIME + 4, 4) == 0x9
    assert clint.read(CLINT_MTIME, 4) == 7
    clint.write(CLINT_MTIME, 4, 0x100)  # low half only
    assert clint.read(CLINT_MTIME, 8) == 0x9_0000_0100


def test_clint_mtime_write_reevaluates_every_timer(clint_setup):
    clint, harts, _ = clint_setup
    clint.write(CLINT_MTIMECMP, 8, 1_000)
    clint.write(CLINT_MTIMECMP + 8, 8, 1_000)
    assert not mip(harts[0], MTIP)
    clint.write(CLINT_MTIME, 8, 1_000)
    assert mip(harts[0], MTIP) and mip(harts[1], MTIP)


def test_clint_next_deadline_is_the_nearest_future_mtimecmp(clint_setup):
    clint, _, clock = clint_setup
    assert clint.next_deadline() is None  # both compare values (0) already reached
    clint.write(CLINT_MTIMECMP, 8, 900)
    clint.write(CLINT_MTIMECMP + 8, 8, 300)
    assert clint.next_deadline() == 300
    clock.now += 300
    assert clint.next_deadline() == 900
    clock.now += 600
    assert clint.next_deadline() is None


def test_clint_ignores_wrong_sizes_and_misaligned_accesses(clint_setup):
    clint, harts, _ = clint_setup
    clint.write(CLINT_MSIP, 8, 1)
    clint.write(CLINT_MSIP + 1, 4, 1)
    assert not mip(harts[0], MSIP)
    clint.write(CLINT_MTIMECMP + 4, 8, 5)  # a 64-bit write to the high half is invalid
    assert clint.read(CLINT_MTIMECMP, 8) == 0
    assert clint.read(CLINT_MTIMECMP + 2, 4) == 0
    assert clint.read(CLINT_MTIMECMP + 8 * 2, 8) == 0  # no hart 2
    assert clint.read(CLINT_MTIME, 1) == 0


def test_clint_restored_state_continues_time_and_drives_outputs():
    harts = make_harts(2)
    clock = FakeClock(0)
    clint = Clint(harts, clock)
    clock.now = 10_000
    clint.write(CLINT_MTIMECMP, 8, 20_000)
    clint.write(CLINT_MTIMECMP + 8, 8, 5_000)
    clint.write(CLINT_MSIP, 4, 1)
    state = json_round_trip(clint.save_state())

    new_harts = make_harts(2)
    other = Clint(new_harts, FakeClock(77_777_777))  # another host's clock
    other.load_state(state)
    assert other.read(CLINT_MTIME, 8) == 10_000
    assert other.save_state() == state
    assert mip(new_harts[0], MSIP) and not mip(new_harts[0], MTIP)
    assert mip(new_harts[1], MTIP)
    assert other.next_deadline() == clint.next_deadline() == 20_000


def test_clint_refuses_a_state_for_another_hart_count(clint_setup):
    clint, _, _ = clint_setup
    one = Clint(make_harts(1), FakeClock())
    with pytest.raises(ValueError):
        one.load_state(clint.save_state())
    with pytest.raises(ValueError):
        clint.load_state({**clint.save_state(), "version": 99})


# ---------------------------------------------------------------------------------------
# PLIC
# ---------------------------------------------------------------------------------------
PRIORITY, PENDING, ENABLE, CONTEXT = 0x0, 0x1000, 0x2000, 0x20_0000


def enable(plic: Plic, ctx: int, *sources: int) -> None:
    words = [0, 0, 0]
    for src in sources:
        words[src // 32] |= 1 << (src % 32)
    for w, bits in enumerate(words):
        plic.write(ENABLE + 0x80 * ctx + 4 * w, 4, bits)


def threshold(ctx: int) -> int:
    return CONTEXT + 0x1000 * ctx


def claim(ctx: int) -> int:
    return CONTEXT + 0x1000 * ctx + 4


@pytest.fixture
def plic_setup() -> tuple[Plic, list[Hart]]:
    harts = make_harts(2)
    plic = Plic(harts)
    for src in (1, 5, 10, 11, 33, 95):
        plic.write(PRIORITY + 4 * src, 4, 1)
    return plic, harts


def test_plic_pending_source_raises_meip_only_for_an_enabling_m_context(plic_setup):
    plic, harts = plic_setup
    plic.set_source(10, True)
    assert not mip(harts[0], MEIP)  # pending but not enabled anywhere
    assert plic.read(PENDING, 4) == 1 << 10
    enable(plic, 0, 10)  # hart 0, M-mode
    assert mip(harts[0], MEIP)
    assert not mip(harts[0], SEIP) and not mip(harts[1], MEIP)


def test_plic_s_context_drives_seip_and_odd_contexts_belong_to_the_same_hart(plic_setup):
    plic, harts = plic_setup
    enable(plic, 3, 33)  # hart 1, S-mode
    plic.irq_line(33)(True)
    assert mip(harts[1], SEIP)
    assert not mip(harts[1], MEIP) and not mip(harts[0], SEIP)
    assert plic.read(PENDING + 4, 4) == 1 << 1


def test_plic_claim_returns_highest_priority_then_lowest_id(plic_setup):
    plic, _ = plic_setup
    enable(plic, 0, 1, 5, 10, 11)
    plic.write(PRIORITY + 4 * 10, 4, 3)
    plic.write(PRIORITY + 4 * 11, 4, 3)
    for src in (1, 5, 10, 11):
        plic.set_source(src, True)
    assert [plic.read(claim(0), 4) for _ in range(5)] == [10, 11, 1, 5, 0]


def test_plic_interrupts_only_above_threshold_and_never_at_priority_zero(plic_setup):
    plic, harts = plic_setup
    enable(plic, 0, 5, 10, 20)  # 20 keeps priority 0
    plic.set_source(20, True)
    assert not mip(harts[0], MEIP) and plic.read(claim(0), 4) == 0
    plic.write(PRIORITY + 4 * 5, 4, 2)
    plic.set_source(5, True)
    plic.write(threshold(0), 4, 2)  # priority must exceed the threshold
    assert not mip(harts[0], MEIP) and plic.read(claim(0), 4) == 0
    plic.write(threshold(0), 4, 1)
    assert mip(harts[0], MEIP)
    assert plic.read(threshold(0), 4) == 1
    assert plic.read(claim(0), 4) == 5


def test_plic_claim_clears_pending_and_gates_the_source_until_complete(plic_setup):
    plic, harts = plic_setup
    enable(plic, 0, 10)
    enable(plic, 1, 10)
    plic.set_source(10, True)
    assert plic.read(claim(0), 4) == 10
    assert plic.read(PENDING, 4) == 0
    assert not mip(harts[0], MEIP) and not mip(harts[0], SEIP)  # gated for every context
    assert plic.read(claim(1), 4) == 0
    plic.write(claim(0), 4, 10)  # complete while the device still holds its line high:
    assert plic.read(PENDING, 4) == 0  # as on QEMU, no new request until it raises again
    assert not mip(harts[0], MEIP) and not mip(harts[0], SEIP)
    plic.set_source(10, True)  # the device drives its line high again (a state change)
    assert plic.read(PENDING, 4) == 1 << 10
    assert mip(harts[0], MEIP) and mip(harts[0], SEIP)


def test_plic_raise_while_high_latches_a_new_request_as_qemu_does(plic_setup):
    plic, harts = plic_setup
    enable(plic, 1, 10)
    plic.set_source(10, True)
    assert plic.read(claim(1), 4) == 10
    plic.write(claim(1), 4, 10)
    plic.set_source(10, True)  # never lowered: raised again
    assert mip(harts[0], SEIP) and plic.read(claim(1), 4) == 10
    plic.set_source(10, True)  # raised while claimed: pending once completed
    assert not mip(harts[0], SEIP)
    plic.write(claim(1), 4, 10)
    assert mip(harts[0], SEIP) and plic.read(claim(1), 4) == 10


def test_plic_state_saved_before_latching_restores_what_was_pending(plic_setup):
    plic, harts = plic_setup
    enable(plic, 0, 5, 10)
    old = {**plic.save_state(), "version": 1, "level": (1 << 5) | (1 << 10),
           "claimed": 1 << 10}
    del old["pending"]
    plic.load_state(old)
    assert plic.read(PENDING, 4) == 1 << 5 and mip(harts[0], MEIP)
    assert plic.read(claim(0), 4) == 5


def test_plic_source_dropped_before_complete_is_not_pending_again(plic_setup):
    plic, harts = plic_setup
    enable(plic, 0, 10)
    plic.set_source(10, True)
    assert plic.read(claim(0), 4) == 10
    plic.set_source(10, False)
    plic.write(claim(0), 4, 10)
    assert plic.read(PENDING, 4) == 0 and not mip(harts[0], MEIP)


def test_plic_lowering_a_line_withdraws_the_request(plic_setup):
    plic, harts = plic_setup
    enable(plic, 0, 95)
    plic.set_source(95, True)
    assert mip(harts[0], MEIP) and plic.read(PENDING + 8, 4) == 1 << 31
    plic.set_source(95, False)
    assert not mip(harts[0], MEIP) and plic.read(PENDING + 8, 4) == 0


def test_plic_registers_read_back_and_priority_is_warl_over_three_bits(plic_setup):
    plic, _ = plic_setup
    plic.write(PRIORITY + 4 * 7, 4, 0xFF)
    assert plic.read(PRIORITY + 4 * 7, 4) == 7
    plic.write(threshold(2), 4, 9)
    assert plic.read(threshold(2), 4) == 1
    enable(plic, 2, 40, 64)
    assert plic.read(ENABLE + 0x80 * 2 + 4, 4) == 1 << 8
    assert plic.read(ENABLE + 0x80 * 2 + 8, 4) == 1
    plic.write(PENDING, 4, 0xFFFF_FFFF)  # pending bits are read-only
    assert plic.read(PENDING, 4) == 0


def test_plic_ignores_contexts_and_words_that_do_not_exist(plic_setup):
    plic, _ = plic_setup
    plic.write(ENABLE + 0x80 * 4, 4, 0xFFFF_FFFF)  # context 4: no hart 2
    assert plic.read(ENABLE + 0x80 * 4, 4) == 0
    assert plic.read(ENABLE + 12, 4) == 0  # word 3 of context 0 (only 96 sources)
    assert plic.read(claim(4), 4) == 0
    assert plic.read(PRIORITY + 4 * 10, 2) == 0
    assert plic.read(PRIORITY + 4 * 10 + 1, 4) == 0


def test_plic_rejects_sources_outside_1_to_95(plic_setup):
    plic, _ = plic_setup
    for bad in (0, 96, -1):
        with pytest.raises(ValueError):
            plic.irq_line(bad)


def test_plic_restored_state_claims_the_same_and_drives_outputs(plic_setup):
    plic, _ = plic_setup
    enable(plic, 0, 5, 10)
    enable(plic, 3, 33)
    plic.write(PRIORITY + 4 * 10, 4, 4)
    for src in (5, 10, 33):
        plic.set_source(src, True)
    assert plic.read(claim(3), 4) == 33
    state = json_round_trip(plic.save_state())

    harts = make_harts(2)
    other = Plic(harts)
    other.load_state(state)
    assert other.save_state() == state
    assert mip(harts[0], MEIP) and not mip(harts[1], SEIP)
    assert [other.read(claim(0), 4) for _ in range(3)] == [10, 5, 0]
    other.write(claim(3), 4, 33)
    assert not mip(harts[1], SEIP)  # completed, and its device did not raise it again
    other.set_source(33, True)
    assert mip(harts[1], SEIP)


# ---------------------------------------------------------------------------------------
# UART 16550A
# ---------------------------------------------------------------------------------------
RBR, IER, IIR, LCR, MCR, LSR, MSR, SCR = 0, 1, 2, 3, 4, 5, 6, 7
THR, DLL, DLM, FCR = 0, 0, 1, 2


class UartBench:
    def __init__(self) -> None:
        self.sent = bytearray()
        self.irq = Line()
        self.uart = Uart16550(self.sent.extend, self.irq)

    def rd(self, reg: int) -> int:
        return self.uart.read(reg, 1)

    def wr(self, reg: int, value: int) -> None:
        self.uart.write(reg, 1, value)


@pytest.fixture
def u() -> UartBench:
    return UartBench()


def test_uart_reset_values_match_the_datasheet(u):
    assert u.rd(LSR) == 0x60  # THRE | TEMT
    assert u.rd(IIR) == 0x01  # no interrupt, FIFOs off
    assert u.rd(IER) == 0 and u.rd(LCR) == 0
    assert u.rd(MSR) == 0xB0  # DCD, DSR, CTS
    assert not u.irq.level


def test_uart_transmits_each_thr_write_to_the_host(u):
    for b in b"hi\n":
        u.wr(THR, b)
    assert bytes(u.sent) == b"hi\n"
    assert u.rd(LSR) & 0x60 == 0x60


def test_uart_dlab_switches_offsets_0_and_1_to_the_divisor_latch(u):
    u.wr(IER, 0x01)
    u.wr(LCR, 0x83)
    u.wr(DLL, 0x01)
    u.wr(DLM, 0x02)
    assert (u.rd(DLL), u.rd(DLM)) == (0x01, 0x02)
    assert u.sent == b""  # DLL write is not a transmission
    u.wr(LCR, 0x03)
    assert u.rd(IER) == 0x01
    u.wr(LCR, 0x80)
    assert u.rd(DLM) << 8 | u.rd(DLL) == 0x0201


def test_uart_without_fifo_holds_one_byte_and_signals_data_ready(u):
    u.wr(IER, 0x01)
    assert u.uart.push_input(b"ab") == 1
    assert not u.uart.has_room()
    assert u.rd(LSR) & 0x01 and u.irq.level
    assert u.rd(IIR) == 0x04  # received data available
    assert u.rd(RBR) == ord("a")
    assert not u.rd(LSR) & 0x01 and not u.irq.level
    assert u.uart.has_room()


def test_uart_fifo_holds_16_bytes(u):
    u.wr(FCR, 0x01)
    assert u.uart.push_input(bytes(range(20))) == 16
    assert not u.uart.has_room()
    assert [u.rd(RBR) for _ in range(16)] == list(range(16))
    assert not u.rd(LSR) & 0x01
    assert u.rd(RBR) == 0


@pytest.mark.parametrize("fcr, level", [(0x01, 1), (0x41, 4), (0x81, 8), (0xC1, 14)])
def test_uart_fifo_trigger_level_selects_data_available_over_timeout(u, fcr, level):
    u.wr(FCR, fcr)
    u.wr(IER, 0x01)
    if level > 1:
        u.uart.push_input(bytes(level - 1))
        assert u.rd(IIR) == 0xCC  # below the trigger: character timeout
        assert u.irq.level
    u.uart.push_input(bytes(1))
    assert u.rd(IIR) == 0xC4


def test_uart_fcr_receiver_reset_empties_the_fifo(u):
    u.wr(FCR, 0x01)
    u.wr(IER, 0x01)
    u.uart.push_input(b"xyz")
    u.wr(FCR, 0x03)
    assert not u.rd(LSR) & 0x01 and not u.irq.level
    assert u.rd(IIR) == 0xC1


def test_uart_thre_interrupt_raised_when_enabled_and_cleared_by_reading_iir(u):
    u.wr(IER, 0x02)
    assert u.irq.level
    assert u.rd(IIR) == 0x02
    assert not u.irq.level
    assert u.rd(IIR) == 0x01  # acknowledged
    u.wr(THR, ord("!"))  # THR empties again: re-armed
    assert u.irq.level and u.rd(IIR) == 0x02


def test_uart_thre_never_acknowledged_interrupts_once_per_change_as_on_qemu(plic_setup):
    """xv6's uartintr reads LSR and RBR but never IIR, so the transmitter-empty
    interrupt stays raised: on QEMU (and here) the PLIC interrupts again only when the
    UART's state changes (a byte arrives, one is sent), not at every completion."""
    plic, harts = plic_setup
    uart = Uart16550(lambda data: None, plic.irq_line(10))
    enable(plic, 1, 10)  # hart 0 in S-mode, as xv6's plicinithart

    def interrupts() -> int:
        """How many interrupts xv6's devintr/uartintr take before the line is quiet."""
        taken = 0
        while mip(harts[0], SEIP) and taken < 10:
            assert plic.read(claim(1), 4) == 10
            while uart.read(LSR, 1) & 0x01:  # uartgetc until it finds nothing
                uart.read(RBR, 1)
            plic.write(claim(1), 4, 10)
            taken += 1
        return taken

    uart.write(IER, 1, 0x03)  # receive and transmit interrupts
    assert interrupts() == 1
    uart.push_input(b"k")  # the key's, and one more as reading it changes the UART
    assert interrupts() == 2
    uart.write(THR, 1, ord("$"))
    assert interrupts() == 1


def test_uart_disabling_thri_clears_it_and_reenabling_rearms(u):
    u.wr(IER, 0x02)
    u.wr(IER, 0x00)
    assert not u.irq.level
    u.wr(IER, 0x02)
    assert u.irq.level


def test_uart_passes_linux_thre_bug_probe(u):
    """serial8250_do_startup: a real 16550 reasserts THRE when THRI is toggled."""
    u.wr(IER, 0x02)
    iir1 = u.rd(IIR)
    u.wr(IER, 0x00)
    u.wr(IER, 0x02)
    iir = u.rd(IIR)
    u.wr(IER, 0x00)
    assert not iir1 & 0x01 and not iir & 0x01


def test_uart_iir_reports_received_data_before_thre(u):
    u.wr(IER, 0x03)
    u.uart.push_input(b"k")
    assert u.rd(IIR) == 0x04
    assert u.rd(RBR) == ord("k")
    assert u.rd(IIR) == 0x02


def test_uart_loopback_receives_its_own_output_and_mirrors_modem_lines(u):
    u.wr(MCR, 0x10 | 0x0B)  # loop, OUT2, RTS, DTR
    assert not u.uart.has_room() and u.uart.push_input(b"x") == 0
    u.wr(THR, 0x5A)
    assert u.sent == b""
    assert u.rd(LSR) & 0x01 and u.rd(RBR) == 0x5A
    assert u.rd(MSR) == 0x80 | 0x10 | 0x20  # DCD <- OUT2, CTS <- RTS, DSR <- DTR


def test_uart_overrun_is_a_line_status_interrupt_above_data_and_clears_on_lsr_read(u):
    u.wr(MCR, 0x10)
    u.wr(IER, 0x05)  # RLSI + RDI
    u.wr(THR, 1)
    u.wr(THR, 2)  # no FIFO: the second byte overruns the first
    assert u.rd(IIR) == 0x06
    assert u.rd(LSR) & 0x03 == 0x03
    assert not u.rd(LSR) & 0x02
    assert u.rd(IIR) == 0x04
    assert u.rd(RBR) == 2  # the newest byte wins without a FIFO


def test_uart_scratch_register_and_read_only_status(u):
    u.wr(SCR, 0xA5)
    assert u.rd(SCR) == 0xA5
    u.wr(LSR, 0)
    u.wr(MSR, 0)
    assert u.rd(LSR) == 0x60 and u.rd(MSR) == 0xB0


def test_uart_offsets_beyond_the_eight_registers_read_zero(u):
    u.wr(0x8 + SCR, 0x11)
    assert u.rd(SCR) == 0 and u.uart.read(0x8 + LSR, 1) == 0
    assert u.uart.read(LSR, 4) == 0x60  # wider accesses reach the byte register (QEMU)


def uart_script(b: UartBench) -> list[int]:
    out = []
    for _ in range(3):
        out += [b.rd(IIR), b.rd(LSR), b.rd(RBR), int(b.irq.level)]
    b.uart.push_input(b"more")
    out += [b.rd(IIR), b.rd(RBR), b.rd(RBR)]
    b.wr(THR, ord("z"))
    return out + [b.rd(IIR), b.rd(IIR), int(b.irq.level)]


def test_uart_restored_state_behaves_identically(u):
    u.wr(FCR, 0x81)
    u.wr(IER, 0x03)
    u.wr(SCR, 0x42)
    u.wr(LCR, 0x83)
    u.wr(DLL, 0x10)
    u.wr(LCR, 0x03)
    u.uart.push_input(b"hello")
    state = json_round_trip(u.uart.save_state())

    other = UartBench()
    other.uart.load_state(state)
    assert other.uart.save_state() == state
    assert other.irq.level == u.irq.level
    assert uart_script(other) == uart_script(u)
    assert other.sent == u.sent[-1:]


# ---------------------------------------------------------------------------------------
# goldfish RTC
# ---------------------------------------------------------------------------------------
TIME_LOW, TIME_HIGH, ALARM_LOW, ALARM_HIGH = 0x00, 0x04, 0x08, 0x0C
IRQ_ENABLED, CLEAR_ALARM, ALARM_STATUS, CLEAR_INTERRUPT = 0x10, 0x14, 0x18, 0x1C
EPOCH_NS = 1_700_000_000 * 10**9


@pytest.fixture
def rtc_setup() -> tuple[GoldfishRtc, FakeClock, Line]:
    wall, line = FakeClock(EPOCH_NS), Line()
    return GoldfishRtc(line, wall), wall, line


def rtc_time(rtc: GoldfishRtc) -> int:
    low = rtc.read(TIME_LOW, 4)
    return rtc.read(TIME_HIGH, 4) << 32 | low


def test_rtc_reads_host_wall_clock_in_ns(rtc_setup):
    rtc, _, _ = rtc_setup
    assert rtc_time(rtc) == EPOCH_NS


def test_rtc_reading_time_low_latches_time_high(rtc_setup):
    rtc, wall, _ = rtc_setup
    wall.now = (5 << 32) | 0xFFFF_FFFF
    assert rtc.read(TIME_LOW, 4) == 0xFFFF_FFFF
    wall.now += 1  # the low half wraps between the two reads
    assert rtc.read(TIME_HIGH, 4) == 5


def test_rtc_time_writes_set_an_offset_that_keeps_running(rtc_setup):
    rtc, wall, _ = rtc_setup
    target = 1_000_000_000 * 10**9
    rtc.write(TIME_HIGH, 4, target >> 32)
    rtc.write(TIME_LOW, 4, target & 0xFFFF_FFFF)
    assert rtc_time(rtc) == target
    wall.now += 123
    assert rtc_time(rtc) == target + 123


def test_rtc_alarm_fires_at_its_time_and_interrupts_only_when_enabled(rtc_setup):
    rtc, wall, line = rtc_setup
    alarm = EPOCH_NS + 5_000
    rtc.write(ALARM_HIGH, 4, alarm >> 32)
    rtc.write(ALARM_LOW, 4, alarm & 0xFFFF_FFFF)
    assert rtc.read(ALARM_STATUS, 4) == 1
    assert (rtc.read(ALARM_HIGH, 4) << 32 | rtc.read(ALARM_LOW, 4)) == alarm
    wall.now += 4_999
    rtc.update()
    assert rtc.read(ALARM_STATUS, 4) == 1 and not line.level
    wall.now += 1
    rtc.update()
    assert rtc.read(ALARM_STATUS, 4) == 0
    assert not line.level  # pending, but IRQ_ENABLED is 0
    rtc.write(IRQ_ENABLED, 4, 1)
    assert line.level and rtc.read(IRQ_ENABLED, 4) == 1
    rtc.write(CLEAR_INTERRUPT, 4, 1)
    assert not line.level


def test_rtc_alarm_in_the_past_fires_at_once(rtc_setup):
    rtc, _, line = rtc_setup
    rtc.write(IRQ_ENABLED, 4, 1)
    rtc.write(ALARM_HIGH, 4, 0)
    rtc.write(ALARM_LOW, 4, 1)
    assert line.level and rtc.read(ALARM_STATUS, 4) == 0


def test_rtc_clear_alarm_disarms_it(rtc_setup):
    rtc, wall, line = rtc_setup
    rtc.write(IRQ_ENABLED, 4, 1)
    rtc.write(ALARM_HIGH, 4, (EPOCH_NS + 10) >> 32)
    rtc.write(ALARM_LOW, 4, (EPOCH_NS + 10) & 0xFFFF_FFFF)
    rtc.write(CLEAR_ALARM, 4, 1)
    wall.now += 100
    rtc.update()
    assert not line.level and rtc.read(ALARM_STATUS, 4) == 0


def test_rtc_restored_state_keeps_guest_offset_from_host_time_and_pending_alarm(rtc_setup):
    rtc, wall, _ = rtc_setup
    rtc.write(TIME_HIGH, 4, 0)  # guest moves its clock back to a small value
    rtc.write(TIME_LOW, 4, 1_000)
    rtc.write(IRQ_ENABLED, 4, 1)
    rtc.write(ALARM_HIGH, 4, 0)
    rtc.write(ALARM_LOW, 4, 1_500)
    state = json_round_trip(rtc.save_state())

    later, line = FakeClock(wall.now + 400), Line()
    other = GoldfishRtc(line, later)
    other.load_state(state)
    assert other.save_state() == state
    assert rtc_time(other) == 1_400  # the host's clock moved on by 400 ns meanwhile
    later.now += 100
    other.update()
    assert line.level


# ---------------------------------------------------------------------------------------
# test finisher
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, size, expected", [
    (0x5555, 4, ("poweroff", 0)),
    (0x5555, 2, ("poweroff", 0)),
    (0x002A_3333, 4, ("poweroff", 42)),
    (0x7777, 4, ("reboot", 0)),
])
def test_finisher_status_codes(value, size, expected):
    calls: list[tuple[str, int]] = []
    Finisher(lambda kind, code: calls.append((kind, code))).write(0, size, value)
    assert calls == [expected]


def test_finisher_ignores_other_values_offsets_and_sizes():
    calls: list[tuple[str, int]] = []
    fin = Finisher(lambda kind, code: calls.append((kind, code)))
    fin.write(0, 4, 0x1234)
    fin.write(4, 4, 0x5555)
    fin.write(0, 1, 0x55)
    fin.write(0, 8, 0x5555)
    assert calls == [] and fin.read(0, 4) == 0
    fin.load_state(json_round_trip(fin.save_state()))


# ---------------------------------------------------------------------------------------
# every device
# ---------------------------------------------------------------------------------------
def all_devices() -> list[tuple[Device, int]]:
    harts = make_harts(2)
    plic = Plic(harts)
    return [
        (Clint(harts, FakeClock(5)), 0x10000),
        (plic, 0x60_0000),
        (Uart16550(lambda data: None, plic.irq_line(10)), 0x100),
        (GoldfishRtc(plic.irq_line(11), FakeClock(EPOCH_NS)), 0x1000),
        (Finisher(lambda kind, code: None), 0x1000),
    ]


def test_every_device_implements_the_device_interface():
    for dev, _ in all_devices():
        assert isinstance(dev, Device)
        assert dev.save_state()["version"] == (2 if isinstance(dev, Plic) else 1)


def interesting_offsets(size: int) -> list[int]:
    return [0, 4, 8, 0x1000, 0x2000, 0x4000, 0xBFF8, 0xBFFC, 0x20_0000, 0x20_0004, size - 4,
            size - 1, size]


@pytest.mark.parametrize("seed", range(4))
def test_garbage_guest_accesses_never_raise_and_state_stays_serializable(seed):
    rng = random.Random(seed)
    for dev, size in all_devices():
        offsets = interesting_offsets(size)
        for _ in range(3000):
            if rng.random() < 0.5:
                offset = rng.choice(offsets) + rng.choice((0, 0, 1, 2, 3, 4, 8, 0x80))
            else:
                offset = rng.randrange(-16, size + 64)
            width = rng.choice((0, 1, 2, 3, 4, 8, 16))
            if rng.random() < 0.5:
                dev.read(offset, width)
            else:
                dev.write(offset, width, rng.choice((0, 1, M64, rng.getrandbits(64))))
        state = json_round_trip(dev.save_state())
        dev.load_state(state)
        assert dev.save_state() == state  # the fake clocks stand still: exact
        dev.reset()
