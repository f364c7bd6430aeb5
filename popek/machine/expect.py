"""A guest console for programs, in the manner of ``pexpect``: send text, wait for a
pattern, run a shell command and get its output and exit status.

Output arrives from the machine's thread (:meth:`Console.output`) and is kept whole;
each wait searches what the previous one left unread, so nothing printed between two
calls is missed.
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
import re
import threading
import time
from collections.abc import Callable

DEFAULT_TIMEOUT = 120.0  # seconds; a Linux boot under a loaded tier-1 engine takes ~40
# busybox ash's prompt, as the bundled guest's shell prints it: "/ # ", then (line editing)
# a query of the cursor position, which needs no answer.
PROMPT = re.compile(r"[#$] (?:\x1b\[[0-9;]*[A-Za-z])*$")


class ConsoleClosed(EOFError):
    """The guest stopped (powered off, or the machine was stopped) before the wait ended."""


class Console:
    """The guest's serial console. ``send`` types; ``expect``/``read_until`` wait for output."""

    def __init__(self, send: Callable[[bytes], None], *, restored: bool = False) -> None:
        """``restored``: the guest carries on from a snapshot, so its shell may have
        printed its prompt before this console existed."""
        self._send = send
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text: list[str] = []
        self._joined = ""
        self._pos = 0  # where the next wait starts searching
        self._changed = threading.Condition()
        self._closed = False
        self._markers = itertools.count(1)
        self._quiet = False  # run() has turned the shell's echo off
        self._at_prompt = False  # the shell's latest prompt has been consumed, nothing sent since
        self._restored = restored

    # -- the machine's side --------------------------------------------------------------------
    def output(self, data: bytes) -> None:
        text = self._decoder.decode(data)
        with self._changed:
            self._text.append(text)
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    # -- the program's side --------------------------------------------------------------------
    @property
    def text(self) -> str:
        """Everything the guest printed so far."""
        with self._changed:
            return self._all()

    def _all(self) -> str:
        if self._text:
            self._joined += "".join(self._text)
            self._text.clear()
        return self._joined

    def send(self, text: str | bytes) -> None:
        """Type ``text`` on the guest's console (a str is sent as UTF-8)."""
        self._at_prompt = False
        self._send(text.encode() if isinstance(text, str) else text)

    def sendline(self, text: str = "") -> None:
        self.send(text + "\n")

    def expect(self, pattern: str | re.Pattern[str],
               timeout: float = DEFAULT_TIMEOUT) -> re.Match[str]:
        """Wait for ``pattern`` (a regular expression) in output not yet consumed; returns
        the match and consumes output up to its end. TimeoutError after ``timeout``
        seconds, ConsoleClosed if the guest stops first; each names what was seen."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                match = regex.search(self._all(), self._pos)
                if match is not None:
                    self._pos = match.end()
                    return match
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    tail = self._joined[-300:]
                    what = "the guest stopped" if self._closed else f"{timeout:g} s passed"
                    error = ConsoleClosed if self._closed else TimeoutError
                    raise error(f"{what} before {regex.pattern!r} appeared; last output: "
                                f"{tail!r}")
                self._changed.wait(left)

    def read_until(self, text: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        """The output up to and including ``text`` (which it consumes)."""
        start = self._pos
        match = self.expect(re.escape(text), timeout)
        return match.string[start:match.end()]

    def wait_for_shell(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Wait until the guest's shell prompts (the bundled guest's, after its boot). A
        restored guest's shell printed its prompt before the snapshot: an empty line asks
        it for a new one, as someone attaching to a console presses Enter."""
        if self._restored:
            self._restored = False
            self.sendline()
        self.expect(PROMPT, timeout)
        self._at_prompt = True

    def run(self, command: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[str, int]:
        """Run ``command`` in the guest's shell (waiting for the prompt first); returns
        what it printed (stdout and stderr, ``\\n`` line ends) and its exit status.

        The first call turns the terminal's echo off (``stty -echo``), which also turns
        busybox ash's line editing off, so that what follows a command is its output
        alone, however long the command line."""
        if not self._at_prompt:
            self.wait_for_shell(timeout)
        if not self._quiet:
            self.sendline("stty -echo")
            self._quiet = True
            self.wait_for_shell(timeout)
        n = next(self._markers)
        start = self._pos
        # The quotes keep the command line, should something echo it, from matching.
        self.sendline(f'{command}; echo "POPEK-RUN-""{n}-END $?"')
        end = self.expect(rf"POPEK-RUN-{n}-END (\d+)\r?\n", timeout)
        output = end.string[start:end.start()].replace("\r\n", "\n")
        # The prompt that follows is consumed too: it must not open the next command's
        # output, nor be missing from a snapshot taken now. (A command such as poweroff
        # may leave no shell to prompt.)
        with contextlib.suppress(ConsoleClosed):
            self.wait_for_shell(timeout)
        return output, int(end.group(1))
