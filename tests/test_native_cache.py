"""Native code outlives the process: a second run starts native (tier 2's objects, the
baseline tier's patched code), and the cache never changes what a guest computes (other
code at the same address, the same code at another, code that rewrites itself, a
corrupt, truncated or evicted pack, two writers at once, the cache turned off).

Each test uses a cache directory of its own. In-process runs start a fresh view of the
cache (``CACHE.configure``) and a fresh hart, as a new process would; the command-line
tests run ``popek exec`` itself and read what ``--stats`` says the cache did.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rvasm import RAM_BASE, assemble
from test_native_tier import SELF_PATCHING

from popek.cpu.hart import Hart
from popek.cpu.physmem import PhysicalMemory
from popek.engine import engine as engine_module
from popek.engine import jit
from popek.engine.native_cache import CACHE, MAX_PACKS, NativeCache, read_pack
from popek.vmm import jail

BASE = RAM_BASE
HANDLER = BASE + 0x3000
MTVEC, MSTATUS = 0x305, 0x300
REPO = Path(__file__).resolve().parent.parent
BUSYBOX = REPO / "images" / "programs" / "busybox"
TIMEOUT = 120  # seconds for one popek exec (a few on an idle host)

LOOP = """
    li s0, 300
    li a0, 0
1:  addi a0, a0, {step}
    xori a1, a0, 0x55
    add  a2, a2, a1
    addi s0, s0, -1
    bnez s0, 1b
    ebreak
"""

# A loop mostly of carry-less products (Zbc), which have no stencils of their own (their
# stencils call the Python handlers): no patched code for it, so it runs on the Python
# tiers, tier 1 once hot.
HANDLER_LOOP = """
    li s0, 300
    li s1, 0x123456789
1:  .insn r 0x33, 1, 5, s2, s1, s0       # clmul s2, s1, s0
    .insn r 0x33, 3, 5, s3, s2, s1       # clmulh s3, s2, s1
    .insn r 0x33, 2, 5, s1, s3, s0       # clmulr s1, s3, s0
    addi s0, s0, -1
    bnez s0, 1b
    ebreak
"""


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty cache for this test, and blocks that go native after a few runs."""
    monkeypatch.setattr(engine_module, "HOT_AFTER", 2)
    monkeypatch.setattr(engine_module, "NATIVE_AFTER", 2)
    monkeypatch.setattr(engine_module, "PATCHED_NATIVE_AFTER", 4)
    before = CACHE.root
    directory = tmp_path / "code"
    CACHE.configure(directory)
    yield directory
    CACHE.configure(before)


def run(code: bytes, tier: str = "jit") -> Hart:
    """A fresh hart (as in a new process) runs ``code`` until its trap handler's WFI."""
    mem = PhysicalMemory(BASE, 1 << 16)
    mem.write(BASE, code)
    mem.write(HANDLER, bytes.fromhex("73005010"))  # wfi
    hart = Hart(mem, engine=tier)
    hart.csr[MTVEC] = HANDLER
    hart.pc = BASE
    for _ in range(10_000):
        hart.run(50)
        hart.engine.finish_compiles()
        if hart.waiting:
            return hart
    raise AssertionError("the program did not finish")


def next_process(directory: Path) -> None:
    """What a new process sees: the cache as it is on disk now."""
    CACHE.configure(directory)


def test_second_run_starts_native_from_the_cache(cache_dir: Path) -> None:
    code = assemble(LOOP.format(step=1))
    first = run(code)
    assert CACHE.stats.stored > 0 and CACHE.stats.loaded == 0
    next_process(cache_dir)
    second = run(code)
    assert CACHE.stats.loaded > 0 and CACHE.stats.reused > 0
    assert CACHE.stats.stored == 0  # nothing compiled again
    reference = run(code, tier="interp")
    for hart in (first, second):
        assert list(hart.x[:32]) == list(reference.x[:32])
        assert hart.instret == reference.instret


