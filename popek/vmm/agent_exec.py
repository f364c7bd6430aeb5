"""``popek vm exec`` and ``vm cp`` through the VMM: a command for the guest agent goes from
the API to the VM's worker, whose :class:`popek.machine.agent.AgentLink` runs it, and
the reply comes back when the command ends (other commands are served meanwhile).

Bytes travel base64-encoded in the JSON of the API and of the worker channel, so a
request's stdin and a reply's output are bounded (:data:`MAX_STDIN`,
:data:`MAX_OUTPUT`); ``vm cp`` moves larger files in pieces of that size.
"""

from __future__ import annotations

import base64
import binascii
import subprocess
from collections.abc import Callable
from typing import Any

from popek.machine.agent import AgentError, AgentLink
from popek.vmm.errors import BadRequest

MAX_STDIN = 512 << 10  # the API takes request bodies of up to 1 MiB
MAX_OUTPUT = 2 << 20  # the worker channel takes frames of up to 4 MiB
DEFAULT_TIMEOUT = 60.0
OPS = ("exec", "exec_abandon")


def request(body: dict[str, Any]) -> tuple[list[str], str, float]:
    """The checked ``argv``, base64 ``stdin`` and ``timeout`` of an API exec request."""
    argv, stdin = body.get("argv"), body.get("stdin", "")
    timeout = body.get("timeout", DEFAULT_TIMEOUT)
    if not (isinstance(argv, list) and argv and argv[0] and
            all(isinstance(a, str) and "\0" not in a for a in argv)):
        raise BadRequest("'argv' must be a non-empty list of strings without NUL bytes")
    if not isinstance(stdin, str) or len(stdin) > MAX_STDIN * 4 // 3 + 4:
        raise BadRequest(f"'stdin' must be base64 of at most {MAX_STDIN >> 10} KiB")
    try:
        base64.b64decode(stdin, validate=True)
    except binascii.Error:
        raise BadRequest("'stdin' is not valid base64") from None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or \
            not 0 < timeout <= 3600:
        raise BadRequest("'timeout' must be 0 to 3600 seconds")
    return argv, stdin, float(timeout)


def worker_command(link: AgentLink | None, msg: dict[str, Any],
                   send: Callable[[dict[str, Any]], None]) -> None:
    """The worker's side: start an ``exec`` (its reply is sent when it ends) or abandon
    the running one (``exec_abandon``, after the VMM's timeout)."""
    reply = {"op": "reply", "id": msg.get("id")}

    def done(outcome: subprocess.CompletedProcess | Exception) -> None:
        if isinstance(outcome, Exception):
            send({**reply, "ok": False, "error": str(outcome)})
        else:
            send({**reply, "ok": True, "result": {
                "status": outcome.returncode,
                "stdout": base64.b64encode(outcome.stdout).decode(),
                "stderr": base64.b64encode(outcome.stderr).decode()}})

    if msg.get("op") == "exec_abandon":
        if link is not None:
            link.abandon("timed out")
        send({**reply, "ok": True})
        return
    try:
        if link is None:
            raise AgentError("this VM has no agent port (agent: false)")
        link.start(msg["argv"], base64.b64decode(msg.get("stdin", "")), done)
    except (AgentError, KeyError, TypeError, ValueError) as err:
        send({**reply, "ok": False, "error": str(err)})
