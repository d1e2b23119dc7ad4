"""Sphinx configuration of the gmd-ext API reference: every public name with its signature and docstring, read
from the installed package by autodoc (Google-style sections through napoleon).

    python -m sphinx -W --keep-going -b html docs/api <output folder>
"""
import re

import gmd_ext

project = "gmd-ext"
author = "gmd-ext maintainers"
copyright = "2026, gmd-ext maintainers"
release = version = gmd_ext.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": True}
autodoc_typehints = "signature"
autodoc_class_signature = "separated"  # the constructor's signature under the class, as users call it
# Optional dependencies of the applications and the Lightning integration are importable in CI (the [test] extra);
# nothing is mocked, so a documented name that fails to import fails the build.
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_title = f"gmd-ext {release} API reference"


# The docstrings write tensor shapes as plain text, ``[B, M, Cin, *S]`` or "over all of *S"; reStructuredText would
# read ``*S`` as the start of an emphasis. Escape a star that opens a name not closed by another star (``*word*``
# stays an emphasis).
_SHAPE_STAR = re.compile(r"(?<![\w\\*])\*(?=[A-Za-z_]\w*'?(?:[^\w*']|$))")


def _escape_shape_stars(app, what, name, obj, options, lines):
    lines[:] = [_SHAPE_STAR.sub(r"\\*", line) if "``" not in line else line for line in lines]


def setup(app):
    app.connect("autodoc-process-docstring", _escape_shape_stars)
