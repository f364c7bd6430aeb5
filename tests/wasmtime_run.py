"""``wasmtime run`` for the tests and benchmarks, on PyPI's wasmtime (which has no command
line): popek wasm run's flags (--dir HOST[::GUEST], --env K=V, --max-memory SIZE) and
the exit statuses of wasmtime's command line (the program's; 134 after a trap, 1 after
another error).

    python tests/wasmtime_run.py [--dir D] [--env K=V] [--max-memory SIZE] FILE.wasm [ARG...]
"""

from __future__ import annotations

import argparse
import os
import sys

import wasmtime

from popek.machine.config import parse_size

TRAP_STATUS = 134  # wasmtime's command line: 128 + SIGABRT
ERROR_STATUS = 1  # ... and for any other error


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", action="append", default=[])
    parser.add_argument("--env", action="append", default=[])
    parser.add_argument("--max-memory", type=parse_size, help="linear memory at most (64M)")
    parser.add_argument("file")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    if args.max_memory is not None:
        store.set_limits(memory_size=args.max_memory)
    wasi = wasmtime.WasiConfig()
    wasi.argv = [os.path.basename(args.file), *args.args]
    wasi.env = [spec.split("=", 1) for spec in args.env]
    for spec in args.dir:
        host, _, guest = spec.partition("::")
        wasi.preopen_dir(host, guest or host)
    wasi.inherit_stdin()
    wasi.inherit_stdout()
    wasi.inherit_stderr()
    store.set_wasi(wasi)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    module = wasmtime.Module.from_file(engine, args.file)
    try:
        linker.instantiate(store, module).exports(store)["_start"](store)
    except wasmtime.ExitTrap as e:
        return e.code
    except wasmtime.Trap as e:
        print(f"wasmtime: {e}", file=sys.stderr)
        return TRAP_STATUS
    except wasmtime.WasmtimeError as e:  # e.g. a bad pointer handed to WASI
        print(f"wasmtime: {e}", file=sys.stderr)
        return ERROR_STATUS
    return 0


if __name__ == "__main__":
    sys.exit(main())
