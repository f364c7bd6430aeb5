"""Build the official RISC-V ISA tests' "p" environment with popek's riscv_test.h, and run
each under ``--bios none`` on every tier, as QEMU runs them with ``-bios none -kernel``.

The suite is not in a package registry, so this is run by hand, never in CI::

    git clone https://github.com/riscv-software-src/riscv-tests   (and its env submodule)
    .venv/bin/python images/riscv-tests/run.py RISCV_TESTS_DIR [SUITE...] [--tiers jit,...]

A test passes when it writes 0x5555 to the virt board's test finisher; a failing one writes
its failing case number there (see riscv_test.h), and one that does neither within its
instruction budget is reported as hung. Prints one line per failure and the counts.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from popek.machine.config import MIN_RAM, MachineConfig
from popek.machine.virt import VirtMachine

HERE = Path(__file__).resolve().parent
GCC = "riscv64-linux-gnu-gcc"
# The suites and the -march each is built with, as the suite's isa/Makefile builds them.
SUITES = {
    "rv64ui": "rv64g", "rv64um": "rv64g", "rv64ua": "rv64g", "rv64uf": "rv64g",
    "rv64ud": "rv64g", "rv64uc": "rv64g", "rv64si": "rv64g", "rv64mi": "rv64g",
    "rv64uzba": "rv64g_zba", "rv64uzbb": "rv64g_zbb", "rv64uzbc": "rv64g_zbc",
    "rv64uzbs": "rv64g_zbs", "rv64uzicond": "rv64g", "rv64mzicbo": "rv64g_zicboz",
    "rv64ssvnapot": "rv64g",
}
BUDGET = 20_000_000  # instructions: the longest test needs well under a million


def test_names(isa: Path, suite: str) -> list[str]:
    """The ``<suite>_sc_tests`` its Makefrag lists."""
    text = (isa / suite / "Makefrag").read_text()
    match = re.search(rf"^{suite}_sc_tests\s*=((?:.*\\\n)*.*)$", text, re.MULTILINE)
    return match.group(1).replace("\\", " ").split() if match else []


def build(src: Path, out: Path, suite: str, name: str) -> tuple[str, Path | None, str]:
    elf = out / f"{suite}-p-{name}"
    cmd = [GCC, f"-march={SUITES[suite]}", "-mabi=lp64d", "-static", "-mcmodel=medany",
           "-fvisibility=hidden", "-nostdlib", "-nostartfiles", "-fno-pic", "-no-pie",
           "-Wl,--build-id=none", f"-I{HERE}", f"-I{src / 'env'}",
           f"-I{src / 'isa' / 'macros' / 'scalar'}", f"-T{HERE / 'link.ld'}",
           *(["-include", str(HERE / "zicond.h")] if suite == "rv64uzicond" else []),
           str(src / "isa" / suite / f"{name}.S"), "-o", str(elf)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    return elf.name, elf if done.returncode == 0 else None, done.stderr.strip()


def run(elf: Path, tier: str) -> str:
    """"pass", or why not."""
    config = MachineConfig(kernel=elf, bios="none", mem=MIN_RAM, rng=False, agent=False,
                           engine=tier)
    output = bytearray()
    machine = VirtMachine(config, output.extend)
    retired = 0
    while machine.exit is None and retired < BUDGET:
        machine.run_slice()
        retired += 20_000
    machine.close()
    if machine.exit is None:
        return "hung"
    kind, code = machine.exit
    if (kind, code) == ("poweroff", 0):
        return "pass"
    hart = machine.harts[0]
    if code & 1337 == 1337:  # the environment's mark of a trap the test did not expect
        return f"unexpected trap (finisher code {code:#x}, mcause {hart.csr[0x342]:#x}, " \
               f"mepc {hart.csr[0x341]:#x})"
    return f"failed case {code >> 1}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("riscv_tests", type=Path, help="a riscv-tests checkout with env/")
    parser.add_argument("suites", nargs="*", default=list(SUITES), help=", ".join(SUITES))
    parser.add_argument("--tiers", default="jit,translate,interp")
    parser.add_argument("--only", default="", help="a regular expression test names match")
    args = parser.parse_args()
    unknown = set(args.suites) - set(SUITES)
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(s, n) for s in args.suites for n in test_names(args.riscv_tests / "isa", s)
                if re.search(args.only, f"{s}-p-{n}")]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            built = list(pool.map(lambda j: build(args.riscv_tests, Path(tmp), *j), jobs))
        for name, elf, err in built:
            if elf is None:
                print(f"{name}: does not build: {err.splitlines()[-1] if err else '?'}")
        elves = [elf for _, elf, _ in built if elf is not None]
        failures = 0
        for tier in args.tiers.split(","):
            passed = 0
            for elf in elves:
                result = run(elf, tier)
                if result == "pass":
                    passed += 1
                else:
                    print(f"{tier} {elf.name}: {result}", flush=True)
            failures += len(elves) - passed
            print(f"{tier}: {passed}/{len(elves)} pass ({len(jobs) - len(elves)} did not "
                  "build)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
