"""Fuzz target: the gdb stub (``popek.gdb``), whose attacker is whoever connects to it.

The input is the debugger's byte stream, fed to a fresh stub on one shared machine (a
bare-metal guest spinning on two harts) in pieces: each 0xFF byte cuts the stream, so
frames, checksums and escapes arrive split anywhere. Packets are whatever the bytes
say: a mutation of the seeds' real commands (registers, memory in both address modes,
breakpoints, watchpoints, steps, continues, threads, target XML) or garbage. A stub
the stream left running lets each hart run a few instructions, enough to reach the
guest's loop, so the breakpoints and watchpoints it set can stop one. The stub must
answer everything (no exception may escape it, whatever it was sent) and leave
nothing behind once it detaches: no breakpoint or pending stop on any hart.
"""

from __future__ import annotations

import functools

from popek.gdb.stub import GdbStub
from popek.gdb.targets import MachineTarget
from popek.machine.config import MachineConfig
from popek.machine.runner import MachineRunner
from popek.machine.virt import VirtMachine
from tests.fuzz.harness import Target
from tests.vmm_guests import guest

CUT = 0xFF
RUN_AFTER = 200  # instructions each hart runs once the stream has let the machine go


class _Link:
    def __init__(self) -> None:
        self.sent = bytearray()
        self.closed = False

    def sendall(self, data: bytes) -> None:
        self.sent += data

    def close(self) -> None:
        self.closed = True


@functools.cache
def _runner() -> MachineRunner:
    runner = MachineRunner()
    runner.machine = VirtMachine(MachineConfig(kernel=guest("spin"), mem=16 << 20, cpus=2),
                                 lambda data: None, events=runner.sources)
    return runner


def one(data: bytes) -> None:
    runner = _runner()
    runner.resume()
    stub = GdbStub(MachineTarget(runner), _Link())
    try:
        for piece in data.split(bytes([CUT])):
            stub.feed(piece)
        if not stub.halted and not stub.closed:
            for hart in runner.machine.harts:
                hart.run(RUN_AFTER)
            stub.after_run()
    finally:
        stub.detach()
    for hart in runner.machine.harts:
        assert hart.engine.debug_stop is None and not hart.engine.breakpoints


def _packet(payload: bytes) -> bytes:
    return b"$%s#%02x" % (payload, sum(payload) & 0xFF)


def seeds() -> dict[str, bytes]:
    cut = bytes([CUT])
    session = [b"qSupported:multiprocess+;swbreak+;hwbreak+", b"QStartNoAckMode",
               b"qXfer:features:read:target.xml:0,ffb", b"?", b"Hg0", b"qfThreadInfo",
               b"qsThreadInfo", b"qAttached", b"g", b"p20", b"p44", b"m80000000,40",
               b"Z0,80000010,4", b"Z1,80000020,2", b"vCont;s:1;c", b"s", b"c", b"z0,80000010,4",
               b"Z2,80001000,8", b"Z3,80001000,4", b"Z4,80001000,1", b"c", b"Hg2",
               b"P20=0000008000000000", b"G" + b"00" * 8 * 33, b"M80000100,4:13000000",
               b"X80000100,2:\x01\x00", b"Qqemu.PhyMemMode:1", b"m0,ffffffffffff", b"T2",
               b"qThreadExtraInfo,2", b"vCont?", b"D"]
    return {
        "session": b"".join(_packet(p) + b"+" for p in session),
        "split": cut.join(_packet(p) for p in session[:12]) + b"\x03",
        "ctrl-c": _packet(b"c") + b"\x03" + _packet(b"g") + _packet(b"k"),
        "bad": b"$g#00+-$" + b"A" * 300 + b"#zz" + _packet(b"mzz") + _packet(b"Z0,,"),
    }


TARGET = Target(one=one, ci_runs=1_000, max_len=4096, seeds=seeds)
