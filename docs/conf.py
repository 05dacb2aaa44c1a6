"""Sphinx configuration of the softlb documentation.

Build it with ``sphinx-build -W -b html docs docs/_build/html``: CI treats every warning as an
error. Nothing here reaches the network (no intersphinx mapping).
"""

from __future__ import annotations

import softlb

project = "softlb"
author = "softlb developers"
copyright = "softlb developers"
version = softlb.__version__
release = softlb.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]
# Code in ``double backquotes`` is a literal, not a reference to resolve.
default_role = "literal"
nitpicky = False
language = "en"

# autodoc: members in source order, signatures with their annotations, and the class
# docstring alone (``__init__`` parameters are described there).
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True
autoclass_content = "class"

pygments_style = "sphinx"
pygments_dark_style = "monokai"

html_theme = "furo"
html_title = f"softlb {release}"
html_static_path: list[str] = []
html_theme_options = {"navigation_with_keys": True}


# The public names are documented where users import them (``softlb.Pool``), while the
# docstrings refer to where they are defined (``softlb.pool.Pool``). Resolve such a
# reference to the documented name, so that it becomes a link instead of plain text.
def _resolve_reexport(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    parts = node.get("reftarget", "").split(".")
    if len(parts) < 3 or parts[0] != "softlb":
        return None
    domain = env.get_domain("py")
    for start in range(2, len(parts)):
        candidate = "softlb." + ".".join(parts[start:])
        if candidate in domain.objects:
            return domain.resolve_xref(
                env, node["refdoc"], app.builder, node["reftype"], candidate, node, contnode
            )
    return None


def setup(app):
    app.connect("missing-reference", _resolve_reexport)
