"""MkDocs hook: the API page's text as a reader needs it, whatever checkout built the site.

- kdpp's docstrings are Google style with Sphinx cross-reference roles (``:class:`kdpp.TeacherRefinement```)
  and ``::`` before a formula block, which read well in ``help()`` and an editor. mkdocstrings renders
  Markdown, where a role's backticks become ``<code>`` and the role's name stays as text
  (``:class:<code>kdpp.TeacherRefinement</code>``) and ``::`` stays doubled: the role name and the
  second colon are dropped.
- Module constants built from ``__file__`` (the shipped weights' paths) are shown with their values,
  which hold the building checkout's absolute path: it is cut to the path inside the repository.
"""
from __future__ import annotations

import re
from pathlib import Path

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc|const|ref):(<code>)")
LITERAL_MARKER = re.compile(r"::(</p>)")


def on_page_content(html: str, config, **kwargs) -> str:
    root = str(Path(config.config_file_path).resolve().parent) + "/"
    return LITERAL_MARKER.sub(r":\1", ROLE.sub(r"\1", html)).replace(root, "")
