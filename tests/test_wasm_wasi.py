"""popek wasm run against wasmtime: real C programs (tests/wasi), compiled here with
Debian's clang for wasm32-wasi against wasi-libc, give the same output, files and exit
status under both, including when they try to leave their directory or hand WASI bad
pointers; and WASI calls with random arguments end in errors, never outside the sandbox."""

from __future__ import annotations

import inspect
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import wasmtime

from popek import wasm
from popek.wasm.instance import DEFAULT_ENGINE
from popek.wasm.types import PAGE
from popek.wasm.wasi import Preopen, Wasi, WasiAbort, WasiExit
from popek.wasm.wasi_abi import MODULE

SOURCES = Path(__file__).resolve().parent / "wasi"
WASMTIME_RUN = Path(__file__).resolve().parent / "wasmtime_run.py"
CC = "clang-14"
INSTALL = "apt-get install clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32 (./quickstart does)"
TIMEOUT = 60  # seconds; a run takes a few
GUEST_DIR = "/sandbox"
TIERS = ("interp", DEFAULT_ENGINE)  # the reference interpreter and the highest tier
STDIN = b"hello world\nsecond line\n\tand a third, with UTF-8: \xc3\xa9t\xc3\xa9\n"
POPEK = [sys.executable, "-m", "popek", "wasm", "run"]
WASMTIME = [sys.executable, str(WASMTIME_RUN)]


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/wasi/*.c as WASI command modules."""
    if shutil.which(CC) is None or not Path("/usr/include/wasm32-wasi").is_dir():
        pytest.fail(f"{CC} and wasi-libc build the test programs: {INSTALL}")
    out = tmp_path_factory.mktemp("wasi")
    for source in SOURCES.glob("*.c"):
        subprocess.run([CC, "--target=wasm32-wasi", "-O2", "-Wall", "-Werror", "-o",
                        str(out / f"{source.stem}.wasm"), str(source)], check=True,
                       timeout=TIMEOUT)
    return out


def run(runner: list[str], program: Path, args: list[str], workdir: Path,
        flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``program`` under ``runner`` with ``workdir/sandbox`` given as /sandbox."""
    return subprocess.run([*runner, "--dir", f"{workdir / 'sandbox'}::{GUEST_DIR}", *flags,
                           str(program), *args], input=STDIN, capture_output=True,
                          timeout=TIMEOUT, cwd=workdir)


def tree(root: Path) -> dict[str, str]:
    """What a directory holds: each path's file contents or symlink target."""
    found = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        found[name] = f"-> {os.readlink(path)}" if path.is_symlink() else \
            "dir" if path.is_dir() else path.read_text(errors="replace")
    return found


def assert_same_as_wasmtime(program: Path, args: list[str], tmp_path: Path,
                            flags: tuple[str, ...] = (),
                            engine: str = "interp") -> subprocess.CompletedProcess:
    """Same stdout, exit status and files left behind (in and around the sandbox)."""
    results = {}
    for name, runner in (("wasmtime", WASMTIME), ("popek", [*POPEK, "--engine", engine])):
        workdir = tmp_path / name
        (workdir / "sandbox").mkdir(parents=True)
        (workdir / "outside.txt").write_text("secret\n")
        results[name] = run(runner, program, args, workdir, flags), tree(workdir)
    (reference, reference_files), (ours, our_files) = results["wasmtime"], results["popek"]
    stderr = ours.stderr.decode(errors="replace")[-3000:]
    assert ours.stdout.decode(errors="replace") == reference.stdout.decode(errors="replace"), \
        stderr
    assert ours.returncode == reference.returncode, stderr
    assert our_files == reference_files
    assert "Traceback" not in stderr
    return ours


@pytest.mark.parametrize("engine", TIERS)
def test_files_program_matches_wasmtime(programs: Path, tmp_path: Path, engine: str):
    """Arguments, environment, stdin, files, directories, symlinks, clocks, sleep and
    randomness as wasi-libc uses them; exit(7). On both ends of the tiers."""
    done = assert_same_as_wasmtime(programs / "files.wasm", [GUEST_DIR, "two words"],
                                   tmp_path, ("--env", "GREETING=hi there"), engine)
    assert done.returncode == 7
    assert b"renamed holds: HEL" in done.stdout
    assert done.stderr.endswith(b"done on stderr\n")


HOSTILE_CASES = [(how, "interp") for how in ("none", "iovec-array", "buffer", "result", "path",
                                             "exit200", "trap")]
HOSTILE_CASES += [(how, DEFAULT_ENGINE) for how in ("buffer", "exit200", "trap")]


@pytest.mark.parametrize(("how", "engine"), HOSTILE_CASES)
def test_hostile_program_stays_in_its_directory(programs: Path, tmp_path: Path, how: str,
                                                engine: str):
    """Every way out (``..``, absolute paths, symlinks, raw WASI calls) fails with
    wasmtime's errno; a bad pointer or exit status ends the program (status 1) and a
    division by zero traps (134) as in wasmtime; the file outside is untouched."""
    done = assert_same_as_wasmtime(programs / "hostile.wasm", [GUEST_DIR, how], tmp_path, (),
                                   engine)
    assert b"escaped" not in done.stdout
    assert (tmp_path / "popek" / "outside.txt").read_text() == "secret\n"
    expected = {"none": 0, "trap": 134, "path": 134}.get(how, 1)
    assert done.returncode == expected
    if how == "trap":
        assert done.stderr.decode().strip().endswith("wasm trap: integer divide by zero")


def test_failing_calls_give_wasmtime_errors(programs: Path, tmp_path: Path):
    """Directories opened for writing, files as directories, links, descriptors opened
    for the other direction: the same errno for each."""
    done = assert_same_as_wasmtime(programs / "errors.wasm", [GUEST_DIR], tmp_path)
    assert b"Not a directory" in done.stdout
    assert done.returncode == 0


@pytest.mark.parametrize("engine", TIERS)
@pytest.mark.parametrize("args", [["lz", "16"], ["nbody", "1000"]])
def test_cpu_bound_program_matches_wasmtime(programs: Path, tmp_path: Path, args: list[str],
                                            engine: str):
    """Compression with a round trip, and double-precision arithmetic, on both ends of the
    tiers."""
    done = assert_same_as_wasmtime(programs / "compress.wasm", args, tmp_path, (), engine)
    assert done.returncode == 0


def test_memory_limit_fails_allocation_as_in_wasmtime(programs: Path, tmp_path: Path):
    """Past --max-memory, memory.grow fails: malloc returns NULL and the program says so."""
    limit = ("--max-memory", "1M")
    done = assert_same_as_wasmtime(programs / "compress.wasm", ["lz", "1024"], tmp_path, limit)
    assert done.returncode == 1
    assert b"out of memory" in done.stderr


def test_fuel_runs_out_with_a_clear_error(programs: Path, tmp_path: Path):
    (tmp_path / "sandbox").mkdir()
    done = run(POPEK, programs / "compress.wasm", ["nbody", "100000"], tmp_path,
               ("--fuel", "20000"))
    assert done.returncode == 134
    assert done.stderr.decode().strip() == \
        "popek wasm run: compress.wasm: out of fuel: --fuel 20000 used up"


@pytest.mark.parametrize("case", ["missing", "malformed", "no-start", "bad-dir", "bad-env",
                                  "memory-too-small", "not-wasi"])
def test_unusable_input_is_one_line_and_status_2(programs: Path, tmp_path: Path, case: str):
    module = tmp_path / "module.wasm"
    flags = []
    if case == "malformed":
        module.write_bytes(b"\0asm\x01\0\0\0\x01\xff")
    elif case == "no-start":
        module.write_bytes(b"\0asm\x01\0\0\0")  # a valid module that exports nothing
    elif case == "bad-dir":
        module, flags = programs / "files.wasm", ["--dir", str(tmp_path / "nowhere")]
    elif case == "bad-env":
        module, flags = programs / "files.wasm", ["--env", "=x"]
    elif case == "memory-too-small":
        module, flags = programs / "files.wasm", ["--max-memory", "64K"]
    elif case == "not-wasi":  # imports a function no one provides
        module.write_bytes(bytes.fromhex("0061736d01000000010401600000020b0103656e76036e6f77"
                                         "000003020100070a01065f737461727400010a040102000b"))
    done = subprocess.run([*POPEK, *flags, str(module)], capture_output=True, timeout=TIMEOUT)
    assert done.returncode == 2
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("popek wasm run: "), lines


def test_the_readme_wasi_embedding_example_runs(programs: Path, tmp_path: Path):
    """The README's example, as written, beside the files program it names."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### `popek wasm run`: WASI programs"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shutil.copy(programs / "files.wasm", tmp_path)
    (tmp_path / "data").mkdir()
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, input=STDIN,
                          capture_output=True, timeout=TIMEOUT)
    assert done.stdout.endswith(b"exit status 7\n"), done.stderr.decode()[-3000:]
    assert (tmp_path / "data" / "out" / "renamed.txt").read_text() == "HEL"


# Calls a fuzzer leaves out: they may block as asked (a poll with a clock of centuries) or
# take host resources as asked (fallocate reserves real blocks of the disk).
NOT_FUZZED = {"poll_oneoff", "fd_allocate"}
PATH_SPACING = 4096  # bytes between the paths placed in the fuzzed module's memory


def fuzz_module(functions: dict[str, wasm.HostFunction]) -> bytes:
    """A module that exports ``call_NAME`` for each WASI function, passing its arguments on."""
    imports, exports = [], []
    for name, function in functions.items():
        params = " ".join(function.type.params)
        results = f"(result {' '.join(function.type.results)})" if function.type.results else ""
        imports.append(f'(import "{MODULE}" "{name}" (func ${name} (param {params}) {results}))')
        gets = " ".join(f"(local.get {i})" for i in range(len(function.type.params)))
        exports.append(f'(func (export "call_{name}") (param {params}) {results} '
                       f"(call ${name} {gets}))")
    return bytes(wasmtime.wat2wasm(f"(module {' '.join(imports)} (memory (export \"memory\") 1) "
                                   f"{' '.join(exports)})"))


PLACED_PATHS = [b"a", b"a/b", b"..", b"../outside.txt", b"/etc/passwd", b"a/../../x", b".",
                b"", b"a/c", b"b"]  # one every PATH_SPACING bytes of the fuzzed memory


def fuzz_arguments(rng: random.Random, names: list[str], kinds: list[str]) -> list[int]:
    """Arguments by their names in popek/wasm/wasi.py: mostly the preopened directory for
    a descriptor, a placed path and its length for a path; otherwise small numbers, flags,
    addresses in and just past the memory, extremes."""
    args, path_length = [], 0
    for name, kind in zip(names, kinds, strict=True):
        bits = 32 if kind == "i32" else 64
        if name.endswith("fd") and rng.random() < 0.8:
            args.append(3)
        elif name.endswith("path") and rng.random() < 0.8:
            slot = rng.randrange(PAGE // PATH_SPACING)
            path_length = len(PLACED_PATHS[slot % len(PLACED_PATHS)])
            args.append(slot * PATH_SPACING)
        elif name.endswith("path_len") and rng.random() < 0.8:
            args.append(path_length)
        else:
            args.append(rng.choice([rng.randrange(16), rng.randrange(1 << 16),
                                    PAGE - rng.randrange(64), rng.randrange(1 << bits),
                                    (1 << bits) - 1, 1 << (bits - 1)]))
    return args


def test_wasi_calls_with_random_arguments_end_in_errno_or_wasm_errors(tmp_path: Path):
    """Thousands of WASI calls with random arguments over memory holding escape attempts:
    each returns a WASI errno or ends the program as wasmtime would, never a host
    exception, and nothing appears outside the directory the module was given. (A new
    program every 100 calls: one that has closed its directory can do little more.)"""
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    (tmp_path / "outside.txt").write_text("secret\n")
    rng = random.Random(17)
    succeeded = set()
    for _program in range(30):
        with open(os.devnull, "rb+") as null, Wasi(["fuzz"], {}, [Preopen(str(sandbox), "/s")],
                                                   (null.fileno(),) * 3) as wasi:
            functions = {name: function for name, function in wasi.imports()[MODULE].items()
                         if name not in NOT_FUZZED}
            names = {name: list(inspect.signature(getattr(wasi, name)).parameters)[1:]
                     for name in functions}  # past the memory
            instance = wasm.instantiate(wasm.load(fuzz_module(functions)), wasi.imports())
            memory = instance.exports["memory"]
            for _call in range(100):
                contents = bytearray(rng.randbytes(PAGE))
                for slot, at in enumerate(range(0, PAGE, PATH_SPACING)):
                    path = PLACED_PATHS[slot % len(PLACED_PATHS)]
                    contents[at:at + len(path) + 1] = path + b"\0"
                memory.write(0, bytes(contents))
                name = rng.choice(sorted(functions))
                args = fuzz_arguments(rng, names[name], list(functions[name].type.params))
                try:
                    errno = instance.call(f"call_{name}", *args)
                except (WasiExit, WasiAbort):
                    continue
                assert 0 <= errno <= 76, (name, args, errno)
                if errno == 0:
                    succeeded.add(name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside.txt", "sandbox"]
    assert (tmp_path / "outside.txt").read_text() == "secret\n"
    assert {"path_open", "path_create_directory", "path_symlink"} <= succeeded  # it got about
