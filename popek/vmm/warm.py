"""Imported once by the server that forks worker processes, to pay one-off costs there.

The first hart a process builds generates the engine's handler tables (about 0.1 s) and
reads the stencil library; building a throwaway one here means every worker forks with
them ready. LLVM is loaded here too: a hart loads it only once tier 2 has work, and a
confined worker could not import it then (nor would it share its pages); pyelftools
likewise, which the kernel loader imports only for an ELF kernel, the decompressors, which
it imports only for a compressed image, and the network's host ends, which a boot without
NICs does not import. Freezing the garbage collector's view of everything imported so
far keeps the workers' collections from touching those objects, so their pages stay
shared with this server instead of being copied into every worker.
"""

import gc
import gzip  # noqa: F401 - for compressed images (popek.machine.loader)
import lzma  # noqa: F401 - likewise

import elftools.elf.elffile  # noqa: F401 - for ELF kernels (popek.machine.loader)

from popek.cpu.hart import Hart
from popek.cpu.physmem import PhysicalMemory
from popek.engine import jit
from popek.net import endpoint  # noqa: F401 - the NICs' host ends a worker is handed
from popek.vmm import worker  # noqa: F401 - the module every worker runs

Hart(PhysicalMemory(0x8000_0000, 1 << 20))
if jit.available():
    jit.binding()
gc.freeze()
