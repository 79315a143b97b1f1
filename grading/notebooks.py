"""The `.ipynb` files students open, written from the MyST Markdown (`.md`) sources.

`markdown_to_notebook(text)` is the one place where a `.md` source becomes a notebook: the lab
generator and `make notebooks` both call it.
"""

from __future__ import annotations

import jupytext
import nbformat


def markdown_to_notebook(text: str) -> nbformat.NotebookNode:
    """A MyST Markdown notebook source -> a notebook (no outputs)."""
    return jupytext.reads(text, fmt="md:myst")
