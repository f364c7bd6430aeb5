"""Post-copy migration's destination side: the pages the guest lacks, fetched on touch.

After one pre-copy pass the guest runs on the destination at once (``--postcopy``). The
pages it wrote on the source since that pass are *absent* here (``mark_absent``, "Absent
pages" in :mod:`popek.cpu.physmem`, the mechanism a swapped-out VM uses too), with
:class:`PostCopy`, the migration's connection, as their page source: the first touch of
one, by any tier's software MMU or a device's DMA, asks the source for it (and the
absent ones after it) and waits; meanwhile the source pushes the rest, which the
machine runner installs as they arrive (``fill_absent``: only pages still absent take
them). No userfaultfd: popek's MMU is the one door to guest RAM.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from popek.cpu.physmem import PAGE_SHIFT, PAGE_SIZE, PhysicalMemory
from popek.vmm import migration_wire as wire
from popek.vmm.migration_wire import Connection, WireError, os_reason


class PagesLost(OSError):
    """A post-copy's destination cannot get a page its guest needs: the source is gone.
    The guest cannot go on (as under QEMU's post-copy: from the handover until every
    page has come, the guest needs both hosts)."""


class PostCopy:
    """The page source of a post-copy's destination (see "Absent pages" in
    :mod:`popek.cpu.physmem`): the pages the guest had not got at the handover are absent,
    and the first touch of one asks the source for it (and the absent ones after it)
    while the source pushes the rest, which :meth:`take_pushed` installs as the runner
    finds them on the connection. No userfaultfd: the software MMU is the one door."""

    def __init__(self, conn: Connection, memory: PhysicalMemory) -> None:
        self.conn, self.mem = conn, memory
        self.done = False  # the source has sent every page

    def fetch(self, runs: list[tuple[int, int]], ram: memoryview) -> None:
        wanted = {first + i for first, count in runs for i in range(count)}
        with self._needed():
            for at in range(0, len(runs), wire.MAX_REQUEST_RUNS):
                self.conn.send_request(runs[at:at + wire.MAX_REQUEST_RUNS])
            while wanted:
                self._take(self.conn.receive(), wanted, ram)

    def take_pushed(self) -> None:
        """Install the next frame the source sent unasked (the runner saw it arrive)."""
        with self._needed():
            self._take(self.conn.receive(), set(), None)

    @contextlib.contextmanager
    def _needed(self) -> Iterator[None]:
        """Failing to get pages is PagesLost, one line."""
        try:
            yield
        except (OSError, WireError) as err:
            raise PagesLost(f"post-copy: the source cannot send pages the guest needs "
                            f"({os_reason(err) if isinstance(err, OSError) else err})") \
                from None

    def _take(self, frame: wire.Frame, wanted: set[int], ram: memoryview | None) -> None:
        if frame.kind == wire.DONE:
            self.done = True
            return
        if frame.kind != wire.PAGES:
            raise WireError(f"a {frame.name} frame during post-copy, not PAGES")
        first, count = frame.run()
        if first + count > self.mem.size >> PAGE_SHIFT:
            raise WireError(f"pages {first}+{count} lie outside RAM (corrupt stream)")
        data = frame.pages()
        if not wanted:
            self.mem.fill_absent(first, data)
            return
        for page in range(first, first + count):
            at = (page - first) << PAGE_SHIFT
            if page in wanted:  # make_present marks them present once all are in
                ram[page << PAGE_SHIFT:(page + 1) << PAGE_SHIFT] = data[at:at + PAGE_SIZE]
                wanted.discard(page)
            else:
                self.mem.fill_absent(page, data[at:at + PAGE_SIZE])


def absent_from_source(conn: Connection, memory: PhysicalMemory,
                        runs: Any) -> PostCopy | None:
    """The pages a post-copy's source still holds, absent here (fetched on first touch)."""
    if runs is None:
        return None
    pages = memory.size >> PAGE_SHIFT
    if not isinstance(runs, list) or not all(
            isinstance(r, list) and len(r) == 2 and all(type(n) is int for n in r)
            and 0 <= r[0] and 0 < r[1] and r[0] + r[1] <= pages for r in runs):
        raise WireError("the post-copy's pages are not runs within RAM (corrupt stream)")
    source = PostCopy(conn, memory)
    memory.mark_absent([(first, count) for first, count in runs], source)
    return source
