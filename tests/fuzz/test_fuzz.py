"""The fuzz targets' short runs (tests/fuzz/run.py --ci): each replays its committed
corpus and its generated seeds, then tries a fixed number of new inputs from a fixed
seed, and must find nothing: no exception but the component's own errors, no hang,
no runaway memory. bench/fuzz.py runs the same targets for as long as one likes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from popek.isa.disasm import Disassembler
from tests.fuzz.decoder import check_word
from tests.fuzz.harness import ROOT, TARGETS


@pytest.mark.parametrize("name", TARGETS)
def test_fuzz_target_finds_nothing_in_its_corpus_and_fixed_seed_inputs(
        name: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "tests.fuzz.run", name, "--ci",
                             str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", timeout=900)
    findings = sorted(p.name for p in (tmp_path / "findings").glob("*"))
    assert result.returncode == 0, f"{findings}\n{result.stdout[-6000:]}"


def test_every_16_bit_parcel_decodes_or_is_illegal_and_disassembles() -> None:
    """The compressed encodings are few enough to try them all."""
    dis = Disassembler()
    for half in range(1 << 16):
        if half & 3 != 3:
            check_word(dis, 0x8020_0000, half, 2)
