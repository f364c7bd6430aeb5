"""Tier 2's native code kept on disk, so a second run of the same guest code starts native.

What is kept: the object code LLVM made for a batch of hot blocks (MCJIT's object-cache
hook hands it over as it compiles), with the key of each block whose function it holds.
A block's native code depends on nothing but the bytes of its instructions: it takes its
pc as an argument, reaches the hart's state, TLB and jump cache through ``env``, and
calls a Python handler by the bits of the instruction it hands over
(:mod:`popek.engine.jit`). So the key is a hash of those bytes, and the code serves any
address, privilege, MMU mode, machine or process that runs them. What else shapes the
code (the source of popek's engine, isa and cpu packages, llvmlite, LLVM and the target
the code is generated for) names the directory the objects live in: a new popek starts
an empty cache beside the old one, which the size bound then removes.

Tier 1's code objects (``marshal``, so the Python version is part of the version too)
are kept the same way, by the same keys: a block that got hot enough for tier 1 in an
earlier run, but not for tier 2, starts on tier 1 without compiling (in a warm Linux
boot, ~2,100 blocks, and about a tenth of its CPU time in an A/B). So is the baseline
tier's patched code (:class:`popek.engine.jit.PatchedCode`, by the same keys): a warm
run places each block's bytes and aims its exits instead of patching it again.

Layout: ``ROOT/VERSION/PID-RANDOM.pack``. Each process appends records to a pack of its
own, so writers never share a file and a writer killed at any point leaves a readable
prefix (a pack is written as it goes rather than renamed into place at the end: a VMM
worker or a forked guest process may end without running exit handlers). A record is
checksummed (BLAKE2b); a torn, truncated or altered one fails the check and is ignored,
never loaded, and so is the rest of its file. The packs are indexed once per process,
when the first hart starts (a dict from block key to record: no file is opened per
block), and a record's object is read and loaded into LLVM the first time one of its
blocks is decoded, which then runs native at once. Packs are opened only while read
(never mapped: a pack cut short under a reader must be a failed checksum, not a
SIGBUS; nor held open: ``popek exec``'s descriptors are its guest's to close).

Bound: when the packs of every version together exceed the limit (512 MiB by default),
the least recently used go first (a pack's mtime is refreshed when one of its objects is
loaded); a pack whose writer still runs (it holds an ``flock`` on it) is never removed.
More than MAX_PACKS packs of a version are merged into one by the next process to
start. A confined VMM worker reads the cache (indexed before it confines itself, and
opened through a directory descriptor it keeps) and writes nothing
(:meth:`NativeCache.prepare_confinement`).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import hashlib
import marshal
import os
import struct
import sys
import threading
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import CodeType

DEFAULT_LIMIT = 512 << 20
ENV_VAR = "POPEK_CODE_CACHE"  # a directory, or "off"
PACK_MAGIC = b"popek native code pack 1\n"
RECORD = struct.Struct("<4sI32s")  # magic, body length, BLAKE2b-256 of the body
NATIVE = b"REC1"  # record kinds: a batch's object code
TRANSLATED = b"PY01"  # tier 1's code objects (marshal) of blocks that got hot
PATCHED = b"PAT1"  # the baseline tier's patched code: one marshalled tuple of jit.PatchedCode
KINDS = (NATIVE, TRANSLATED, PATCHED)
TRANSLATIONS_PER_RECORD = 128
CODE_LENGTH = struct.Struct("<I")
BODY = struct.Struct("<II")  # number of blocks, length of the address table's name
KEY_SIZE = 16
MAX_PACKS = 16  # more, and a process starting merges the packs no writer holds
# Where this process's pack is kept open: out of the way of a popek exec guest, whose
# descriptors are the host's (as popek.user.signals.WAKEUP_FD_MIN keeps popek's own).
WRITER_FD_MIN = 1000
SHAPING_PACKAGES = ("engine", "isa", "cpu")  # whose source shapes native code


def default_root() -> Path | None:
    """``$POPEK_CODE_CACHE`` ("off" for none), else ``$XDG_CACHE_HOME/popek/code``."""
    chosen = os.environ.get(ENV_VAR)
    if chosen == "off":
        return None
    if chosen:
        return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "popek" / "code"


def block_key(code: bytes | memoryview) -> bytes:
    """The key of a block whose instructions are the bytes ``code``."""
    return hashlib.blake2b(code, digest_size=KEY_SIZE).digest()


def checksum(body: bytes | memoryview) -> bytes:
    return hashlib.blake2b(body, digest_size=RECORD.size - 8).digest()


def source_version(toolchain: str) -> str:
    """The name of the directory for code made by this popek with ``toolchain`` (what
    llvmlite, LLVM and the target machine are)."""
    return hashlib.blake2b(f"{toolchain} python {sys.version}".encode() + _source_digest(),
                           digest_size=10).hexdigest()


@cache
def _source_digest() -> bytes:
    """The hash of what identifies the source that shapes native code: each file's path,
    size and modification time, which is how Python's own bytecode cache decides that a
    module changed (so no code runs that the source no longer says). Reading the ~0.4 MB
    of source instead took ~2-5 ms of every start. Once per process: a code cache and the
    stencil library both ask."""
    digest = hashlib.blake2b()
    package = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    for name in SHAPING_PACKAGES:
        found = []
        for directory, _, files in os.walk(os.path.join(package, name)):
            found += [os.path.join(directory, f) for f in files if f.endswith(".py")]
        for path in sorted(found):
            stat = os.stat(path)
            digest.update(f"{os.path.relpath(path, package)}\0{stat.st_size}\0"
                          f"{stat.st_mtime_ns}\0".encode())
    return digest.digest()


@dataclass(eq=False)
class Record:
    """One batch's object code in a pack, and the keys of its blocks in table order.
    Its bytes stay on disk until loaded (:meth:`NativeCache.object_code`)."""

    kind: bytes  # one of KINDS
    pack: str  # the pack's name in the version's directory
    offset: int  # of the body, which the checksum covers
    length: int
    digest: bytes
    table: str  # the symbol of the object's table of block addresses
    keys: tuple[bytes, ...]
    obj_offset: int  # where the object starts in the body
    bad: bool = False

    def body(self, fd: int) -> bytes | None:
        """The body, read from its pack open as ``fd``, if its checksum holds."""
        if not self.bad:
            try:
                body = os.pread(fd, self.length, self.offset)
            except OSError:
                body = b""
            if len(body) == self.length and checksum(body) == self.digest:
                return body
            self.bad = True
        return None


def read_pack(name: str, fd: int) -> list[Record]:
    """The records of pack ``name``, open as ``fd``, up to the first that is torn or
    malformed (a checksum that fails shows when the record is loaded)."""
    size = os.fstat(fd).st_size
    if os.pread(fd, len(PACK_MAGIC), 0) != PACK_MAGIC:
        return []
    records, at = [], len(PACK_MAGIC)
    while at + RECORD.size + BODY.size <= size:
        head = os.pread(fd, RECORD.size + BODY.size, at)
        magic, length, digest = RECORD.unpack_from(head)
        count, name_len = BODY.unpack_from(head, RECORD.size)
        obj_offset = BODY.size + name_len + count * KEY_SIZE
        if magic not in KINDS or at + RECORD.size + length > size or \
                obj_offset > length:
            break
        names = os.pread(fd, obj_offset - BODY.size, at + RECORD.size + BODY.size)
        keys = tuple(names[name_len + i * KEY_SIZE:name_len + (i + 1) * KEY_SIZE]
                     for i in range(count))
        records.append(Record(magic, name, at + RECORD.size, length, digest,
                              names[:name_len].decode("ascii", "replace"), keys, obj_offset))
        at += RECORD.size + length
    return records


def encode_record(kind: bytes, keys: list[bytes], table: str, payload: bytes) -> bytes:
    name = table.encode("ascii")
    return encode_body(kind, BODY.pack(len(keys), len(name)) + name + b"".join(keys) + payload)


def encode_body(kind: bytes, body: bytes) -> bytes:
    return RECORD.pack(kind, len(body), checksum(body)) + body


def encode_codes(codes: list[bytes]) -> bytes:
    """A TRANSLATED record's payload: each marshalled code object, length first (each is
    unmarshalled when its block needs it)."""
    return b"".join(CODE_LENGTH.pack(len(code)) + code for code in codes)


def _payload_values(record: Record, payload: bytes) -> dict[bytes, object] | None:
    """What ``record`` holds by key: TRANSLATED, marshalled code objects; PATCHED, the
    values of one marshalled tuple (None if it is not one of as many)."""
    if record.kind == TRANSLATED:
        return decode_codes(record.keys, payload)
    try:
        values = marshal.loads(payload)
    except (ValueError, EOFError, TypeError):
        return None
    if type(values) is not tuple or len(values) != len(record.keys):
        return None
    return dict(zip(record.keys, values, strict=True))


def decode_codes(keys: tuple[bytes, ...], payload: bytes) -> dict[bytes, bytes]:
    codes, at = {}, 0
    for key in keys:
        (length,) = CODE_LENGTH.unpack_from(payload, at)
        codes[key] = payload[at + CODE_LENGTH.size:at + CODE_LENGTH.size + length]
        at += CODE_LENGTH.size + length
    return codes


@dataclass
class CacheStats:
    """What the cache did in this process (``--stats`` prints it; tests assert it)."""

    indexed: int = 0  # block keys found on disk at start
    loaded: int = 0  # objects loaded from disk
    reused: int = 0  # blocks that ran native at first sight (code from disk or this run)
    stored: int = 0  # blocks written
    translated: int = 0  # blocks on tier 1 at first sight, their code from disk
    corrupt: int = 0  # records that failed their checksum

    def summary(self) -> str:
        return (f"popek: code cache: {self.reused} blocks native at first sight, "
                f"{self.loaded} objects loaded of {self.indexed} blocks indexed, "
                f"{self.stored} blocks stored, {self.translated} blocks on tier 1 at first "
                f"sight, {self.corrupt} corrupt records ignored")


@dataclass
class NativeCache:
    """The process's view of the cache: its index, its own pack, and the bound."""

    root: Path | None = field(default_factory=default_root)
    limit: int = DEFAULT_LIMIT
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        self.index: dict[bytes, Record] | None = None  # None: not read yet
        self.translations: dict[bytes, Record] = {}
        self.patched: dict[bytes, Record] = {}
        # what records read hold by key (marshalled code objects, patched code), by digest
        self._codes: dict[bytes, dict[bytes, object]] = {}
        # what is not written yet, by kind: (key, marshalled code object or patched code)
        self._pending: dict[bytes, list[tuple[bytes, bytes]]] = {TRANSLATED: [], PATCHED: []}
        self.toolchain: str | None = None
        self.directory: Path | None = None
        # A confined process opens packs relative to the directory it opened before.
        self._directory_fd: int | None = None
        self._writer: int | None = None
        self._confined = False  # may only read the packs indexed
        self._lock = threading.Lock()  # the compiler threads of several harts store

    @property
    def enabled(self) -> bool:
        return self.root is not None

    @property
    def confined(self) -> bool:
        """Whether this process is a confined VMM worker (see prepare_confinement)."""
        return self._confined

    @property
    def writable_root(self) -> Path | None:
        """Where this process may keep what it builds once (the stencil library); None
        without a cache or once confined."""
        return None if self._confined else self.root

    def configure(self, root: Path | None, limit: int = DEFAULT_LIMIT) -> None:
        """Use the cache at ``root`` (None: none) from now on; read again when next used."""
        self.close()
        if self._directory_fd is not None:
            os.close(self._directory_fd)
            self._directory_fd = None
        self.root, self.limit, self.stats = root, limit, CacheStats()
        self.index, self.directory = None, None
        self.translations, self.patched, self._codes = {}, {}, {}
        self._pending = {TRANSLATED: [], PATCHED: []}
        self._confined = False

    def close(self) -> None:
        """Close this process's pack: what it writes next goes to a new one."""
        if self._writer is not None:
            os.close(self._writer)
            self._writer = None

    def open(self, toolchain: str) -> None:
        """Index the packs of this version once (a hart's native tier starts)."""
        if self.index is not None or self.root is None:
            return
        self.index, self.toolchain = {}, toolchain
        try:
            self.directory = self.root / source_version(toolchain)
            if not self._confined:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._evict()
            packs = sorted(self.directory.glob("*.pack"))
            if len(packs) > MAX_PACKS and not self._confined:
                with contextlib.suppress(OSError):  # a full disk, say: index them as they are
                    self._merge(packs)
                packs = sorted(self.directory.glob("*.pack"))
        except OSError as err:
            print(f"popek: code cache {self.root}: {err.strerror or err}; running without it",
                  file=sys.stderr)
            self.root = None
            return
        for path in packs:
            try:
                fd = self._open_pack(path.name)
            except OSError:
                continue  # removed meanwhile
            try:
                for record in read_pack(path.name, fd):
                    index = self._index_of(record.kind)
                    for key in record.keys:
                        index.setdefault(key, record)
            finally:
                os.close(fd)
        self.stats.indexed = len(self.index)

    def _index_of(self, kind: bytes) -> dict[bytes, Record]:
        return self.index if kind == NATIVE else self.translations if kind == TRANSLATED \
            else self.patched

    def _open_pack(self, name: str) -> int:
        """A pack, opened for reading for as long as it is read: the descriptors of
        ``popek exec`` are the guest's, which may close any of them."""
        if self._directory_fd is not None:
            return os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._directory_fd)
        return os.open(self.directory / name, os.O_RDONLY | os.O_CLOEXEC)

    def payload(self, record: Record) -> bytes | None:
        """``record``'s object code or code objects, if its checksum holds."""
        try:
            fd = self._open_pack(record.pack)
        except OSError:
            return None  # removed meanwhile: a miss, not a corrupt record
        try:
            body = record.body(fd)
        finally:
            os.close(fd)
        return None if body is None else body[record.obj_offset:]

    def prepare_confinement(self) -> None:
        """This process is about to be confined (:func:`popek.vmm.jail.confine`): index the
        packs afresh now, for afterwards it may only read what it has open. It adds
        nothing to the cache: a confined worker is the one process a hostile guest may
        have subverted, and others would run the code it wrote. (The worker's native tier
        started in the fork server it came from, which knows the toolchain; without one,
        its first hart indexes what its uid may still read.)"""
        if self.root is not None and self.toolchain is not None:
            toolchain = self.toolchain
            self._directory_fd = None  # a worker closed every descriptor it did not know of
            self.configure(self.root, self.limit)
            self.open(toolchain)
            with contextlib.suppress(OSError):
                self._directory_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY |
                                             os.O_CLOEXEC)
        self.close()
        self._confined = True

    def lookup(self, key: bytes) -> Record | None:
        return self.index.get(key) if self.index else None

    def loaded(self, record: Record) -> None:
        """``record``'s object was loaded: its pack was used recently."""
        self.stats.loaded += 1
        if not self._confined:
            with contextlib.suppress(OSError):
                os.utime(self.directory / record.pack)

    def discard(self, record: Record) -> None:
        """``record`` failed its checksum (or its pack was removed): forget its blocks."""
        self.stats.corrupt += record.bad
        index = self._index_of(record.kind)
        for key in record.keys:
            if index.get(key) is record:
                del index[key]

    def translation(self, key: bytes) -> CodeType | None:
        """Tier 1's code for the block with ``key``, if an earlier run translated it."""
        code = self.code_object(key)
        if code is not None:
            self.stats.translated += 1
        return code

    def code_object(self, key: bytes) -> CodeType | None:
        """The Python code kept with ``key`` (tier 1's blocks, the interpreter's handlers),
        if an earlier run compiled it."""
        code = self._kept(self.translations, key)
        try:
            code = marshal.loads(code) if code is not None else None
        except (ValueError, EOFError, TypeError):  # (checksummed: only a bug gets here)
            return None
        return code if isinstance(code, CodeType) else None

    def patched_code(self, key: bytes) -> object:
        """The baseline tier's patched code kept with ``key`` (a jit.PatchedCode as a tuple;
        the caller checks its shape), or None. It is given once: a block is placed once
        (holding every record's blocks cost a warm boot ~22 MiB)."""
        return self._kept(self.patched, key, take=True)

    def _kept(self, index: dict[bytes, Record], key: bytes, take: bool = False) -> object:
        """What a record of ``index`` holds for ``key`` (None if none, or if the record
        fails its checksum); with ``take``, forgotten here."""
        record = index.get(key)
        if record is None:
            return None
        codes = self._codes.get(record.digest)
        if codes is None:
            payload = self.payload(record)
            codes = None if payload is None else _payload_values(record, payload)
            if codes is None:
                self.discard(record)
                return None
            self._codes[record.digest] = codes
        return codes.pop(key, None) if take else codes.get(key)

    def translated(self, key: bytes, code: CodeType) -> None:
        """Python ``code`` was compiled for ``key`` (see code_object): written with the
        next TRANSLATIONS_PER_RECORD, or at exit."""
        self._keep(TRANSLATED, self.translations, key, marshal.dumps(code))

    def keep_patched(self, key: bytes, patched: tuple) -> None:
        """A block with ``key`` was patched into ``patched`` (jit.PatchedCode, as a tuple):
        written as translations are, all of a record marshalled at once (~1 us a block
        less than one by one, on a cold run of ~30,000 blocks)."""
        self._keep(PATCHED, self.patched, key, patched)

    def _keep(self, kind: bytes, index: dict[bytes, Record], key: bytes, value: object) -> None:
        if self.directory is not None and not self._confined and key not in index:
            pending = self._pending[kind]
            pending.append((key, value))
            if len(pending) >= TRANSLATIONS_PER_RECORD:
                self.flush()

    def flush(self) -> None:
        """Write the translations and patched code noted so far."""
        for kind, pending in self._pending.items():
            if pending:
                self._pending[kind] = []
                values = [value for _, value in pending]
                self.store([key for key, _ in pending], "", encode_codes(values)
                           if kind == TRANSLATED else marshal.dumps(tuple(values)), kind=kind)

    def store(self, keys: list[bytes], table: str, payload: bytes,
              kind: bytes = NATIVE) -> None:
        """Append the object code of blocks ``keys`` (with address table ``table``), or
        the ``kind`` TRANSLATED or PATCHED payload of marshalled values."""
        if self.root is None or self.directory is None:
            return
        data = encode_record(kind, keys, table, payload)
        with self._lock:
            if self._writer is None and not self._confined:
                self._open_writer()
            if self._writer is None:
                return
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._writer, view):]
            except OSError:  # a full disk, say: stop writing, keep running
                self.close()
                self._confined = True
                return
        if kind == NATIVE:
            self.stats.stored += len(keys)

    def forget_writer(self) -> None:
        """In a forked child: the pack is the parent's; write a pack of its own."""
        if self._writer is not None:
            os.close(self._writer)
            self._writer = None
        self._lock = threading.Lock()
        self._pending = {TRANSLATED: [], PATCHED: []}  # the parent writes them

    def _open_writer(self) -> None:
        """This process's pack: locked (which tells other processes its writer lives)
        before it takes a name they look at."""
        name = f"{os.getpid()}-{os.urandom(4).hex()}.pack"
        fresh = self.directory / f".{name}"
        try:
            fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND |
                         os.O_CLOEXEC, 0o644)
        except OSError:
            self._confined = True  # a read-only cache: use it, add nothing
            return
        try:
            with contextlib.suppress(OSError):  # (a descriptor limit below it)
                fd, low = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, WRITER_FD_MIN), fd
                os.close(low)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, PACK_MAGIC)
            fresh.rename(self.directory / name)
        except OSError:
            os.close(fd)
            fresh.unlink(missing_ok=True)
            self._confined = True
            return
        self._writer = fd

    def _merge(self, packs: list[Path]) -> None:
        """Merge the packs that no process writes into one, so a process indexes a few
        files rather than one per process that ever compiled. Each is locked while it is
        read, so no other process merges or removes it meanwhile; the merged pack is
        renamed into place before they are removed, so a reader sees every record."""
        held: list[tuple[Path, int]] = []
        merged = self.directory / f".merging-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            for path in packs:
                try:
                    fd = self._open_pack(path.name)
                except OSError:
                    continue  # merged or removed by another process
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)  # its writer runs, or another process merges it
                    continue
                held.append((path, fd))
            if len(held) < 2:
                return
            seen: set[bytes] = set()
            with open(merged, "wb") as out:
                out.write(PACK_MAGIC)
                for path, fd in held:
                    for record in read_pack(path.name, fd):
                        body = record.body(fd)
                        if body is not None and record.digest not in seen:
                            seen.add(record.digest)
                            out.write(encode_body(record.kind, body))
            merged.rename(self.directory / f"{os.getpid()}-{os.urandom(4).hex()}.pack")
            for path, _ in held:
                path.unlink(missing_ok=True)
        finally:
            merged.unlink(missing_ok=True)
            for _, fd in held:
                os.close(fd)

    def _evict(self) -> None:
        """Remove the least recently used packs of any version until the rest fit."""
        packs = []
        for path in self.root.glob("*/*.pack"):
            try:
                st = path.stat()
            except OSError:
                continue
            packs.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in packs)
        for _, size, path in sorted(packs):
            if total <= self.limit:
                return
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                path.unlink()
                total -= size
            except OSError:
                pass  # its writer runs
            finally:
                os.close(fd)


CACHE = NativeCache()
os.register_at_fork(after_in_child=CACHE.forget_writer)
atexit.register(CACHE.flush)


def add_cache_args(parser: argparse.ArgumentParser) -> None:
    """``--code-cache DIR`` and ``--no-code-cache``, for the commands that run guests."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--code-cache", type=Path, metavar="DIR",
                       help="keep native code (patched and compiled) in DIR, so the next "
                       "run of the same guest code starts native (default "
                       "$POPEK_CODE_CACHE, else $XDG_CACHE_HOME/popek/code)")
    group.add_argument("--no-code-cache", action="store_true",
                       help="neither read nor write native code on disk")


def use_cache_args(args: argparse.Namespace, inherit: bool = False) -> None:
    """Apply the flags to this process, and with ``inherit`` to the processes it starts
    (the VMM's workers, through the environment)."""
    if args.no_code_cache:
        chosen = "off"
    elif args.code_cache is not None:
        chosen = str(args.code_cache.absolute())
    else:
        return
    if inherit:
        os.environ[ENV_VAR] = chosen
    CACHE.configure(None if chosen == "off" else Path(chosen))
