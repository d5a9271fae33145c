"""A griffe extension for the API reference: the docstrings are written with Sphinx's roles
(``:class:`Trainer` ``, ``:mod:`~xpconv.training.loop` ``), which Markdown lacks. A role whose
name resolves, in the scope of the docstring's object, to an object the reference shows becomes
a cross-reference (checked by ``mkdocs build --strict``); any other (NumPy's, a private
helper's, a constant without a docstring) becomes a code span. ``~`` shows the last dotted part
only, as in Sphinx. What the reference shows: the modules named by ``::: module`` lines in
docs/reference/, their ``__all__`` members that have a docstring, and those members' public
documented members (the handler's options in mkdocs.yml: private names filtered, objects
without a docstring left out)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc):`(~?)([^`]+)`")
REFERENCE = Path(__file__).resolve().parents[1] / "reference"


def _documented_modules() -> list[str]:
    return [m.group(1) for page in sorted(REFERENCE.glob("*.md")) for m in re.finditer(r"^::: (\S+)", page.read_text(), re.M)]


def _final(obj: griffe.Object | griffe.Alias) -> griffe.Object | None:
    try:
        return obj.final_target if isinstance(obj, griffe.Alias) else obj
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _shown(package: griffe.Module) -> set[str]:
    """The paths (as written and canonical) of every object the reference renders."""
    shown: set[str] = set()

    def add(obj: griffe.Object, path: str) -> None:
        shown.update((path, obj.path))
        if obj.is_class:
            for name, member in obj.members.items():
                target = _final(member)
                if not name.startswith("_") and target is not None and target.docstring is not None:
                    add(target, f"{path}.{name}")

    for module_path in _documented_modules():
        module = package if module_path == package.name else package[module_path.partition(".")[2]]
        shown.add(module.path)
        names = list(module.exports) if module.exports is not None else [n for n in module.members if not n.startswith("_")]
        for name in names:
            name = name if isinstance(name, str) else name.name
            if name not in module.members or module_path == package.name:  # the package page shows its docstring only
                continue
            target = _final(module.members[name])
            if target is not None and target.docstring is not None and not target.is_module:
                add(target, f"{module.path}.{name}")
    return shown


def _target(obj: griffe.Object, name: str, package: griffe.Module, shown: set[str]) -> str | None:
    """The path of the xpconv object ``name`` means in ``obj``'s docstring, when the reference shows it."""
    first, _, rest = name.partition(".")
    try:
        path = name if first == package.name else obj.resolve(first) + (f".{rest}" if rest else "")
    except (griffe.NameResolutionError, ValueError):
        return None
    parts = path.split(".")
    if parts[0] != package.name or any(p.startswith("_") for p in parts[1:]):
        return None
    try:
        found = package[".".join(parts[1:])] if len(parts) > 1 else package
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None
    target = _final(found)
    return target.path if target is not None and target.path in shown else None


def _rewrite(obj: griffe.Object, package: griffe.Module, shown: set[str]) -> None:
    if obj.docstring is None:
        return

    def sub(match: re.Match[str]) -> str:
        name = match.group(2).strip()
        text = name.rpartition(".")[2] if match.group(1) else name
        target = _target(obj, name, package, shown)
        return f"[`{text}`][{target}]" if target else f"`{text}`"

    obj.docstring.value = ROLE.sub(sub, obj.docstring.value)


def _walk(obj: griffe.Object, package: griffe.Module, shown: set[str], seen: set[str]) -> None:
    if obj.path in seen:
        return
    seen.add(obj.path)
    _rewrite(obj, package, shown)
    for member in obj.members.values():
        if not member.is_alias:
            _walk(member, package, shown, seen)  # type: ignore[arg-type]


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.parent is None:  # the top-level package, loaded with all its subpackages
            _walk(pkg, pkg, _shown(pkg), set())
