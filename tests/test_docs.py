"""The documentation site (docs/, built by ``mkdocs build --strict`` in CI): its Python
examples run as written, every ``xpconv ...`` command its shell blocks show is one the
parser accepts, and every public module of xpconv has a page in the API reference.

A ```` ```python ```` block runs in a fresh interpreter in an empty folder (examples write
``runs/``, and one joins an MPI job); a sketch that is not meant to run is fenced
```` ```py ````.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from xpconv import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_ext" not in p.parts)


def _blocks(language: str) -> list[tuple[str, int, str]]:
    """(page, number of the block on its page, code) for every block fenced ```language."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for i, code in enumerate(re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)):
            found.append((str(page.relative_to(ROOT)), i + 1, code))
    return found


PYTHON = _blocks("python")

#: blocks another test runs in the setting they need: (page, first line) -> that test
RUN_ELSEWHERE = {
    ("docs/DISTRIBUTED.md", "from xpconv import distributed"): (
        ROOT / "tests" / "test_distributed.py", "test_the_python_example_of_docs_distributed_runs_on_two_ranks"),
}


def _elsewhere(page: str, code: str):
    return RUN_ELSEWHERE.get((page, code.splitlines()[0]))


def test_the_site_has_pages_and_python_examples():
    names = {p.name for p in PAGES}
    assert {"index.md", "install.md", "cli.md", "training.md", "ARCHITECTURE.md", "DISTRIBUTED.md"} <= names
    assert len([b for b in PYTHON if not _elsewhere(b[0], b[2])]) >= 4


def test_the_examples_run_elsewhere_are_run_there():
    for (page, first), (test_file, test_name) in RUN_ELSEWHERE.items():
        assert any(p == page and code.startswith(first) for p, _, code in PYTHON), f"{page} has no example starting {first!r}"
        assert f"def {test_name}(" in test_file.read_text(encoding="utf-8"), f"{test_file.name} has no {test_name}"


@pytest.mark.parametrize("page,n,code", PYTHON, ids=[f"{p}#{n}" for p, n, _ in PYTHON])
def test_docs_example_runs(page, n, code, tmp_path):
    if _elsewhere(page, code):
        return  # run by the test named in RUN_ELSEWHERE (checked above)
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{page} example {n} failed:\n{proc.stderr[-3000:]}"


def _commands() -> list[tuple[str, str]]:
    """(page, command line) for every ``xpconv ...`` command in a ```bash or ```sh block."""
    found = []
    for page, _, code in _blocks("(?:bash|sh)"):
        text = code.replace("\\\n", " ")
        for line in text.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            for part in re.split(r"&&|\|\||;", line):
                words = shlex.split(part)
                while words and ("=" in words[0] or words[0] in ("mpiexec", "srun")):  # VAR=value, launchers and their options
                    words = words[1:] if "=" in words[0] else words[_launcher_words(words):]
                if words and words[0] == "xpconv":
                    found.append((page, " ".join(words)))
    return found


def _launcher_words(words: list[str]) -> int:
    """How many words ``mpiexec -n 2 ...`` / ``srun --mpi=pmix -n 8 ...`` take before the command."""
    i = 1
    while i < len(words) and words[i] != "xpconv" and words[i] != "python":
        i += 1
    return i


COMMANDS = _commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p}:{c}" for p, c in COMMANDS])
def test_docs_command_parses(page, command, capsys):
    argv = shlex.split(command)[1:]
    if argv in (["--version"], ["--help"], ["-h"]):
        return
    try:
        cli.build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{page}: `{command}` is refused by the parser ({exc.code}): {capsys.readouterr().err.strip()}")


#: public modules without a page of their own in the API reference, and why
NOT_IN_REFERENCE = {
    "xpconv.cli": "the command: docs/cli.md",
    "xpconv.trainer": "a deprecated alias of xpconv.training",
    "xpconv.serve": "loads its app lazily; the app is xpconv.serve.app",
    **{f"xpconv.kernels.{m}": "fast paths behind xpconv.ops, registered per (namespace, op); xpconv.kernels is the registry"
       for m in ("cuda_source", "cupy_ops", "numba_ops", "numpy_ops")},
    **{f"xpconv.training.{m}": "its names are re-exported by xpconv.training, which has the page"
       for m in ("callbacks", "comm", "console", "loop", "runs", "schedule", "stopping")},
}


def test_every_public_module_is_in_the_api_reference():
    documented = {m for page in (DOCS / "reference").glob("*.md") for m in re.findall(r"^::: (\S+)$", page.read_text(encoding="utf-8"), re.M)}
    public = set()
    for path in (ROOT / "xpconv").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if any(p.startswith("_") for p in parts) or "__all__" not in path.read_text(encoding="utf-8"):
            continue
        public.add(".".join(parts))
    assert "xpconv.models" in public and "xpconv.models" in documented
    missing = sorted(public - documented - set(NOT_IN_REFERENCE))
    assert not missing, f"public modules missing from docs/reference/ (add a page and a nav entry in mkdocs.yml): {missing}"
    stale = sorted(set(NOT_IN_REFERENCE) - public)
    assert not stale, f"NOT_IN_REFERENCE names modules that are gone or private: {stale}"
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    unlisted = sorted(p.name for p in (DOCS / "reference").glob("*.md") if f"reference/{p.name}" not in nav)
    assert not unlisted, f"reference pages missing from mkdocs.yml's nav: {unlisted}"
