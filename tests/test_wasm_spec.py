"""popek's WebAssembly core against wabt (Debian's ``wabt``), on hand-written spec scripts.

Each ``tests/wasm/*.wast`` script (one per instruction group, every trap, invalid and
malformed modules, linking) is converted by ``wast2json`` and run by ``popek wasm
spectest`` and by ``spectest-interp``, the oracle: the same commands must pass and fail.
``popek wasm disasm`` must print each module's functions exactly as ``wasm2wat`` does.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from popek.cli import main
from popek.wasm.spectest import ScriptRunner

SCRIPTS = sorted((Path(__file__).parent / "wasm").glob("*.wast"))
TIMEOUT = 60


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: ./quickstart installs Debian's wabt")
    return path


def _convert(script: Path, out: Path) -> Path:
    json_path = out / (script.stem + ".json")
    subprocess.run([_tool("wast2json"), str(script), "-o", str(json_path)], check=True,
                   timeout=TIMEOUT, capture_output=True)
    return json_path


def _wabt_failures(json_path: Path) -> tuple[set[int], int, int]:
    """The lines spectest-interp reports as failing, and its passed/total counts."""
    run = subprocess.run([_tool("spectest-interp"), json_path.name], cwd=json_path.parent,
                         capture_output=True, text=True, timeout=TIMEOUT)
    counts = re.search(r"(\d+)/(\d+) tests passed", run.stdout)
    assert counts, run.stdout + run.stderr
    failing = {int(m.group(1)) for m in re.finditer(r"^\S+\.wast:(\d+): (?!.*passed)",
                                                   run.stdout, re.M)}
    return failing, int(counts.group(1)), int(counts.group(2))


@pytest.mark.parametrize("engine", ["interp", "translate", "jit"])
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_script_agrees_with_spectest_interp(script: Path, engine: str, tmp_path: Path) -> None:
    json_path = _convert(script, tmp_path)
    out = io.StringIO()
    runner = ScriptRunner(json_path, out, engine)
    passed, total = runner.run()
    ours = {int(m.group(1)) for m in re.finditer(r"^\S+:(\d+): ", out.getvalue(), re.M)}
    wabt, wabt_passed, wabt_total = _wabt_failures(json_path)
    assert ours == wabt, out.getvalue()
    assert (passed + runner.skipped, total + runner.skipped) == (wabt_passed, wabt_total)
    assert passed == total > 0, out.getvalue()


def test_spectest_command_names_failures(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A wrong expectation is reported with its line, command, expected and actual value."""
    script = tmp_path / "wrong.wast"
    script.write_text('(module (func (export "f") (result i32) (i32.const 3)))\n'
                      '(assert_return (invoke "f") (i32.const 4))\n'
                      '(assert_trap (invoke "f") "unreachable")\n')
    json_path = _convert(script, tmp_path)
    assert main(["wasm", "spectest", str(json_path)]) == 1
    out = capsys.readouterr().out
    assert "wrong.json:2: assert_return 'f': expected i32:4, got i32:3" in out
    assert "wrong.json:3: assert_trap 'f': expected Trap 'unreachable', got success" in out
    assert out.rstrip().endswith("1/3 tests passed.")


def test_disasm_prints_what_wasm2wat_prints(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    modules = []
    for script in SCRIPTS:
        commands = json.loads(_convert(script, tmp_path).read_text())["commands"]
        modules += [tmp_path / c["filename"] for c in commands if c["type"] == "module"]
    assert len(modules) >= 10
    for wasm in modules:
        text = subprocess.run([_tool("wasm2wat"), str(wasm)], capture_output=True, text=True,
                              check=True, timeout=TIMEOUT).stdout.splitlines()
        last = text[-1]
        want, in_func = [], False
        for line in text:
            in_func = line.startswith("  (func") or (in_func and line.startswith("    "))
            if in_func:
                want.append(line[:-1] if line == last else line)  # the module's own ")"
        assert main(["wasm", "disasm", str(wasm)]) == 0
        assert capsys.readouterr().out.splitlines() == want, wasm
