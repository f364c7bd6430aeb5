"""The interpreter, the translation tier and the native tier agree on random programs, and
with wabt.

Random valid modules (``wasm_programs``) are assembled by wabt's ``wat2wasm`` and each
export is called with random arguments on both tiers: the results (as bits), the trap
messages, the memory afterwards and the fuel left must be identical. The same programs
called without arguments must give what wabt's interpreter (``wasm-interp``) prints.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest
from wasm_programs import ProgramGenerator, assert_runs_as_wasm_interp

import popek.wasm as wasm

SEEDS = range(6)


def _outcome(inst: wasm.Instance, name: str, args: list[int]) -> tuple:
    f = inst.exports[name]
    assert isinstance(f, wasm.Function)
    try:
        return ("ok", f.call_raw(list(args)))
    except wasm.Trap as trap:
        return ("trap", trap.message)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: ./quickstart installs Debian's wabt")
    return path


def _assemble(text: str, tmp_path: Path) -> Path:
    (tmp_path / "m.wat").write_text(text)
    subprocess.run([_tool("wat2wasm"), str(tmp_path / "m.wat"), "-o", str(tmp_path / "m.wasm")],
                   check=True, timeout=60)
    return tmp_path / "m.wasm"


@pytest.mark.parametrize("seed", SEEDS)
def test_tiers_agree_on_random_programs(seed: int, tmp_path: Path) -> None:
    module = wasm.load(_assemble(ProgramGenerator(seed).module(40), tmp_path).read_bytes())
    tiers = [wasm.instantiate(module, engine=e, fuel=100_000)
             for e in ("interp", "translate", "jit")]
    rng = random.Random(seed)
    outcomes: dict[str, int] = {"ok": 0, "trap": 0}
    for name, f in tiers[0].exports.items():
        if not isinstance(f, wasm.Function):
            continue
        for _ in range(4):
            args = [rng.getrandbits(32 if t in ("i32", "f32") else 64) for t in f.type.params]
            interp, *others = (_outcome(inst, name, args) for inst in tiers)
            assert others == [interp] * len(others), (name, args)
            outcomes[interp[0]] += 1
    native = tiers[2].native  # every function of the random programs runs natively
    assert len(native.compiled) == len(module.codes)
    for inst in tiers[1:]:
        assert inst.mems[0].data == tiers[0].mems[0].data
        assert inst.fuel == tiers[0].fuel
    assert outcomes["ok"] > 20 and outcomes["trap"] > 10, outcomes


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_random_programs_agree_with_wasm_interp(seed: int, tmp_path: Path) -> None:
    """wasm-interp calls every export that takes no arguments, in order (memory carries
    over): the thunks call each function with constant arguments."""
    path = _assemble(ProgramGenerator(seed).module(30, thunks=True), tmp_path)
    assert_runs_as_wasm_interp(path, _tool("wasm-interp"))
