"""One guest's run across its reboots, in this process: what ``popek run`` and
``popek.Machine`` share (a VMM worker is the other host of the machine runner).

A reboot builds a new board on the same configuration, while the network's host ends,
opened once here, outlive it as a cable outlives a reset. Instructions and traps are
counted over the whole run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from popek.machine.agent import AgentLink, relink
from popek.machine.config import MachineConfig
from popek.machine.image_cache import default_cache
from popek.machine.runner import MachineRunner
from popek.machine.virt import VirtMachine
from popek.stats import count_traps

if TYPE_CHECKING:
    from popek.net.endpoint import OpenedNic
    from popek.vmm.snapshot import Snapshot


class GuestSession:
    """Boots ``config`` (or carries on from ``snapshot``) and steps it until it powers off."""

    def __init__(self, config: MachineConfig, console_out: Callable[[bytes], None],
                 snapshot: Snapshot | None = None,
                 on_reboot: Callable[[], None] | None = None) -> None:
        self.config = config
        self.console_out = console_out
        self.on_reboot = on_reboot
        self.runner = MachineRunner()
        self.image_cache = default_cache()  # a reboot finds its images there too
        self.traps: Counter[int] = Counter()
        self.exit_code: int | None = None
        self.agent: AgentLink | None = None  # the current machine's guest agent
        self._counted = 0  # instructions of the machines reboots replaced (less a restored one's)
        self._opened = _open_nics(config)
        self._nets = [nic.end.backend() for nic in self._opened]
        try:
            if snapshot is not None:
                self._use(snapshot.machine(console_out, nets=self._nets,
                                           events=self.runner.sources))
                self._counted = -self._instret()
            else:
                self._boot()
        except BaseException:
            self.close()
            raise

    @property
    def machine(self) -> VirtMachine:
        return self.runner.machine

    @property
    def instructions(self) -> int:
        return self._counted + self._instret()

    def _instret(self) -> int:
        return sum(hart.instret for hart in self.machine.harts)

    def _boot(self) -> None:
        self._use(VirtMachine(self.config, self.console_out, nets=self._nets,
                              events=self.runner.sources, image_cache=self.image_cache))

    def _use(self, machine: VirtMachine) -> None:
        count_traps(machine.harts, self.traps)
        self.runner.machine = machine
        self.agent = relink(self.agent, machine.agent_port)

    def step(self, max_wait: float | None = None) -> bool:
        """One turn of the runner; False once the guest has powered off (``exit_code``)."""
        if self.exit_code is not None:
            return False
        self.runner.step(max_wait)
        if self.machine.exit is None:
            return True
        kind, code = self.machine.exit
        self.machine.close()
        if kind != "reboot":
            self.exit_code = code
            if self.agent is not None:
                self.agent.abandon(f"the guest powered off (exit code {code})")
            return False
        self._counted += self._instret()
        self._boot()
        if self.on_reboot is not None:
            self.on_reboot()
        return True

    def close(self) -> None:
        if self.agent is not None:
            self.agent.abandon("the machine stopped")
        if self.runner.machine is not None and self.exit_code is None:
            self.runner.machine.close()
        self.runner.close()
        for backend in self._nets:
            backend.close()
        for nic in self._opened:
            nic.close()


def _open_nics(config: MachineConfig) -> list[OpenedNic]:
    """The host ends of the machine's NICs, opened."""
    if not config.nics:
        return []
    from popek.net.endpoint import open_nics  # sockets, passt: ~8 ms a guest without NICs saves

    return open_nics(config.nics, [nic.mac for nic in config.nics])