@pytest.mark.parametrize("tier", ["jit", "baseline"])
def test_blocks_hot_on_tier_1_before_start_there(
        tier: str, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "NATIVE_AFTER", 10**9)  # tier 1 at most
    monkeypatch.setattr(engine_module, "PATCHED_NATIVE_AFTER", 10**9)
    code = assemble(HANDLER_LOOP)
    first = run(code, tier)
    CACHE.flush()  # (at exit, in a process of its own)
    assert CACHE.stats.translated == 0 and CACHE.stats.stored == 0
    next_process(cache_dir)
    second = run(code, tier)
    assert CACHE.stats.translated > 0
    assert list(second.x[:32]) == list(first.x[:32]) and second.instret == first.instret


def test_other_code_at_the_same_address_never_runs_cached_code(cache_dir: Path) -> None:
    run(assemble(LOOP.format(step=1)))
    next_process(cache_dir)
    changed = assemble(LOOP.format(step=3))
    hart = run(changed)
    assert list(hart.x[:32]) == list(run(changed, tier="interp").x[:32])
    assert hart.x[10] == 900


def test_code_rewriting_itself_is_seen_when_its_blocks_came_from_the_cache(
        cache_dir: Path) -> None:
    code = assemble(SELF_PATCHING)
    assert run(code).x[10] == 200 + 2 * 200
    next_process(cache_dir)
    hart = run(code)
    assert CACHE.stats.reused > 0
    assert hart.x[10] == 200 + 2 * 200


def test_corrupt_and_truncated_packs_are_ignored(cache_dir: Path) -> None:
    code = assemble(LOOP.format(step=1))
    reference = run(code, tier="interp").x[10]
    run(code)
    (pack,) = cache_dir.rglob("*.pack")
    data = bytearray(pack.read_bytes())
    with open(pack, "rb") as f:
        (record,) = read_pack(pack.name, f.fileno())
    pack.with_name("truncated.pack").write_bytes(data[:-7])  # a writer killed mid-record
    data[record.offset + record.obj_offset + 16] ^= 0xFF  # a bit flipped in the object
    pack.write_bytes(data)
    next_process(cache_dir)
    assert run(code).x[10] == reference
    assert CACHE.stats.indexed > 0 and CACHE.stats.corrupt == 1
    assert CACHE.stats.loaded == 0 and CACHE.stats.stored > 0  # compiled again


def test_baseline_second_run_places_the_patched_code_the_first_kept(cache_dir: Path) -> None:
    code = assemble(LOOP.format(step=1))
    first = run(code, "baseline")
    CACHE.flush()  # (at exit, in a process of its own)
    placed, patched = jit.STATS.placed, jit.STATS.patched
    next_process(cache_dir)
    second = run(code, "baseline")
    assert jit.STATS.placed > placed and jit.STATS.patched == patched  # none patched again
    reference = run(code, tier="interp")
    for hart in (first, second):
        assert list(hart.x[:32]) == list(reference.x[:32])
        assert hart.instret == reference.instret


