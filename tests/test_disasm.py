"""``popek disasm`` prints what GNU objdump (binutils 2.40) prints, on code no one here wrote.

The oracle is ``riscv64-linux-gnu-objdump -d``: on busybox (cross-built from Debian's source)
and Debian's riscv64 libc every instruction must have objdump's mnemonic and operands, and
the labels, ``...`` runs and section headers between them must agree too. Synthetic files
then reach what compiled code rarely contains: every 16-bit encoding, every CSR number,
every fence, and random instances of every declared instruction.
"""

from __future__ import annotations

import random
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import bitmanip_program
import pytest

from popek.isa.decoder import ALL_INSNS, BY_NAME
from popek.isa.disasm import (
    ALIASES,
    COMPRESSED_ALIASES,
    CSR_NAMES,
    Disassembler,
    disassemble_elf,
)
from popek.isa.rv64c import CINSNS

REPO = Path(__file__).resolve().parent.parent
BUSYBOX = REPO / "images" / "programs" / "busybox"
LIBC = Path("/usr/riscv64-linux-gnu/lib/libc.so.6")
OBJDUMP = "riscv64-linux-gnu-objdump"
INSN_LINE = re.compile(r" *([0-9a-f]+):\t([^\t]*)\t?(.*)$")


def start_objdump(path: Path, *options: str) -> subprocess.Popen[str]:
    exe = shutil.which(OBJDUMP)
    if exe is None:
        pytest.fail(f"{OBJDUMP} not found: apt-get install binutils-riscv64-linux-gnu")
    return subprocess.Popen([exe, "-d", *options, str(path)], stdout=subprocess.PIPE, text=True)


def split(lines: Iterable[str]) -> tuple[dict[int, tuple[str, str]], list[str]]:
    """Instruction lines by address as (mnemonic, operands), and all other lines in order."""
    insns: dict[int, tuple[str, str]] = {}
    other: list[str] = []
    for line in lines:
        m = INSN_LINE.match(line)
        if m:
            insns[int(m[1], 16)] = (m[2], m[3])
        else:
            other.append(line)
    return insns, other


def assert_matches_objdump(path: Path) -> None:
    """Compare instruction by instruction, reporting match rates and the first mismatches."""
    objdump = start_objdump(path, "--no-show-raw-insn")
    mine = list(disassemble_elf(path))  # while objdump works
    ref_lines = objdump.communicate()[0].splitlines()
    assert objdump.returncode == 0
    if mine == ref_lines:  # the usual case, checked fast
        count = sum(1 for line in ref_lines if ":\t" in line)
        print(f"{path.name}: {count} instructions; all lines as objdump prints them")
        return
    ref, ref_other = split(ref_lines)
    got, got_other = split(mine)
    missing, extra = sorted(ref.keys() - got.keys()), sorted(got.keys() - ref.keys())
    assert not missing and not extra, (
        f"addresses only objdump prints: {[hex(a) for a in missing[:10]]}, "
        f"only popek prints: {[hex(a) for a in extra[:10]]}")
    bad_mnemonics = [(a, ref[a], got[a]) for a in ref if ref[a][0] != got[a][0]]
    bad_operands = [(a, ref[a], got[a]) for a in ref if ref[a] != got[a]]
    n = len(ref)
    print(f"{path.name}: {n} instructions; mnemonics {100 * (n - len(bad_mnemonics)) / n:.4f}%"
          f", operands {100 * (n - len(bad_operands)) / n:.4f}% as objdump")

    def show(bad: list[tuple[int, tuple[str, str], tuple[str, str]]]) -> str:
        return "\n".join(f"{a:x}: objdump {' '.join(r)!r} popek {' '.join(g)!r}"
                         for a, r, g in bad[:20])

    assert not bad_mnemonics, f"{len(bad_mnemonics)} mnemonics differ:\n{show(bad_mnemonics)}"
    assert not bad_operands, f"{len(bad_operands)} operands differ:\n{show(bad_operands)}"
    assert got_other == ref_other  # labels, section headers, "..." for zeros


def test_busybox_disassembles_as_objdump_does() -> None:
    if not BUSYBOX.exists():
        pytest.fail(f"{BUSYBOX} is missing: build it with images/recipes/busybox.sh")
    assert_matches_objdump(BUSYBOX)


