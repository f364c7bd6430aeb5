"""C compiled to WebAssembly by Debian's clang (``tests/wasm/kernels.c``, freestanding):
every tier computes what wabt's ``wasm-interp`` computes, and ``popek wasm disasm`` prints
the code (with the names clang's "name" section gives) exactly as ``wasm2wat`` does.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from wasm_programs import assert_runs_as_wasm_interp

import popek.wasm as wasm
from popek.cli import main

SOURCE = Path(__file__).parent / "wasm" / "kernels.c"


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: ./quickstart installs Debian's {package}")
    return path


@pytest.fixture(scope="module", params=["-O0", "-O2"])
def kernels(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clang") / "kernels.wasm"
    subprocess.run([_tool("clang-14", "clang-14"), "--target=wasm32", request.param,
                    "-nostdlib", "-Wl,--no-entry", "-Wl,--export-all",
                    f"-fuse-ld={_tool('wasm-ld-14', 'lld-14')}", "-o", str(out), str(SOURCE)],
                   check=True, timeout=120)
    return out


def test_tiers_compute_what_wasm_interp_computes(kernels: Path) -> None:
    assert_runs_as_wasm_interp(kernels, _tool("wasm-interp", "wabt"))


def test_native_tier_compiles_every_kernel(kernels: Path) -> None:
    """The kernels above ran natively, not on the translation tier the native one falls
    back to (they use no instruction it refuses)."""
    module = wasm.load(kernels.read_bytes())
    inst = wasm.instantiate(module, engine="jit")
    assert inst.call("mix64") == wasm.instantiate(module, engine="interp").call("mix64")
    assert len(inst.native.compiled) == len(module.codes) > 10


def test_disasm_names_as_wasm2wat(kernels: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = subprocess.run([_tool("wasm2wat", "wabt"), str(kernels)], capture_output=True,
                          text=True, check=True, timeout=60).stdout.splitlines()
    want, in_func = [], False
    for line in text:
        in_func = line.startswith("  (func") or (in_func and line.startswith("    "))
        if in_func:
            want.append(line[:-1] if line == text[-1] else line)
    assert any(line.startswith("  (func $sort_checksum") for line in want)
    assert main(["wasm", "disasm", str(kernels)]) == 0
    assert capsys.readouterr().out.splitlines() == want
