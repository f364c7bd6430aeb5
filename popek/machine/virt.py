"""The "virt" board: QEMU's riscv64 virt memory map, devices, harts and boot.

Software built for ``qemu-system-riscv64 -M virt`` boots unchanged. The machine
owns guest RAM, the bus and devices, the harts and the firmware, and time-slices
the harts in one host thread: each runs a slice of instructions, then devices and
timers are updated and console input is delivered.
"""

from __future__ import annotations

import os
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from popek.cpu import extensions
from popek.cpu import trap as trap_unit
from popek.cpu.causes import ECALL_S
from popek.cpu.hart import MIE, MIP, Hart
from popek.cpu.physmem import PhysicalMemory
from popek.devices import boot_rom
from popek.devices.boot_rom import BootRom
from popek.devices.clint import Clint
from popek.devices.device import HostEvents
from popek.devices.goldfish_rtc import GoldfishRtc
from popek.devices.plic import Plic
from popek.devices.test_finisher import Finisher
from popek.devices.uart16550 import Uart16550
from popek.devices.virtio import FIRST_IRQ, SLOT_BASE, SLOT_COUNT, SLOT_SIZE, VirtioBlk, VirtioMMIO
from popek.devices.virtio.balloon import VirtioBalloon
from popek.devices.virtio.console import VirtioConsole
from popek.devices.virtio.mmio import EmptySlot
from popek.devices.virtio.net import VirtioNet, default_mac
from popek.devices.virtio.rng import VirtioRng
from popek.firmware.sbi import Sbi
from popek.machine import fdt
from popek.machine.clock import GuestClock
from popek.machine.config import ConfigError, MachineConfig, check
from popek.machine.image_cache import ImageCache
from popek.machine.loader import ImageError, load_kernel, read_image
from popek.net.backend import NetBackend

RAM_BASE = 0x8000_0000
TEST_BASE, TEST_SIZE = 0x10_0000, 0x1000
RTC_BASE, RTC_SIZE, RTC_IRQ = 0x10_1000, 0x1000, 11
CLINT_BASE, CLINT_SIZE = 0x200_0000, 0x10000
PLIC_BASE, PLIC_SIZE, PLIC_NDEV = 0xC00_0000, 0x60_0000, 95
UART_BASE, UART_SIZE, UART_IRQ = 0x1000_0000, 0x100, 10
TIMEBASE_HZ = 10_000_000
KERNEL_OFFSET = 0x20_0000  # where firmware jumps to: RAM base + 2 MiB, as on QEMU
NEVER_SECONDS = 24 * 24 * 3600.0  # a timer further away than this counts as stopped (poll
# takes a timeout in milliseconds in a C int: ~24.8 days)
SLICE = 20_000  # instructions a hart runs before devices and timers are looked at
SPIN_REST_MAX = 8  # rounds a spinning hart sits out at most (one round: a slice each)
WAKING_INTERRUPTS = 0xAA  # M/S timer and software interrupts end a spinning hart's rest
STATE_VERSION = 2  # of save_state(): bump when its layout changes (2: ctl holds the LR reservation)
HART_BUFFERS = ("x", "f", "ctl", "csr")

OPENSBI_PATHS = (
    "/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_jump.bin",
    "/usr/share/qemu/opensbi-riscv64-generic-fw_dynamic.bin",
)


