"""Long fuzzing runs: the targets of tests/fuzz/ for as long as you like, findings collected.

The test suite runs each target briefly (a fixed seed, a fixed number of inputs); this
script runs them for a given time or number of inputs. libFuzzer stops at a finding,
so a target is restarted with the next seed until its time or inputs are spent, keeping
what it learnt (its work directory's corpus). It prints, per target, the inputs run,
executions per second of wall time and of CPU time, and each distinct finding (the
exception, timeout or memory blow-up, with the input that caused it, to replay with
``python -m tests.fuzz.run NAME FILE``).

    python bench/fuzz.py [--target NAME]... [--seconds N | --runs N] [--seed S]
                         [--workdir DIR] [--merge]

``--merge`` adds what the runs found to the committed corpus (tests/fuzz/corpus/NAME),
only the inputs that reach code the corpus does not.
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fuzz.harness import ROOT, TARGETS  # noqa: E402


@dataclass
class Report:
    name: str
    runs: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    findings: dict[str, str] = field(default_factory=dict)  # signature -> input file


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _signature(log: str) -> str:
    """One line naming a finding: the exception and where it was raised, or libFuzzer's
    verdict (timeout, out-of-memory)."""
    if "=== Uncaught Python exception: ===" in log:
        tail = log.split("=== Uncaught Python exception: ===", 1)[1]
        kind = tail.strip().splitlines()[0]
        frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', tail)
        where = next((f"{Path(f).name}:{n} {fn}" for f, n, fn in reversed(frames)
                      if "/site-packages/" not in f), "")
        return f"{kind[:120]} at {where}"
    verdict = re.search(r"ERROR: libFuzzer: ([^\n]+)", log)
    return verdict.group(1) if verdict else "the fuzzer failed: " + log.strip()[-200:]


def fuzz(name: str, work: Path, seconds: float | None, runs: int | None, seed: int) -> Report:
    report = Report(name)
    started, cpu = time.monotonic(), _cpu()
    while True:
        left_s = None if seconds is None else seconds - (time.monotonic() - started)
        left_runs = None if runs is None else runs - report.runs
        if (left_s is not None and left_s < 1) or (left_runs is not None and left_runs < 1):
            break
        limit = f"-max_total_time={int(left_s)}" if left_s is not None else f"-runs={left_runs}"
        proc = subprocess.run(
            [sys.executable, "-m", "tests.fuzz.run", name, f"-seed={seed}", limit,
             "-print_final_stats=1", str(work)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace")  # (atheris prints Python's traceback on stdout)
        log = proc.stdout
        done = re.search(r"stat::number_of_executed_units: (\d+)", log)
        report.runs += int(done.group(1)) if done else 0
        if proc.returncode != 0:
            unit = re.search(r"Test unit written to (\S+)", log)
            report.findings.setdefault(_signature(log),
                                       unit.group(1) if unit else "(no input saved)")
            if not done:  # libFuzzer died before its statistics: count what it reported
                counts = re.findall(r"^#(\d+)", log, re.MULTILINE)
                report.runs += int(counts[-1]) if counts else 0
        seed += 1
    report.wall, report.cpu = time.monotonic() - started, _cpu() - cpu
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", choices=TARGETS,
                        help="a target to run (repeatable; default: all)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=float, help="wall time per target (default 60)")
    budget.add_argument("--runs", type=int, help="inputs per target")
    parser.add_argument("--seed", type=int, default=1, help="first libFuzzer seed (1)")
    parser.add_argument("--workdir", type=Path,
                        help="keeps each target's corpus and findings across runs "
                             "(default: a new temporary directory)")
    parser.add_argument("--merge", action="store_true",
                        help="add new coverage to the committed corpus afterwards")
    args = parser.parse_args()
    seconds = args.seconds if args.seconds is not None or args.runs is not None else 60.0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="popek-fuzz-"))
    print(f"work directory: {workdir}")
    print(f"{'target':<10} {'inputs':>10} {'wall s':>8} {'exec/s':>8} {'CPU s':>8} "
          f"{'exec/CPU s':>10}  findings")
    total = 0
    for name in args.target or TARGETS:
        report = fuzz(name, workdir / name, seconds, args.runs, args.seed)
        print(f"{name:<10} {report.runs:>10} {report.wall:>8.0f} "
              f"{report.runs / max(report.wall, 1e-9):>8.0f} {report.cpu:>8.0f} "
              f"{report.runs / max(report.cpu, 1e-9):>10.0f}  {len(report.findings)}")
        for signature, unit in report.findings.items():
            print(f"    {signature}\n        input: {unit}")
        total += len(report.findings)
        if args.merge:
            subprocess.run([sys.executable, "-m", "tests.fuzz.run", name, "--merge",
                            str(workdir / name)], cwd=ROOT, capture_output=True, check=True)
    sys.exit(1 if total else 0)


if __name__ == "__main__":
    main()