def test_debian_libc_disassembles_as_objdump_does() -> None:
    if not LIBC.exists():
        pytest.skip("Debian's riscv64 libc is not installed (apt-get install libc6-riscv64-cross)")
    assert_matches_objdump(LIBC)


# --- Synthetic files: a .text section of chosen encodings. ----------------------------------

SHT_RISCV_ATTRIBUTES = 0x70000003


def riscv_attributes(arch: str) -> bytes:
    """A .riscv.attributes section declaring ``arch`` (Tag_RISCV_arch = 5)."""
    attrs = b"\x05" + arch.encode() + b"\0"
    file_tag = b"\x01" + struct.pack("<I", 5 + len(attrs)) + attrs
    vendor = b"riscv\0" + file_tag
    return b"A" + struct.pack("<I", 4 + len(vendor)) + vendor


def make_elf(code: bytes, machine: int = 243, arch: str | None = None) -> bytes:
    """A minimal ELF64 executable: .text at 0x10000, optionally .riscv.attributes."""
    names = b"\0.text\0.shstrtab\0.riscv.attributes\0"
    attrs = riscv_attributes(arch) if arch else b""
    text_off, names_off = 64, 64 + len(code)
    attrs_off = names_off + len(names)
    shoff = (attrs_off + len(attrs) + 7) & ~7
    count = 4 if attrs else 3
    header = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack(
        "<HHIQQQIHHHHHH", 2, machine, 1, 0x10000, 0, shoff, 0x5, 64, 0, 0, 64, count, 2)

    def shdr(name: int, kind: int, flags: int, addr: int, offset: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, kind, flags, addr, offset, size, 0, 0, 1, 0)

    sections = (shdr(0, 0, 0, 0, 0, 0) + shdr(1, 1, 6, 0x10000, text_off, len(code))
                + shdr(7, 3, 0, 0, names_off, len(names)))
    if attrs:
        sections += shdr(17, SHT_RISCV_ATTRIBUTES, 0, 0, attrs_off, len(attrs))
    body = header + code + names + attrs
    return body + bytes(shoff - len(body)) + sections


def instance(pattern: str, rng: random.Random) -> int:
    """An encoding matching ``pattern``, its don't-care bits drawn at random (zeros often)."""
    bits = pattern.replace(" ", "")
    return int("".join(c if c != "." else rng.choice("0001") for c in bits), 2)


def words32(values: Iterable[int]) -> bytes:
    return b"".join(struct.pack("<I", w) for w in values)


def synthetic(tmp_path: Path, name: str, code: bytes, arch: str | None = None) -> Path:
    path = tmp_path / name
    path.write_bytes(make_elf(code, arch=arch))
    return path


def test_bit_manipulation_program_disassembles_as_objdump(tmp_path: Path) -> None:
    assert_matches_objdump(bitmanip_program.build(tmp_path))


def test_every_compressed_encoding_as_objdump(tmp_path: Path) -> None:
    halves = [h for h in range(0x10000) if h & 3 != 3]
    code = b"".join(struct.pack("<H", h) for h in halves)
    assert_matches_objdump(synthetic(tmp_path, "rvc.elf", code))


def test_random_instances_of_every_declared_instruction_as_objdump(tmp_path: Path) -> None:
    rng = random.Random(2024)
    words = [instance(ins.pattern, rng) for ins in ALL_INSNS for _ in range(60)]
    rng.shuffle(words)
    assert_matches_objdump(synthetic(tmp_path, "insns.elf", words32(words)))


def test_new_extensions_only_where_the_file_declares_them(tmp_path: Path) -> None:
    """objdump 2.40 names Zb*/Zicbo* instructions only in files whose ISA string has them
    (it does not know Zicond at all); random instances of every declared instruction."""
    rng = random.Random(2026)
    words = [instance(ins.pattern, rng) for ins in ALL_INSNS for _ in range(20)]
    words += [0x00006013 | rd << 7 | kind << 20 | rng.getrandbits(12) << 20 & 0xFE000000
              for kind in (0, 1, 3, 2) for rd in (0, 0, 5)]  # prefetch.i/r/w hints
    rng.shuffle(words)
    code = words32(words)
    arch = (
        "rv64i2p1_m2p0_a2p1_f2p2_d2p2_c2p0_zicsr2p0_zifencei2p0_zicbom1p0_zicbop1p0_zicboz1p0"
        "_zba1p0_zbb1p0_zbc1p0_zbs1p0")
    declared = synthetic(tmp_path, "zb.elf", code, arch=arch)
    assert_matches_objdump(declared)
    assert_matches_objdump(synthetic(tmp_path, "plain.elf", code))
    text = "\n".join(disassemble_elf(declared))
    assert "\tsh3add.uw\t" in text and "\tprefetch.w\t" in text and "\tcbo.zero\t" in text


