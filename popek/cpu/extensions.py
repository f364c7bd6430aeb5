"""The ISA a popek hart implements, spelled as software discovers it.

The device tree tells the guest (``riscv,isa``, and ``riscv,isa-base`` with
``riscv,isa-extensions`` as QEMU 8 writes them); ``misa`` can only show the single-letter
part. Names are in the canonical order the ISA manual prescribes (and Linux expects):
single letters, then Z extensions by the category of their second letter (i before b),
then S extensions alphabetically.
"""

from __future__ import annotations

BASE = "rv64i"
SINGLE_LETTER = ("i", "m", "a", "f", "d", "c")
MULTI_LETTER = (
    "zicbom", "zicbop", "zicboz", "zicntr", "zicond", "zicsr", "zifencei", "zihintpause",
    "zihpm", "zba", "zbb", "zbc", "zbs", "sstc", "svnapot", "svpbmt",
)
EXTENSIONS = SINGLE_LETTER + MULTI_LETTER
ISA_STRING = "rv64" + "".join(SINGLE_LETTER) + "".join("_" + e for e in MULTI_LETTER)
CACHE_BLOCK_SIZE = 64  # bytes, for cbo.* and prefetch.*: QEMU's riscv,cbo*-block-size
