"""Guests driven by programs: the Python API, ``popek.Machine`` (a guest in this process)
and ``popek.Client`` (the REST API of ``popek serve`` as blocking methods), and
``popek vm console`` in shell scripts.

Machine's operations are tested on the tiny bare-metal guests of tests/vmm_guests.py,
which boot in milliseconds; the README's example, which boots the bundled Linux once,
runs as written and must print what the README says it prints.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import popek
from tests.linux_guest import BOOT_TIMEOUT
from tests.vmm_guests import guest
from tests.vmm_process import popek_serve

REPO = Path(__file__).resolve().parent.parent
MEM = "32M"
PATIENCE = 60.0


def _ticks(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"tick (\d+)\n", text)]


# -- Machine ----------------------------------------------------------------------------------
def test_a_guest_that_powers_off_gives_its_exit_code_and_then_refuses_operations() -> None:
    vm = popek.Machine(kernel=guest("exit7"), mem=MEM)
    with vm:
        assert vm.console.read_until("exiting with 7\n", PATIENCE).endswith("7\n")
        assert vm.wait(PATIENCE) == 7
        assert not vm.running
        with pytest.raises(popek.MachineError, match="powered off .exit code 7"):
            vm.pause()
        with pytest.raises(popek.ConsoleClosed, match="the guest stopped before 'more'"):
            vm.console.expect("more", 5)


def test_console_input_reaches_the_guest_and_its_echo_is_expected() -> None:
    with popek.Machine(kernel=guest("echo"), mem=MEM) as vm:
        vm.console.expect("echo ready\n", PATIENCE)
        vm.console.sendline("hello there")
        assert vm.console.read_until("hello there\n", PATIENCE) == "hello there\n"
        vm.console.sendline("poweroff")
        assert vm.console.expect(r"good(bye)", PATIENCE).group(1) == "bye"
        assert vm.wait(PATIENCE) == 0


def test_expect_times_out_naming_what_it_saw() -> None:
    with popek.Machine(kernel=guest("idle"), mem=MEM) as vm:
        vm.console.expect("idle ready", PATIENCE)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="0.5 s passed before 'never'.*idle ready"):
            vm.console.expect("never", 0.5)
        assert time.monotonic() - start < 5


def test_pause_stops_the_guest_and_resume_carries_on() -> None:
    with popek.Machine(kernel=guest("counter"), mem=MEM) as vm:
        vm.console.expect(r"tick 3\n", PATIENCE)
        vm.pause()
        assert vm.paused
        held = vm.stats()["instructions"]
        printed = len(vm.console.text)
        time.sleep(0.5)
        assert vm.stats()["instructions"] == held and len(vm.console.text) == printed
        vm.resume()
        last = _ticks(vm.console.text)[-1]
        vm.console.expect(rf"tick {last + 3}\n", PATIENCE)
        stats = vm.stats()
        assert stats["instructions"] > held
        assert stats["memory"]["guest_bytes"] == 32 << 20 and stats["memory"]["rss_bytes"] > 0


def test_a_restored_snapshot_carries_on_without_repeating_or_skipping(tmp_path: Path) -> None:
    snap = tmp_path / "counter.snap"
    with popek.Machine(kernel=guest("counter"), mem=MEM) as vm:
        vm.console.expect(r"tick 5\n", PATIENCE)
        vm.pause()
        saved = vm.snapshot(snap)
        last = _ticks(vm.console.text)[-1]
        assert saved["ram_bytes"] >= 1 << 20  # the counter's table
    clone = popek.Machine.restore(snap)
    assert clone.config.mem == 32 << 20 and not clone.running
    with clone:
        clone.console.expect(rf"tick {last + 5}\n", PATIENCE)
        ticks = _ticks(clone.console.text)
        assert ticks[0] in (last, last + 1) and ticks == list(range(ticks[0], ticks[-1] + 1))
        assert "counter ready" not in clone.console.text
        assert clone.stats()["instructions"] > 0  # counted from the restore


def test_traps_are_counted_by_cause() -> None:
    with popek.Machine(kernel=guest("exit5-later"), mem=MEM) as vm:
        vm.console.expect("waiting", PATIENCE)
        assert vm.wait(PATIENCE) == 5
    # sleep_until asks the SBI for a timer: an S-mode ecall, a hypercall.
    traps = vm.stats()["traps"]
    assert traps["ecall_s"] >= 1 and set(traps) == {"ecall_s"}, traps


def test_bad_settings_are_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(popek.ConfigError, match="unknown setting.*memory"):
        popek.Machine(memory="1G")
    with pytest.raises(popek.ConfigError, match="mem .* is impossible"):
        popek.Machine(mem="1K")
    with pytest.raises(popek.ConfigError, match="--disk 'x,bad'"):
        popek.Machine(disks=["x,bad"])
    vm = popek.Machine(kernel=tmp_path / "missing", mem=MEM)
    with pytest.raises(Exception, match="missing"):
        vm.start()
    with pytest.raises(popek.MachineError, match="not been started"):
        popek.Machine(kernel=guest("idle")).pause()
    (tmp_path / "junk.snap").write_bytes(b"not a snapshot" * 100)
    with pytest.raises(Exception, match="junk.snap"):
        popek.Machine.restore(tmp_path / "junk.snap")


# -- Client -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vmm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with popek_serve(tmp_path_factory.mktemp("vmm")) as sock:
        yield sock


def _wait(what: str, check) -> object:
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_client_drives_the_vmm_with_a_method_per_operation(vmm: Path, tmp_path: Path) -> None:
    with popek.Client(str(vmm)) as client:
        assert client.version()["popek"] == popek.__version__
        vm = client.create(name="counter", kernel=str(guest("counter")), mem=32 << 20)
        assert [v["name"] for v in client.list()] == ["counter"]
        _wait("ticks", lambda: b"tick 2\n" in client.console_log("counter"))
        assert client.pause("counter")["state"] == "paused"
        saved = client.snapshot("counter", tmp_path / "c.snap")
        assert saved["ram_bytes"] >= 1 << 20
        assert client.resume(vm["id"])["state"] == "running"
        clone = client.restore(tmp_path / "c.snap", name="clone")
        _wait("the clone", lambda: client.info(clone["id"])["state"] == "running")
        assert client.kill("clone")["state"] == "stopped"
        for name in ("counter", "clone"):
            client.delete(name)
        with pytest.raises(popek.ApiError) as err:
            client.info("counter")
        assert err.value.status == 404
        hello = client.create(kernel=str(guest("exit7")), mem=32 << 20)
        _wait("its exit", lambda: client.info(hello["id"])["state"] == "stopped")
        assert client.info(hello["id"])["exit"]["code"] == 7
        client.delete(hello["id"])


def test_client_and_async_client_agree_on_every_operation() -> None:
    operations = {name for name in dir(popek.AsyncClient) if not name.startswith("_")}
    operations -= {"console", "debugger"}  # WebSockets, asyncio only
    assert operations <= set(dir(popek.Client))
    assert popek.Client.create.__doc__ == popek.AsyncClient.create.__doc__


def test_client_reports_a_vmm_that_is_not_there(tmp_path: Path) -> None:
    with popek.Client(tmp_path / "none.sock") as client, \
            pytest.raises(popek.ApiError, match="is 'popek serve' running"):
        client.list()


# -- popek vm console in a script ----------------------------------------------------------------
def _vm_console(vmm: Path, name: str, stdin: bytes, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "popek", "vm", "--socket", str(vmm),
                           "console", name, *flags], input=stdin, capture_output=True,
                          timeout=PATIENCE)


def test_a_scripted_console_sends_its_input_and_exits_once_output_settles(vmm: Path) -> None:
    with popek.Client(vmm) as client:
        client.create(name="echo", kernel=str(guest("echo")), mem=32 << 20)
        _wait("the guest", lambda: b"echo ready" in client.console_log("echo"))
        start = time.monotonic()
        result = _vm_console(vmm, "echo", b"first line\nsecond\n", "--wait", "1.5")
        took = time.monotonic() - start
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"first line\nsecond\n"  # the echo; no history replayed
        assert 1.5 <= took < 20
        # A guest that stops ends the command at once, whatever --wait says.
        start = time.monotonic()
        result = _vm_console(vmm, "echo", b"poweroff\n", "--wait", "30")
        assert result.stdout == b"poweroff\ngoodbye\n" and time.monotonic() - start < 20
        assert client.info("echo")["exit"]["code"] == 0
        client.delete("echo")


def test_a_console_without_stdin_shows_output_and_ignores_its_input(vmm: Path) -> None:
    with popek.Client(vmm) as client:
        client.create(name="bye", kernel=str(guest("exit5-later")), mem=32 << 20)
        result = _vm_console(vmm, "bye", b"ignored\n", "--no-stdin")
        assert result.returncode == 0, result.stderr
        assert b"bye\n" in result.stdout and b"ignored" not in result.stdout
        assert client.info("bye")["exit"]["code"] == 5
        client.delete("bye")


# -- the README's example -----------------------------------------------------------------------
def _readme_example() -> tuple[str, str]:
    """The README's Machine example and the output it shows for it."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Python: `popek.Machine`"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shown = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    return code, shown


@pytest.mark.boots_linux
def test_the_readme_machine_example_prints_what_the_readme_shows(tmp_path: Path) -> None:
    code, shown = _readme_example()
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path)}  # its own copy of the bundled disk
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=BOOT_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == shown
    assert (tmp_path / "vm.snap").stat().st_size > 128 << 20  # sparse, RAM-sized
