"""Read pytest's JUnit XML: counts, and the tests that skipped, for run.sh's verdicts.

    python benchmarks/gpu/junit.py [--no-skips] [--expect N] [--merge OUT.xml] FILE.xml...

Prints one line ``N passed, F failed, E errors, S skipped`` (then each skipped test with
its reason) and exits 1 when a test failed or errored, when no test ran, with
``--expect N`` when fewer than N tests are in the files (pytest collected N: the rest never
ran), or, with ``--no-skips``, when any test skipped (a GPU stage that skips proves
nothing).  A missing, empty or unreadable file counts as a failure (the run was killed
before pytest wrote it).
``--merge`` writes all the files' test cases into one XML file.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def read(paths: list[str]):
    cases, problems = [], []
    for path in paths:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError) as exc:
            problems.append(f"{path}: no JUnit XML ({type(exc).__name__}: {exc})")
            continue
        cases += list(root.iter("testcase"))
    return cases, problems


def verdict(paths: list[str], no_skips: bool, expect: int | None = None) -> tuple[int, list[str]]:
    cases, problems = read(paths)
    failed = [c for c in cases if c.find("failure") is not None]
    errors = [c for c in cases if c.find("error") is not None]
    skipped = [c for c in cases if c.find("skipped") is not None]
    passed = len(cases) - len(failed) - len(errors) - len(skipped)
    lines = [f"{passed} passed, {len(failed)} failed, {len(errors)} errors, {len(skipped)} skipped"]
    name = lambda c: f"{c.get('classname', '')}::{c.get('name', '')}"  # noqa: E731
    for c in skipped:
        lines.append(f"  skipped {name(c)}: {c.find('skipped').get('message', '')}")
    for c in failed + errors:
        lines.append(f"  FAILED {name(c)}")
    lines += [f"  {p}" for p in problems]
    short = expect is not None and len(cases) < expect
    if short:
        lines.append(f"  FAILED: {expect} tests collected but {len(cases)} in the JUnit XML (the rest never ran)")
    bad = bool(failed or errors or problems or not cases or short or (no_skips and skipped))
    if no_skips and skipped:
        lines.append(f"  FAILED: {len(skipped)} GPU test(s) skipped; a GPU stage must run every test")
    if not cases and not problems:
        lines.append("  FAILED: no tests ran")
    return (1 if bad else 0), lines


def merge(paths: list[str], out: str) -> None:
    cases, _ = read(paths)
    suite = ET.Element("testsuite", name="pytest", tests=str(len(cases)))
    suite.extend(cases)
    root = ET.Element("testsuites")
    root.append(suite)
    ET.ElementTree(root).write(out, encoding="utf-8", xml_declaration=True)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    no_skips = "--no-skips" in args
    args = [a for a in args if a != "--no-skips"]
    out, expect = None, None
    if "--expect" in args:
        i = args.index("--expect")
        expect = int(args[i + 1])
        del args[i : i + 2]
    if "--merge" in args:
        i = args.index("--merge")
        out = args[i + 1]
        del args[i : i + 2]
    if out:
        merge(args, out)
    rc, lines = verdict(args, no_skips, expect)
    print("\n".join(lines))
    return rc


if __name__ == "__main__":
    sys.exit(main())
