"""A tiny RV64 encoder and hart factory for privileged-architecture tests.

Tests build short programs from these encoders so that every expected value (cause,
tval = instruction bits, addresses) is computed from the encoding rules, not copied
from the emulator's output.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from popek.cpu.hart import Hart
from popek.cpu.physmem import PhysicalMemory

RAM_BASE = 0x8000_0000
RAM_SIZE = 4 << 20
CLOCK = 123_456_789  # what the test harts' time CSR reads

SYSTEM = 0b1110011
AS = "riscv64-linux-gnu-as"


def i_type(opcode: int, rd: int, funct3: int, rs1: int, imm: int) -> int:
    return ((imm & 0xFFF) << 20) | (rs1 << 15) | (funct3 << 12) | (rd << 7) | opcode


def s_type(opcode: int, funct3: int, rs1: int, rs2: int, imm: int) -> int:
    imm &= 0xFFF
    return ((imm >> 5) << 25) | (rs2 << 20) | (rs1 << 15) | (funct3 << 12) \
        | ((imm & 0x1F) << 7) | opcode


def addi(rd: int, rs1: int, imm: int) -> int:
    return i_type(0b0010011, rd, 0, rs1, imm)


def ld(rd: int, rs1: int, imm: int = 0) -> int:
    return i_type(0b0000011, rd, 3, rs1, imm)


def sd(rs2: int, rs1: int, imm: int = 0) -> int:
    return s_type(0b0100011, 3, rs1, rs2, imm)


def jalr(rd: int, rs1: int, imm: int = 0) -> int:
    return i_type(0b1100111, rd, 0, rs1, imm)


def csrrw(rd: int, csr: int, rs1: int) -> int:
    return i_type(SYSTEM, rd, 1, rs1, csr)


def csrrs(rd: int, csr: int, rs1: int) -> int:
    return i_type(SYSTEM, rd, 2, rs1, csr)


def csrrc(rd: int, csr: int, rs1: int) -> int:
    return i_type(SYSTEM, rd, 3, rs1, csr)


def csrrwi(rd: int, csr: int, zimm: int) -> int:
    return i_type(SYSTEM, rd, 5, zimm, csr)


def csrr(rd: int, csr: int) -> int:
    return csrrs(rd, csr, 0)


def sfence_vma(rs1: int = 0, rs2: int = 0) -> int:
    return (0b0001001 << 25) | (rs2 << 20) | (rs1 << 15) | SYSTEM


ECALL = SYSTEM
EBREAK = (1 << 20) | SYSTEM
SRET = (0b0001000_00010 << 20) | SYSTEM
MRET = (0b0011000_00010 << 20) | SYSTEM
WFI = (0b0001000_00101 << 20) | SYSTEM
NOP = addi(0, 0, 0)


def code(*words: int) -> bytes:
    return b"".join(w.to_bytes(4, "little") for w in words)


def make_hart() -> Hart:
    """A hart in M-mode with RAM at 0x8000_0000 and a frozen clock."""
    return Hart(PhysicalMemory(base=RAM_BASE, size=RAM_SIZE), clock=lambda: CLOCK)


def load(hart: Hart, addr: int, *words: int) -> None:
    hart.mem.write(addr, code(*words))


def assemble(source: str) -> bytes:
    """Machine code of ``source`` placed at RAM_BASE, by binutils (uncompressed unless the
    source says ``# rvc``)."""
    if shutil.which(AS) is None:
        pytest.fail(f"{AS} is missing: apt-get install binutils-riscv64-linux-gnu")
    with tempfile.TemporaryDirectory() as tmp:
        src, obj, elf, raw = (Path(tmp) / n for n in ("p.S", "p.o", "p", "p.bin"))
        src.write_text(".option norvc\n" + source if "# rvc" not in source else source)
        subprocess.run([AS, "-march=rv64gc", "-o", str(obj), str(src)], check=True)
        subprocess.run(["riscv64-linux-gnu-ld", f"-Ttext={RAM_BASE:#x}", "-o", str(elf),
                        str(obj)], check=True)
        subprocess.run(["riscv64-linux-gnu-objcopy", "-O", "binary", str(elf), str(raw)],
                       check=True)
        return raw.read_bytes()
