"""Imported once by the server that forks worker processes, to pay one-off costs there.

The first hart a process builds generates the engine's handler tables (about 0.1 s);
building a throwaway one here means every worker forks with them ready, so a guest
starts in the time a fork and an image load take.
"""

from popek.cpu.hart import Hart
from popek.cpu.physmem import PhysicalMemory
from popek.vmm import worker  # noqa: F401 - the module every worker runs

Hart(PhysicalMemory(0x8000_0000, 1 << 20))
