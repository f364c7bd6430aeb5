"""``popek wasm spectest``: run a test script in the JSON form wabt's ``wast2json`` writes.

Counts and reports like wabt's ``spectest-interp`` (``N/M tests passed.``), naming each
failure by line, command, expected and actual value. Commands on modules in the text
format (``assert_malformed``/``assert_invalid`` with ``module_type: text``) need a text
parser, which popek does not have; they are counted as skipped, not run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from popek.wasm import numeric
from popek.wasm.binary import Module
from popek.wasm.errors import InvalidModule, LinkError, MalformedModule, Trap, WasmError
from popek.wasm.instance import Function, HostFunction, Instance, instantiate
from popek.wasm.runtime import Global, Memory, Table


@dataclass(frozen=True)
class HostRef:
    """The host reference a script writes as ``ref.extern N``."""

    n: int


def spectest_module() -> dict[str, object]:
    """The ``spectest`` host module every script may import from."""
    def printer(*types: str) -> HostFunction:
        return HostFunction(list(types), [], lambda caller, *args: None)

    return {
        "print": printer(), "print_i32": printer("i32"), "print_i64": printer("i64"),
        "print_f32": printer("f32"), "print_f64": printer("f64"),
        "print_i32_f32": printer("i32", "f32"), "print_f64_f64": printer("f64", "f64"),
        "global_i32": Global("i32", False, 666), "global_i64": Global("i64", False, 666),
        "global_f32": Global("f32", False, numeric.b32(666.6)),
        "global_f64": Global("f64", False, numeric.b64(666.6)),
        "table": Table("funcref", 10, 20), "memory": Memory(1, 2),
    }


class ScriptFailure(Exception):
    """One command did not behave as the script expects."""


def _arg(v: dict) -> object:
    t, value = v["type"], v.get("value")
    if t in ("i32", "i64", "f32", "f64"):
        return int(value)
    if t in ("funcref", "externref"):
        if value == "null":
            return None
        return HostRef(int(value))
    raise ScriptFailure(f"unsupported value type {t}")


def _show(t: str, value: object) -> str:
    if t == "f32" and isinstance(value, int):
        return f"f32:{numeric.f32(value)!r} (0x{value:08x})"
    if t == "f64" and isinstance(value, int):
        return f"f64:{numeric.f64(value)!r} (0x{value:016x})"
    if value is None:
        return f"{t}:null"
    if isinstance(value, Function):
        return f"{t}:function"
    return f"{t}:{value}"


def _matches(expected: dict, got: object) -> bool:
    t, value = expected["type"], expected.get("value")
    if t in ("f32", "f64") and isinstance(value, str) and value.startswith("nan:"):
        if not isinstance(got, int):
            return False
        bits, exp_bits = (32, 8) if t == "f32" else (64, 11)
        frac = bits - 1 - exp_bits
        exp_mask = ((1 << exp_bits) - 1) << frac
        quiet = 1 << (frac - 1)
        payload = got & ((1 << frac) - 1)
        if got & exp_mask != exp_mask or payload == 0:
            return False
        return payload == quiet if value == "nan:canonical" else bool(payload & quiet)
    if t == "funcref" and value is not None and value != "null":
        return isinstance(got, Function)
    if t == "externref" and value is None:
        return got is not None
    return got == _arg(expected)


class ScriptRunner:
    def __init__(self, path: Path, out: TextIO, engine: str | None = None) -> None:
        self.path = path
        self.engine = engine
        self.dir = path.parent
        self.out = out
        self.registry: dict[str, dict[str, object]] = {"spectest": spectest_module()}
        self.named: dict[str, Instance] = {}
        self.current: Instance | None = None
        self.passed = self.total = self.skipped = 0

    def load(self, filename: str) -> Module:
        from popek.wasm import load
        return load((self.dir / filename).read_bytes())

    def instantiate(self, module: Module) -> Instance:
        return instantiate(module, self.registry, engine=self.engine)

    def action(self, action: dict) -> list:
        inst = self.named[action["module"]] if "module" in action else self.current
        if inst is None:
            raise ScriptFailure("no module instantiated")
        target = inst.exports.get(action["field"])
        if action["type"] == "get":
            if not isinstance(target, Global):
                raise ScriptFailure(f"no exported global {action['field']}")
            return [target.value]
        if not isinstance(target, Function):
            raise ScriptFailure(f"no exported function {action['field']}")
        args = [_arg(a) for a in action.get("args", [])]
        return target.call_raw(args)

    def run(self) -> tuple[int, int]:
        script = json.loads(self.path.read_text())
        for cmd in script["commands"]:
            handler = getattr(self, "cmd_" + cmd["type"], None)
            counted = cmd["type"] != "register"
            if cmd.get("module_type") == "text":
                self.skipped += 1
                continue
            if counted:
                self.total += 1
            try:
                if handler is None:
                    raise ScriptFailure("unsupported command")
                handler(cmd)
                if counted:
                    self.passed += 1
            except ScriptFailure as e:
                self.fail(cmd, str(e))
            except WasmError as e:
                self.fail(cmd, f"unexpected {type(e).__name__}: {e.message}")
            except Exception as e:  # noqa: BLE001 - a host exception is popek's bug: report it
                self.fail(cmd, f"host exception {type(e).__name__}: {e}")
        note = f" ({self.skipped} text-format commands skipped)" if self.skipped else ""
        print(f"{self.passed}/{self.total} tests passed.{note}", file=self.out)
        return self.passed, self.total

    def fail(self, cmd: dict, message: str) -> None:
        what = cmd["type"]
        if "action" in cmd:
            what += f" {cmd['action'].get('field', '')!r}"
        print(f"{self.path.name}:{cmd['line']}: {what}: {message}", file=self.out)

    def cmd_module(self, cmd: dict) -> None:
        try:
            inst = self.instantiate(self.load(cmd["filename"]))
        except WasmError as e:
            self.current = None
            raise ScriptFailure(f"module failed: {type(e).__name__}: {e.message}") from None
        self.current = inst
        if "name" in cmd:
            self.named[cmd["name"]] = inst

    def cmd_register(self, cmd: dict) -> None:
        inst = self.named[cmd["name"]] if "name" in cmd else self.current
        if inst is None:
            raise ScriptFailure("no module to register")
        self.registry[cmd["as"]] = dict(inst.exports)

    def cmd_action(self, cmd: dict) -> None:
        self.action(cmd["action"])

    def cmd_assert_return(self, cmd: dict) -> None:
        got = self.action(cmd["action"])
        expected = cmd["expected"]
        if len(got) != len(expected) or not all(
                _matches(e, g) for e, g in zip(expected, got, strict=True)):
            want = ", ".join(_show(e["type"], e.get("value")) for e in expected)
            have = ", ".join(_show(e["type"], g) for e, g in zip(expected, got, strict=False))
            raise ScriptFailure(f"expected {want}, got {have}")

    def _expect(self, run: Callable[[], object], error: type[WasmError], text: str) -> None:
        try:
            run()
        except error as e:
            if not e.message.startswith(text) and error is Trap:
                raise ScriptFailure(f"expected trap {text!r}, got {e.message!r}") from None
            return
        raise ScriptFailure(f"expected {error.__name__} {text!r}, got success")

    def cmd_assert_trap(self, cmd: dict) -> None:
        if "action" in cmd:
            self._expect(lambda: self.action(cmd["action"]), Trap, cmd["text"])
        else:
            self.cmd_assert_uninstantiable(cmd)

    def cmd_assert_exhaustion(self, cmd: dict) -> None:
        self._expect(lambda: self.action(cmd["action"]), Trap, cmd["text"])

    def cmd_assert_invalid(self, cmd: dict) -> None:
        self._expect(lambda: self.load(cmd["filename"]), InvalidModule, cmd["text"])

    def cmd_assert_malformed(self, cmd: dict) -> None:
        self._expect(lambda: self.load(cmd["filename"]), MalformedModule, cmd["text"])

    def cmd_assert_unlinkable(self, cmd: dict) -> None:
        module = self.load(cmd["filename"])
        self._expect(lambda: self.instantiate(module), LinkError, cmd["text"])

    def cmd_assert_uninstantiable(self, cmd: dict) -> None:
        module = self.load(cmd["filename"])
        self._expect(lambda: self.instantiate(module), Trap, cmd["text"])


def run_script(path: Path, out: TextIO, engine: str | None = None) -> tuple[int, int]:
    """Run one ``wast2json`` script on the given tier; (passed, total)."""
    return ScriptRunner(path, out, engine).run()


__all__ = ["HostRef", "run_script", "spectest_module"]
