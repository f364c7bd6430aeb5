"""Run one fuzz target under atheris: ``python -m tests.fuzz.run NAME [--ci] [ARGS...] DIR``.

ARGS are libFuzzer's flags (``-max_total_time=60``, ``-seed=7``...). DIR is a work
directory: ``DIR/corpus`` receives the target's generated seeds and every new input
libFuzzer finds, ``DIR/findings`` the inputs that broke the target. The committed corpus
``tests/fuzz/corpus/NAME`` is read after them and never written. ``--ci`` is the short,
deterministic run the test suite makes: a fixed seed, the whole corpus replayed first,
then a fixed number of new inputs. Exit status 0 means no finding.

``python -m tests.fuzz.run NAME FILE...`` runs just those inputs (to replay a finding);
``python -m tests.fuzz.run NAME --merge DIR`` adds to the committed corpus the inputs of
``DIR/corpus`` that reach code it does not (libFuzzer's ``-merge=1``).
"""

from __future__ import annotations

import importlib
import os
import resource
import shutil
import sys
from pathlib import Path

import atheris

from tests.fuzz.harness import (
    CI_SEED,
    CORPUS,
    RSS_LIMIT_MB,
    TARGETS,
    TIMEOUT_SECONDS,
    Target,
    corpus_files,
)


def _load(name: str) -> Target:
    if name not in TARGETS:
        sys.exit(f"unknown fuzz target {name!r}; targets: {', '.join(TARGETS)}")
    # Targets build machines to parse into, not to run: the cheapest tier is built.
    os.environ.setdefault("POPEK_ENGINE", "interp")
    with atheris.instrument_imports(include=["popek"]):
        target = importlib.import_module(f"tests.fuzz.{name}").TARGET
    if target.address_space is not None:
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(resource.RLIMIT_AS, (target.address_space, hard))
    return target


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    name, args = sys.argv[1], sys.argv[2:]
    ci, merge = "--ci" in args, "--merge" in args
    args = [a for a in args if a not in ("--ci", "--merge")]
    flags = [a for a in args if a.startswith("-")]
    paths = [Path(a) for a in args if not a.startswith("-")]
    if paths and all(p.is_file() for p in paths):
        target = _load(name)
        atheris.Setup([sys.argv[0], f"-rss_limit_mb={RSS_LIMIT_MB}", *flags, *map(str, paths)],
                      target.one)
        atheris.Fuzz()
    if len(paths) != 1:
        sys.exit("name one work directory, or input files")
    work = paths[0]
    if merge:  # (not the generated seeds: those are made anew at every start)
        target = _load(name)
        found = work / "merge"
        shutil.rmtree(found, ignore_errors=True)
        found.mkdir()
        for path in (work / "corpus").iterdir():
            if not path.name.startswith("seed-"):
                shutil.copy(path, found)
        (CORPUS / name).mkdir(parents=True, exist_ok=True)
        atheris.Setup([sys.argv[0], "-merge=1", f"-max_len={target.max_len}", *flags,
                       str(CORPUS / name), str(found)], target.one)
        atheris.Fuzz()
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    (work / "findings").mkdir(exist_ok=True)
    target = _load(name)
    seeds = target.seeds()
    for seed_name, data in seeds.items():
        (work / "corpus" / f"seed-{seed_name}").write_bytes(data)
    ours = [f"-max_len={target.max_len}", f"-timeout={TIMEOUT_SECONDS}",
            f"-rss_limit_mb={RSS_LIMIT_MB}", f"-artifact_prefix={work / 'findings'}/"]
    if ci:
        replayed = len(corpus_files(name)) + len(seeds)
        ours += [f"-seed={CI_SEED}", f"-runs={replayed + target.ci_runs}"]
    corpus = [str(CORPUS / name)] if (CORPUS / name).is_dir() else []
    # libFuzzer takes the last of a repeated flag: the caller's win over ours.
    atheris.Setup([sys.argv[0], *ours, *flags, str(work / "corpus"), *corpus], target.one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
