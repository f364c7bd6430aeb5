"""A test build of the VMM: ``python -m tests.vmm_test_build serve ...``.

Its worker fork server imports this module before popek's own preload, so every worker
carries what ``$POPEK_TEST_BUILD`` (a comma-separated list, read only here) asks for;
nothing in popek itself has these paths:

- ``misbehave``: the test finisher knows more statuses, so guest code can trigger
  deliberate worker bugs: :data:`FORBIDDEN_CALL` makes the worker call ``chroot`` (a
  system call its seccomp filter forbids); :data:`PEEK` makes it open
  ``$POPEK_TEST_SECRET`` and power the guest off with the errno (0: it could read it);
  :data:`IGNORE_CAP` makes it stop throttling itself to the CPU cap it was given;
  :data:`LIE` makes it send its VMM statistics no worker sends (as a compromised one
  might).
- ``no-seccomp``: libseccomp's binding cannot be imported, as on a host without it.
"""

from __future__ import annotations

import errno
import os
import sys

FORBIDDEN_CALL = 0xBAD0
PEEK = 0xBAD1
IGNORE_CAP = 0xBAD2
LIE = 0xBAD3
BUILD = set(filter(None, os.environ.get("POPEK_TEST_BUILD", "").split(",")))

if "no-seccomp" in BUILD:
    sys.modules["pyseccomp"] = None  # type: ignore[assignment]  # import now fails

if "misbehave" in BUILD:
    from popek.devices.test_finisher import Finisher
    from popek.vmm.channel import JSON
    from popek.vmm.throttle import CpuCap
    from popek.vmm.worker import Worker

    _finisher_write = Finisher.write
    _cap_delay = CpuCap.delay
    _send_stats = Worker._send_stats
    _ignoring_cap = _lying = False  # set in a worker whose guest asked

    def _misbehaving_write(self: Finisher, offset: int, size: int, value: int) -> None:
        global _ignoring_cap, _lying
        status = value & 0xFFFF
        if status == IGNORE_CAP:
            _ignoring_cap = True
        elif status == LIE:
            _lying = True
        elif status == FORBIDDEN_CALL:
            os.chroot("/")
        elif status == PEEK:
            try:
                with open(os.environ["POPEK_TEST_SECRET"], "rb") as secret:
                    secret.read()
                self.on_finish("poweroff", 0)
            except OSError as err:
                self.on_finish("poweroff", err.errno or errno.EIO)
        else:
            _finisher_write(self, offset, size, value)

    def _lying_stats(self: Worker) -> None:
        if _lying:  # a trap cause that is no number
            self.link.send(JSON, {"op": "stats", "traps": {"x": 1}})
        else:
            _send_stats(self)

    Finisher.write = _misbehaving_write  # type: ignore[method-assign]
    Worker._send_stats = _lying_stats  # type: ignore[method-assign]
    CpuCap.delay = lambda self: 0.0 if _ignoring_cap else _cap_delay(self)  # type: ignore


if __name__ == "__main__":
    from popek.cli import main
    from popek.vmm import workerprocess

    workerprocess.WORKER_PRELOAD.insert(0, "tests.vmm_test_build")
    sys.exit(main())