def test_every_csr_number_and_fence_as_objdump(tmp_path: Path) -> None:
    csrr = [0x00002573 | csr << 20 for csr in range(4096)]  # csrrs a0, csr, zero
    csrw = [0x00059073 | csr << 20 for csr in range(4096)]  # csrrw zero, csr, a1
    fences = [0x0000000F | imm << 20 for imm in range(4096)]
    fences += [0x0000000F | 0x0FF << 20 | rd << 7 | rs1 << 15 for rd in (0, 5) for rs1 in (0, 9)]
    code = words32(csrr + csrw + fences + [0x0000100F, 0x0010100F, 0x0100000F])
    assert_matches_objdump(synthetic(tmp_path, "csr.elf", code))


def test_pause_only_where_the_file_declares_zihintpause(tmp_path: Path) -> None:
    code = words32([0x0100000F, 0x0FF0000F])
    plain = synthetic(tmp_path, "plain.elf", code, arch="rv64i2p1_m2p0_a2p1_c2p0")
    hinted = synthetic(tmp_path, "pause.elf", code, arch="rv64i2p1_c2p0_zihintpause2p0")
    assert_matches_objdump(plain)
    assert_matches_objdump(hinted)
    assert "pause" in "\n".join(disassemble_elf(hinted))


def test_raw_bytes_as_objdump_shows_them(tmp_path: Path) -> None:
    code = words32([0x00001517, 0x00850513]) + struct.pack("<HH", 0x050D, 0x0000) + bytes(12)
    path = synthetic(tmp_path, "raw.elf", code + words32([0x0000006F]))
    objdump = start_objdump(path)
    assert list(disassemble_elf(path, raw=True)) == objdump.communicate()[0].splitlines()


def test_compressed_instructions_spelled_as_binutils_2_40_does() -> None:
    dis = Disassembler()
    assert dis.format(0x10000, 0x050D, 2) == "add\ta0,a0,3"  # c.addi a0,3
    assert dis.format(0x10000, 0x4515, 2) == "li\ta0,5"  # c.li
    assert dis.format(0x10000, 0x852E, 2) == "mv\ta0,a1"  # c.mv
    assert dis.format(0x10000, 0x7139, 2) == "add\tsp,sp,-64"  # c.addi16sp
    assert dis.format(0x10000, 0x0000, 2) == "unimp"  # c.unimp


def test_auipc_pairs_get_objdumps_address_comment() -> None:
    dis = Disassembler()
    assert dis.format(0x10000, 0x00001517, 4) == "auipc\ta0,0x1"
    assert dis.format(0x10004, 0x00850513, 4) == "add\ta0,a0,8 # 0x11008"
    assert dis.format(0x10008, 0x00850513, 4) == "add\ta0,a0,8"  # the pair was used up


def test_alias_tables_name_declared_instructions() -> None:
    assert set(ALIASES) <= set(BY_NAME)
    compressed = {c.name for c in CINSNS}
    for key in COMPRESSED_ALIASES:
        cname, base = key.split(":")
        assert cname in compressed and base in BY_NAME, key
    assert CSR_NAMES[0x180] == "satp" and CSR_NAMES[0xC9F] == "hpmcounter31h"


# --- The command line. ------------------------------------------------------------------------


def run_popek(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "popek", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_disasm_prints_the_disassembly(tmp_path: Path) -> None:
    path = synthetic(tmp_path, "cli.elf", words32([0x00000013, 0x00008067]))
    done = run_popek("disasm", str(path))
    assert done.returncode == 0, done.stderr
    assert "   10000:\tnop\n   10004:\tret\n" in done.stdout


@pytest.mark.parametrize("kind", ["missing", "not ELF", "not RISC-V"])
def test_cli_disasm_rejects_unusable_files_in_one_line(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "input"
    if kind == "not ELF":
        path.write_text("#!/bin/sh\necho hello\n")
    elif kind == "not RISC-V":
        path.write_bytes(make_elf(words32([0x90909090]), machine=62))  # x86-64
    done = run_popek("disasm", str(path))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("popek disasm: error: ")