def test_kept_patched_code_serves_the_same_bytes_at_another_offset(cache_dir: Path) -> None:
    """A block's code is kept by its bytes alone: the same loop further into its page
    (its jumps aimed from where it now starts) and then at the end of a page (its
    fall-through off the page) computes what the interpreter does."""
    loop = assemble(LOOP.format(step=1))
    run(loop, "baseline")
    CACHE.flush()
    for nops in (24, (4096 - len(loop)) // 4 + 2):
        code = assemble("nop\n" * nops) + loop
        next_process(cache_dir)
        placed = jit.STATS.placed
        hart = run(code, "baseline")
        assert jit.STATS.placed > placed, nops
        reference = run(code, tier="interp")
        assert list(hart.x[:32]) == list(reference.x[:32]), nops
        assert hart.instret == reference.instret


def test_corrupt_kept_patched_code_is_ignored_and_patched_again(cache_dir: Path) -> None:
    code = assemble(LOOP.format(step=1))
    reference = run(code, tier="interp").x[10]
    run(code, "baseline")
    CACHE.flush()
    (pack,) = cache_dir.rglob("*.pack")
    data = bytearray(pack.read_bytes())
    with open(pack, "rb") as f:
        (record,) = read_pack(pack.name, f.fileno())
    data[record.offset + record.obj_offset + 9] ^= 0xFF  # a bit flipped in some code
    pack.write_bytes(data)
    next_process(cache_dir)
    patched = jit.STATS.patched
    assert run(code, "baseline").x[10] == reference
    assert CACHE.stats.corrupt == 1 and jit.STATS.patched > patched


def test_least_recently_used_packs_go_first_but_never_a_live_one(tmp_path: Path) -> None:
    directory = tmp_path / "code"
    writers = []
    for n in range(3):
        cache = NativeCache(directory)
        cache.open("toolchain")
        cache.store([bytes([n]) * 16], "t", bytes(1000))
        writers.append(cache)
    packs = sorted(directory.rglob("*.pack"), key=lambda p: p.stat().st_mtime)
    for age, pack in enumerate(packs):
        os.utime(pack, (1000 + age, 1000 + age))
    writers[0].close()  # its writer ended; the other two still run
    writers[1].close()
    NativeCache(directory, limit=1).open("toolchain")
    assert sorted(directory.rglob("*.pack")) == sorted(packs[2:])  # the live one stays
    with open(packs[2], "rb") as f:  # and its writer still holds it
        with pytest.raises(BlockingIOError):
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_confined_worker_reads_the_cache_and_writes_nothing(cache_dir: Path) -> None:
    """A VMM worker indexes the cache before it confines itself (seccomp would kill it
    for opening, locking or touching files later) and runs what it finds, but adds none
    of its own code: a subverted worker must not plant code that other processes run."""
    code, other = assemble(LOOP.format(step=1)), assemble(LOOP.format(step=2))
    run(code)
    packs = {p: p.stat().st_size for p in cache_dir.rglob("*.pack")}
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            jail.confine()
            run(other)  # new code: compiled, not written
            hart = run(code)
            report = [hart.x[10], CACHE.stats.loaded, CACHE.stats.stored]
            os.write(write_end, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = json.loads(pipe.read() or b"null")
    _, status = os.waitpid(pid, 0)
    assert status == 0 and report == [300, 1, 0]
    assert {p: p.stat().st_size for p in cache_dir.rglob("*.pack")} == packs


def test_many_packs_are_merged_into_one_that_holds_every_record(tmp_path: Path) -> None:
    directory = tmp_path / "code"
    keys = [bytes([n]) * 16 for n in range(MAX_PACKS + 2)]
    for key in keys:  # one process each, all ended
        cache = NativeCache(directory)
        cache.open("toolchain")
        cache.store([key], "t", key * 10)
        cache.close()
    live = NativeCache(directory)  # and one still writing
    live.open("toolchain")
    live.store([b"live" * 4], "t", bytes(10))
    live_pack = Path(os.readlink(f"/proc/self/fd/{live._writer}"))
    reader = NativeCache(directory)
    reader.open("toolchain")
    assert len(list(directory.rglob("*.pack"))) <= 3  # merged when over MAX_PACKS
    assert live_pack.exists()
    assert reader.stats.indexed == len(keys) + 1
    assert all(reader.payload(reader.lookup(key)) == key * 10 for key in keys)


# -- the command line -------------------------------------------------------------------------

STATS = re.compile(rb"code cache: (\d+) blocks native at first sight, (\d+) objects loaded "
                   rb"of (\d+) blocks indexed, (\d+) blocks stored, (\d+) blocks on tier 1 "
                   rb"at first sight, (\d+) corrupt")


def popek_exec(*args: str) -> tuple[bytes, dict[str, int]]:
    """Run busybox under ``popek exec --stats``: its output and what the cache did."""
    result = subprocess.run([sys.executable, "-m", "popek", "exec", "--stats", *args],
                            capture_output=True, timeout=TIMEOUT, check=True)
    match = STATS.search(result.stderr)
    stats = dict(zip(("reused", "loaded", "indexed", "stored", "translated", "corrupt"),
                     map(int, match.groups()), strict=True)) if match else {}
    return result.stdout, stats


def test_popek_exec_twice_with_two_cold_writers_at_once(tmp_path: Path) -> None:
    data = tmp_path / "input"
    # 16 MiB: sha256's hot blocks run 262,144 times, twice tier 2's threshold for
    # patched blocks, so the cold runs compile them all and the warm one none
    data.write_bytes(bytes(range(256)) * 65536)
    cmd = ["--engine", "jit", "--code-cache", str(tmp_path / "code"), str(BUSYBOX),
           "sha256sum", str(data)]
    cold = [subprocess.Popen([sys.executable, "-m", "popek", "exec", "--stats", *cmd],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=TIMEOUT) for p in cold]
    assert all(p.returncode == 0 for p in cold)
    assert outputs[0][0] == outputs[1][0]
    assert all(int(STATS.search(err).group(4)) > 0 for _, err in outputs)  # both stored
    assert len(list((tmp_path / "code").rglob("*.pack"))) == 2
    out, warm = popek_exec(*cmd)
    assert out == outputs[0][0]
    assert out.split()[0].decode() == hashlib.sha256(data.read_bytes()).hexdigest()
    assert warm["loaded"] > 0 and warm["reused"] > 0 and warm["corrupt"] == 0, (warm, outputs)
    assert warm["stored"] < int(STATS.search(outputs[0][1]).group(4))


PATCHING = re.compile(rb"(\d+) blocks patched from stencils .*, (\d+) blocks placed from kept "
                      rb"patched code")


def test_popek_exec_baseline_twice_places_what_the_first_run_patched(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "popek", "exec", "--stats", "--engine", "baseline",
           "--code-cache", str(tmp_path / "code"), str(BUSYBOX), "sha256sum", str(BUSYBOX)]
    runs = [subprocess.run(cmd, capture_output=True, timeout=TIMEOUT, check=True)
            for _ in range(2)]
    assert runs[0].stdout == runs[1].stdout
    assert runs[0].stdout.split()[0].decode() == hashlib.sha256(BUSYBOX.read_bytes()).hexdigest()
    (patched, placed), (again, placed_again) = (
        map(int, PATCHING.search(run.stderr).groups()) for run in runs)
    assert patched > 500 and placed == 0
    assert placed_again > 0.9 * patched and again < 0.1 * patched, (placed_again, again)


def test_no_code_cache_reads_and_writes_nothing(tmp_path: Path) -> None:
    home = tmp_path / "cache-home"
    env = {**os.environ, "XDG_CACHE_HOME": str(home)}
    env.pop("POPEK_CODE_CACHE", None)
    result = subprocess.run([sys.executable, "-m", "popek", "exec", "--stats",
                             "--no-code-cache", str(BUSYBOX), "sha256sum", str(BUSYBOX)],
                            capture_output=True, timeout=TIMEOUT, check=True, env=env)
    assert len(result.stdout.split()[0]) == 64
    assert not STATS.search(result.stderr)
    assert not home.exists()


def test_unusable_cache_directory_is_one_line_and_the_run_goes_on(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_bytes(b"")
    result = subprocess.run([sys.executable, "-m", "popek", "exec", "--code-cache",
                             str(not_a_directory), str(BUSYBOX), "echo", "hi"],
                            capture_output=True, timeout=TIMEOUT, check=True)
    assert result.stdout == b"hi\n"
    assert result.stderr.decode().strip().endswith("Not a directory; running without it")
    assert len(result.stderr.decode().strip().splitlines()) == 1


def test_interpreter_handlers_are_compiled_once_then_come_from_the_cache(
        tmp_path: Path) -> None:
    probe = ("from popek.engine import handlers, jit\n"
             "from popek.engine.native_cache import CACHE\n"
             "CACHE.open(jit.toolchain())\n"
             "print(CACHE.code_object(handlers.HANDLERS_KEY) is not None)\n"
             "assert handlers._compiled().co_filename == '<popek semantics>'\n")
    env = {**os.environ, "POPEK_CODE_CACHE": str(tmp_path / "code")}
    found = [subprocess.run([sys.executable, "-c", probe], capture_output=True, check=True,
                            env=env, timeout=TIMEOUT).stdout.strip() for _ in range(2)]
    assert found == [b"False", b"True"]
