"""What the stub debugs: a ``popek run`` machine (through its runner) or a process VM."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from popek.cpu.causes import LOAD_PAGE_FAULT, Trap
from popek.cpu.pagewalk import debug_translate
from popek.gdb.stub import Exited
from popek.user.control import ProcessExit, Terminated

if TYPE_CHECKING:
    from popek.cpu.hart import Hart
    from popek.cpu.physmem import PhysicalMemory
    from popek.machine.runner import MachineRunner
    from popek.user.process import Process


class MachineTarget:
    """A guest machine: its harts are the threads; halting pauses its runner, which also
    stops the guest's clock, so a guest held at a breakpoint sees no time pass."""

    attached = True  # a debugger leaving lets the machine run on, as QEMU's

    def __init__(self, runner: MachineRunner) -> None:
        self.runner = runner

    @property
    def harts(self) -> list[Hart]:
        return self.runner.machine.harts  # a reboot brings new harts

    @property
    def mem(self) -> PhysicalMemory:
        return self.runner.machine.mem

    def translate(self, hart: Hart, vaddr: int) -> int:
        return debug_translate(hart, vaddr)

    def step(self, hart: Hart) -> None:
        hart.step(interrupts=False)

    def pause(self) -> None:
        self.runner.pause()

    def resume(self) -> None:
        self.runner.resume()


class ProcessTarget:
    """A process VM: one hart, identity-mapped memory where the process has mappings."""

    attached = False  # the debugger's process: it kills it when it leaves, as qemu-user's

    def __init__(self, process: Process) -> None:
        self.process = process

    @property
    def harts(self) -> list[Hart]:
        return [self.process.hart]

    @property
    def mem(self) -> PhysicalMemory:
        return self.process.mem

    def translate(self, hart: Hart, vaddr: int) -> int:
        if self.process.space.find(vaddr) is None:
            raise Trap(LOAD_PAGE_FAULT, vaddr)
        return vaddr

    def run(self) -> None:
        """One slice of the process; raises Exited when it ends."""
        with _ending():
            self.process.run_slice()

    def step(self, hart: Hart) -> None:
        with _ending():
            self.process.run_slice(step=True)

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass


@contextmanager
def _ending() -> Iterator[None]:
    """Turns the process's end into the stub's Exited."""
    try:
        yield
    except ProcessExit as end:
        raise Exited(end.status) from None
    except Terminated as end:
        raise Exited(signal=end.sig) from None
