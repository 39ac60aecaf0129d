"""MkDocs hook: the docstrings' reStructuredText roles and literal-block markers render as plain code.

kdpp's docstrings are Google style with Sphinx cross-reference roles (``:class:`kdpp.TeacherRefinement```)
and ``::`` before a formula block, which read well in ``help()`` and an editor. mkdocstrings renders
Markdown, where a role's backticks become ``<code>`` and the role's name stays as text
(``:class:<code>kdpp.TeacherRefinement</code>``) and ``::`` stays doubled. This hook drops the role
name and the second colon from the built HTML.
"""
from __future__ import annotations

import re

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc|const|ref):(<code>)")
LITERAL_MARKER = re.compile(r"::(</p>)")


def on_page_content(html: str, **kwargs) -> str:
    return LITERAL_MARKER.sub(r":\1", ROLE.sub(r"\1", html))