class VirtMachine:
    """One guest: RAM, devices, harts and firmware, runnable until it powers off."""

    def __init__(self, config: MachineConfig, console_out: Callable[[bytes], None], *,
                 memory: PhysicalMemory | None = None,
                 state: dict[str, Any] | None = None,
                 clock: GuestClock | None = None,
                 nets: Sequence[NetBackend] = (),
                 events: HostEvents | None = None,
                 opener: Callable[..., int] = os.open,
                 image_cache: ImageCache | None = None,
                 blank: bool = False) -> None:
        """Boot ``config`` from its images, or, given the ``state`` a machine saved (and
        ``memory`` holding its RAM), carry on exactly where that machine was; ``blank``,
        neither: the board is built and waits for :meth:`load_state` (a migration's
        destination builds it while RAM arrives, so that the guest's downtime does not
        include the building). ``clock``
        is guest time (by default the host's, see GuestClock). ``opener`` opens the host
        files the configuration names, as os.open does; a VMM worker's hands out the
        descriptors the VMM opened for it, and opens nothing; ``image_cache`` keeps
        decompressed images across boots (a worker has none). Likewise ``nets`` are the
        open backends of ``config.nics``, one each, and ``events`` the machine runner
        their NICs wait on: the board is handed its network, it opens nothing itself."""
        check(config)
        if config.kernel is None:
            raise ConfigError("no kernel: the machine needs --kernel")
        if len(nets) != len(config.nics) or (nets and events is None):
            raise ConfigError(f"{len(config.nics)} NICs configured but {len(nets)} network "
                              "backends given" + ("" if events else " and no runner"))
        self.config = config
        self.opener = opener
        self.image_cache = image_cache
        self.console_out = console_out
        self.exit: tuple[str, int] | None = None
        # Instructions a hart runs per slice: a live migration's auto-converge lowers it,
        # so that a slice cannot dirty more than the link can drain.
        self.slice_instructions = SLICE
        # Spinning harts (see run_slice): rounds each sits out next, how many it sat out
        # last time, the interrupts pending then; counts of slices cut short and of
        # rounds sat out.
        self._spin_rest = [0] * config.cpus
        self._spin_backoff = [0] * config.cpus
        self._spin_interrupts = [0] * config.cpus  # waking ones pending as it began to rest
        self.spin_yields = self.spin_rests = 0
        if memory is not None and (memory.base, memory.size) != (RAM_BASE, config.mem):
            raise ConfigError(f"RAM of {memory.size >> 20}M at {memory.base:#x} does not fit "
                              f"--mem {config.mem >> 20}M")
        self.mem = memory if memory is not None else PhysicalMemory(RAM_BASE, config.mem)
        self.harts = [Hart(self.mem, i, engine=config.engine) for i in range(config.cpus)]
        self.clock = clock if clock is not None else GuestClock()
        self.clint = Clint(self.harts, self.clock.ticks)
        for hart in self.harts:
            hart.time = self.clint.mtime
        self.plic = Plic(self.harts)
        self.uart = Uart16550(console_out, self.plic.irq_line(UART_IRQ))
        self.rtc = GoldfishRtc(self.plic.irq_line(RTC_IRQ), wall_clock=time.time_ns)
        self.finisher = Finisher(self.request_shutdown)
        self.virtio: list[VirtioMMIO] = []
        self.disks: list[VirtioBlk] = []
        try:
            for spec in config.disks:
                disk = VirtioBlk(str(spec.path), readonly=spec.readonly, opener=opener)
                self.disks.append(disk)
                self._add_virtio(disk)
        except OSError as err:
            raise ConfigError(str(err)) from None
        # NICs after the disks (whose slots stay where they were) and before the rng.
        self.nics: list[VirtioNet] = []
        for index, (spec, backend) in enumerate(zip(config.nics, nets, strict=True)):
            nic = VirtioNet(backend, spec.mac or default_mac(index), events)
            self.nics.append(nic)
            nic.attach(self._add_virtio(nic))
        if config.rng:
            self._add_virtio(VirtioRng())
        # Last, so that the slots of the devices before it stay where they were.
        self.agent_port: VirtioConsole | None = None
        if config.agent:
            self.agent_port = VirtioConsole()
            self.agent_port.attach(self._add_virtio(self.agent_port))
        self.balloon: VirtioBalloon | None = None
        if config.balloon:  # after the agent's port, for the same reason
            self.balloon = VirtioBalloon(self.mem)
            self.balloon.attach(self._add_virtio(self.balloon))
        for n in range(len(self.virtio), SLOT_COUNT):
            self.mem.add_device(SLOT_BASE + n * SLOT_SIZE, SLOT_SIZE, EmptySlot())
        self.sbi = Sbi(self) if config.bios == "popek" else None
        for base, size, dev in (
            (TEST_BASE, TEST_SIZE, self.finisher), (RTC_BASE, RTC_SIZE, self.rtc),
            (CLINT_BASE, CLINT_SIZE, self.clint), (PLIC_BASE, PLIC_SIZE, self.plic),
            (UART_BASE, UART_SIZE, self.uart),
        ):
            self.mem.add_device(base, size, dev)
        self._input = bytearray()
        if state is not None:
            self.load_state(state)
        elif not blank:
            self.boot()

    # -- building -----------------------------------------------------------------------
    def _add_virtio(self, backend) -> VirtioMMIO:
        n = len(self.virtio)
        if n >= SLOT_COUNT:
            raise ConfigError(f"at most {SLOT_COUNT} virtio devices")
        dev = VirtioMMIO(self.mem, backend, self.plic.irq_line(FIRST_IRQ + n))
        self.mem.add_device(SLOT_BASE + n * SLOT_SIZE, SLOT_SIZE, dev)
        self.virtio.append(dev)
        return dev

    def close(self) -> None:
        """The machine is done (powered off, or replaced by a reboot): close its disks
        and stop its NICs watching their backends, which their owner keeps or closes."""
        for disk in self.disks:
            disk.close()
        for nic in self.nics:
            nic.detach()

    def device_tree(self, initrd: tuple[int, int] | None) -> bytes:
        """The board as the guest sees it (like QEMU's generated virt device tree)."""
        plic_phandle, test_phandle = 0x200, 0x201
        root = fdt.Node("", {"#address-cells": 2, "#size-cells": 2,
                             "compatible": "riscv-virtio", "model": "riscv-virtio,qemu"})
        chosen = root.add("chosen", {"bootargs": self.config.append,
                                     "stdout-path": f"/soc/serial@{UART_BASE:x}"})
        if initrd:
            chosen.props["linux,initrd-start"] = fdt.u64(initrd[0])
            chosen.props["linux,initrd-end"] = fdt.u64(initrd[1])
        mem = self.config.mem
        root.add(f"memory@{RAM_BASE:x}", {"device_type": "memory",
                                          "reg": [0, RAM_BASE, mem >> 32, mem & 0xFFFFFFFF]})
        cpus = root.add("cpus", {"#address-cells": 1, "#size-cells": 0,
                                 "timebase-frequency": TIMEBASE_HZ})
        intc = [0x100 + hart.hartid for hart in self.harts]
        for hart in self.harts:
            cpu = cpus.add(f"cpu@{hart.hartid}", {
                "device_type": "cpu", "reg": hart.hartid, "status": "okay",
                "compatible": "riscv", "riscv,isa": extensions.ISA_STRING,
                "riscv,isa-base": extensions.BASE,
                "riscv,isa-extensions": list(extensions.EXTENSIONS),
                "riscv,cbom-block-size": extensions.CACHE_BLOCK_SIZE,
                "riscv,cbop-block-size": extensions.CACHE_BLOCK_SIZE,
                "riscv,cboz-block-size": extensions.CACHE_BLOCK_SIZE,
                "mmu-type": "riscv,sv48", "phandle": 1 + hart.hartid})
            cpu.add("interrupt-controller", {
                "#interrupt-cells": 1, "interrupt-controller": b"",
                "compatible": "riscv,cpu-intc", "phandle": intc[hart.hartid]})
        cluster = cpus.add("cpu-map").add("cluster0")
        for hart in self.harts:
            cluster.add(f"core{hart.hartid}", {"cpu": 1 + hart.hartid})
        soc = root.add("soc", {"#address-cells": 2, "#size-cells": 2,
                               "compatible": "simple-bus", "ranges": b""})
        soc.add(f"test@{TEST_BASE:x}", {
            "compatible": ["sifive,test1", "sifive,test0", "syscon"],
            "reg": [0, TEST_BASE, 0, TEST_SIZE], "phandle": test_phandle})
        soc.add(f"rtc@{RTC_BASE:x}", {
            "compatible": "google,goldfish-rtc", "reg": [0, RTC_BASE, 0, RTC_SIZE],
            "interrupts": RTC_IRQ, "interrupt-parent": plic_phandle})
        soc.add(f"serial@{UART_BASE:x}", {
            "compatible": "ns16550a", "reg": [0, UART_BASE, 0, UART_SIZE],
            "clock-frequency": 3686400, "interrupts": UART_IRQ,
            "interrupt-parent": plic_phandle})
        soc.add(f"clint@{CLINT_BASE:x}", {
            "compatible": ["sifive,clint0", "riscv,clint0"],
            "reg": [0, CLINT_BASE, 0, CLINT_SIZE],
            "interrupts-extended": [v for p in intc for v in (p, 3, p, 7)]})
        soc.add(f"plic@{PLIC_BASE:x}", {
            "compatible": ["sifive,plic-1.0.0", "riscv,plic0"],
            "reg": [0, PLIC_BASE, 0, PLIC_SIZE], "phandle": plic_phandle,
            "riscv,ndev": PLIC_NDEV, "#interrupt-cells": 1, "#address-cells": 0,
            "interrupt-controller": b"",
            "interrupts-extended": [v for p in intc for v in (p, 11, p, 9)]})
        for n in range(len(self.virtio)):
            base = SLOT_BASE + n * SLOT_SIZE
            soc.add(f"virtio_mmio@{base:x}", {
                "compatible": "virtio,mmio", "reg": [0, base, 0, SLOT_SIZE],
                "interrupts": FIRST_IRQ + n, "interrupt-parent": plic_phandle})
        root.add("poweroff", {"compatible": "syscon-poweroff", "regmap": test_phandle,
                              "offset": 0, "value": 0x5555})
        root.add("reboot", {"compatible": "syscon-reboot", "regmap": test_phandle,
                            "offset": 0, "value": 0x7777})
        return fdt.build(root)

    def boot(self) -> None:
        """Place kernel, initrd, device tree (and firmware) in RAM and reset the harts.

        With popek's SBI the kernel starts in S-mode as firmware would leave it; otherwise
        every hart starts in M-mode at the boot ROM, which jumps to the firmware, or with
        ``--bios none`` to the kernel's entry, as QEMU's virt board does."""
        cfg = self.config
        firmware = firmware_path(cfg.bios)
        kernel = load_kernel(cfg.kernel, RAM_BASE, cfg.mem, self.opener,
                             physical=cfg.bios == "none", cache=self.image_cache)
        if firmware is not None and kernel.entry != RAM_BASE + KERNEL_OFFSET:
            raise ConfigError(f"kernel entry {kernel.entry:#x}: firmware jumps to "
                              f"{RAM_BASE + KERNEL_OFFSET:#x}")
        for seg in kernel.segments:
            self.mem.write(seg.addr, seg.data)
        initrd_range = None
        if cfg.initrd is not None:
            data = read_image(cfg.initrd, "initrd", cfg.mem, self.opener, self.image_cache)
            start = max(_align_up(kernel.end, 1 << 21), RAM_BASE + min(cfg.mem // 2, 128 << 20))
            if start + len(data) > _dtb_address(cfg.mem):
                raise ConfigError(f"initrd {cfg.initrd} does not fit in {cfg.mem >> 20}M of RAM")
            self.mem.write(start, data)
            initrd_range = (start, start + len(data))
        dtb = self.device_tree(initrd_range)
        dtb_addr = _dtb_address(cfg.mem)
        self.mem.write(dtb_addr, dtb)
        if self.sbi is not None:
            self.sbi.boot_hart(self.harts[0], kernel.entry, dtb_addr)
            self._route_ecalls_to_sbi()
            return
        start = kernel.entry
        if firmware is not None:
            fw = read_image(firmware, "firmware", cfg.mem, self.opener)
            if RAM_BASE + len(fw) > kernel.segments[0].addr:
                raise ConfigError(f"firmware {firmware} overlaps the kernel")
            self.mem.write(RAM_BASE, fw)
            start = RAM_BASE
        self.boot_rom = BootRom(start, dtb_addr, kernel.entry)
        self.mem.add_device(boot_rom.BASE, boot_rom.SIZE, self.boot_rom)
        for hart in self.harts:
            hart.pc = boot_rom.BASE

    def _route_ecalls_to_sbi(self) -> None:
        for hart in self.harts:
            hart.on_trap = _sbi_trap_handler(hart, self.sbi)

    # -- snapshots ----------------------------------------------------------------------
    def _devices(self) -> dict[str, Any]:
        devices = {"clint": self.clint, "plic": self.plic, "uart": self.uart, "rtc": self.rtc,
                   "finisher": self.finisher}
        if self.sbi is None:
            devices["boot_rom"] = self.boot_rom
        return devices

    def save_state(self) -> dict[str, Any]:
        """Harts, firmware and devices as plain data: everything but RAM and disk contents.

        Decoded code and TLB entries are caches, not state, and are left out.
        """
        return {
            "version": STATE_VERSION,
            "byteorder": sys.byteorder,  # of the hart buffers
            "harts": [{**{name: getattr(hart, name).tobytes().hex() for name in HART_BUFFERS},
                       "reservation": hart.reservation} for hart in self.harts],
            "firmware": self.sbi.state.save() if self.sbi is not None else None,
            "devices": {name: dev.save_state() for name, dev in self._devices().items()},
            "virtio": [dev.save_state() for dev in self.virtio],
            "input": self._input.hex(),
            "exit": self.exit,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Become the machine that saved ``state`` (RAM is the caller's business).

        Harts first, then devices, which re-drive their interrupt lines into ``mip``.
        Raises ValueError (or KeyError/TypeError) if ``state`` does not fit this machine.
        """
        if not isinstance(state, dict):
            raise ValueError(f"machine state is a {type(state).__name__}, not an object")
        if state.get("version") != STATE_VERSION or state.get("byteorder") != sys.byteorder:
            raise ValueError(f"machine state version {state.get('version')!r} "
                             f"({state.get('byteorder')}-endian) is not {STATE_VERSION} "
                             f"({sys.byteorder}-endian)")
        if len(state["harts"]) != len(self.harts) or len(state["virtio"]) != len(self.virtio):
            raise ValueError(f"saved machine has {len(state['harts'])} harts and "
                             f"{len(state['virtio'])} virtio devices, this one "
                             f"{len(self.harts)} and {len(self.virtio)}")
        if (state["firmware"] is None) != (self.sbi is None):
            raise ValueError("saved machine ran " + ("other firmware" if state["firmware"] is None
                             else "popek's SBI") + f", this one has --bios {self.config.bios}")
        if self.sbi is None:
            self.boot_rom = BootRom(RAM_BASE, 0, 0)
            self.mem.add_device(boot_rom.BASE, boot_rom.SIZE, self.boot_rom)
        for hart, saved in zip(self.harts, state["harts"], strict=True):
            for name in HART_BUFFERS:
                buf = getattr(hart, name)
                data = bytes.fromhex(saved[name])
                if len(data) != len(buf) * buf.itemsize:
                    raise ValueError(f"saved hart {hart.hartid} {name} has {len(data)} bytes")
                buf[:] = array(buf.typecode, data)
            reservation = saved["reservation"]
            if reservation is not None and not (type(reservation) is int
                                                and 0 <= reservation < 1 << 64):
                raise ValueError(f"saved hart {hart.hartid} reservation {reservation!r:.40}")
            hart.reservation = reservation
            hart.mmu.flush()
            hart.engine.flush()
        if self.sbi is not None:
            self.sbi.state.load(state["firmware"])
            self._route_ecalls_to_sbi()
        for name, dev in self._devices().items():
            dev.load_state(state["devices"][name])
        for dev, saved in zip(self.virtio, state["virtio"], strict=True):
            dev.load_state(saved)
        self._input = bytearray.fromhex(state["input"])
        self.exit = tuple(state["exit"]) if state["exit"] is not None else None

    # -- what the firmware and devices call ---------------------------------------------
    def request_shutdown(self, kind: str, code: int) -> None:
        if self.exit is None:
            self.exit = (kind, code)

    def console_write(self, data: bytes) -> None:
        self.console_out(data)

    def console_read(self, limit: int) -> bytes:
        data = bytes(self._input[:limit])
        del self._input[:limit]
        return data

    def feed_input(self, data: bytes) -> None:
        """Host keystrokes for the guest console (the UART, or SBI getchar)."""
        self._input += data

    # -- running ------------------------------------------------------------------------
    def _runnable(self, hart: Hart) -> bool:
        if self.sbi is not None and self.sbi.state.status[hart.hartid] != 0:
            return False
        hart.wake_if_interrupted()
        return not hart.waiting

    def _update_devices(self) -> None:
        self.clint.update()
        for hart in self.harts:
            hart.csrs.update_stimecmp()
        self.rtc.update()
        if self.sbi is not None:
            self.sbi.update_timers(self.clint.mtime())
        if self._input and self.uart.receiving() and self.uart.has_room():
            taken = self.uart.push_input(bytes(self._input))
            del self._input[:taken]

    def idle_seconds(self) -> float | None:
        """How long the host may sleep while every hart waits for an interrupt: until the
        earliest timer (None: no timer is armed, only a host event can wake the guest).
        Zero if a hart can run already: a timer that fired as the devices were updated,
        after the harts were looked at, has raised its interrupt and left no deadline."""
        if any(self._runnable(hart) for hart in self.harts):
            return 0.0
        ticks = [d for d in (self.clint.next_deadline(),
                             self.sbi.next_deadline() if self.sbi else None,
                             *(hart.csrs.stimecmp_deadline() for hart in self.harts))
                 if d is not None]
        waits = [self.rtc.seconds_to_alarm()]
        if ticks:
            wait = max(0.0, (min(ticks) - self.clint.mtime()) / TIMEBASE_HZ)
            # A compare register set to all ones (how Linux and OpenSBI stop a timer) is
            # 58,000 years away, beyond what the host's poll can wait: no deadline at all.
            if wait < NEVER_SECONDS:
                waits.append(wait)
        return min((w for w in waits if w is not None), default=None)

    def run_slice(self) -> bool:
        """Give every runnable hart one slice; False if all of them were waiting.

        A hart seen spinning (see :mod:`popek.engine.spin`) ends its slice there and sits
        out the next rounds, twice as many each time it spins again (up to
        SPIN_REST_MAX), while another hart has work and no new timer or software
        interrupt calls it back: pause-loop exiting and a directed yield, as a hypervisor
        does for vCPUs."""
        ran = False
        resting = {hart for hart in self.harts if self._spin_rest[hart.hartid]
                   and not self._interrupts(hart) & ~self._spin_interrupts[hart.hartid]}
        if not any(self._runnable(hart) and hart not in resting for hart in self.harts):
            resting = set()  # no hart is working: none gives way
        for hart in self.harts:
            if hart in resting:
                self._spin_rest[hart.hartid] -= 1
                self.spin_rests += 1
            elif self._runnable(hart):
                # The harts that would run side by side on real hardware share this thread.
                budget = self.slice_instructions
                busy = sum(self._runnable(h) and h not in resting for h in self.harts)
                self.clock.start_slice(busy, budget)
                self.clock.end_slice(hart.run(budget, spins=busy > 1))
                self._after_slice(hart)
                ran = True
            self._update_devices()
            if self.exit is not None or hart.engine.debug_stop is not None:
                break  # powered off, or a debugger stopped the machine
        if not ran:
            self.clock.idle()
        return ran

    def _after_slice(self, hart: Hart) -> None:
        # Other harts and devices write memory before this hart runs again, and nothing
        # here watches its reserved address: its next sc must fail.
        hart.reservation = None
        index = hart.hartid
        if hart.engine.spun:
            self.spin_yields += 1
            self._spin_backoff[index] = min(2 * self._spin_backoff[index] or 1, SPIN_REST_MAX)
            self._spin_rest[index] = self._spin_backoff[index]
            self._spin_interrupts[index] = self._interrupts(hart)
        else:
            self._spin_backoff[index] = self._spin_rest[index] = 0

    @staticmethod
    def _interrupts(hart: Hart) -> int:
        """The hart's timer and software interrupts that are pending and enabled. Not the
        external ones: a level-triggered line that stays raised (xv6 never acknowledges
        the UART's transmitter interrupt, so on QEMU as here it stays raised while xv6
        runs) drops and rises again each time a hart claims and completes it at the
        PLIC, which is no news; and while this hart rests, another may take it."""
        return hart.csr[MIP] & hart.csr[MIE] & WAKING_INTERRUPTS


def _sbi_trap_handler(hart: Hart, sbi: Sbi) -> Callable[[int, int, int], int]:
    """Environment calls from S-mode are SBI hypercalls; every other trap is architectural."""

    def on_trap(cause: int, tval: int, pc: int) -> int:
        if cause == ECALL_S:
            return sbi.handle_ecall(hart, pc)
        return trap_unit.take_trap(hart, cause, tval, pc)

    return on_trap


def firmware_path(bios: str) -> Path | None:
    """The firmware file ``--bios`` names (None: popek's own SBI, or none at all)."""
    if bios in ("popek", "none"):
        return None
    if bios == "opensbi":
        for candidate in OPENSBI_PATHS:
            if Path(candidate).exists():
                return Path(candidate)
        raise ConfigError("--bios opensbi: Debian's OpenSBI is missing "
                          "(apt-get install opensbi)")
    return Path(bios)


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def _dtb_address(mem: int) -> int:
    """Where the device tree goes, as on QEMU: the last 2 MiB boundary it fits below, from
    the end of RAM or 3 GiB, whichever is lower (32-bit code reaches it). popek's tree is
    a few KiB, so that is 2 MiB below."""
    return min(RAM_BASE + mem, 0xC000_0000) - (2 << 20)


__all__ = ["ConfigError", "ImageError", "VirtMachine"]
