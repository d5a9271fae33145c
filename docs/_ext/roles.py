"""A griffe extension for the API reference: the docstrings are written with Sphinx's roles
(``:class:`Trainer` ``, ``:mod:`~xpconv.training.loop` ``); Markdown has none, so each role
becomes a code span (``~`` keeps the last dotted part, as in Sphinx)."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc):`(~?)([^`]+)`")


def _span(match: re.Match[str]) -> str:
    name = match.group(2).strip()
    return f"`{name.rpartition('.')[2] if match.group(1) else name}`"


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_span, obj.docstring.value)
