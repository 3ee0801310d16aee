"""Builds the notebooks from their sources and executes them, embedding the outputs.

Each notebook's source is a plain Python file under ``notebooks/src/`` in the "percent"
format: a line ``# %%`` starts a code cell, ``# %% [markdown]`` a markdown cell whose lines
are comments (``# `` is stripped). ``python notebooks/build.py [name ...]`` writes
``notebooks/<name>.ipynb`` executed top to bottom in a fresh kernel (all notebooks when no
name is given) and prints each one's wall time. The committed ``.ipynb`` files are the
executed output of this script; ``tests/test_notebooks.py`` checks that their code matches
the sources and re-executes them.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
SRC = HERE / "src"
NAMES = ["hessian", "per_example", "lola_dice", "maml", "loaded_dice", "lm_finetune"]
_MARKER = re.compile(r"^# %%(?: \[(markdown)\])?\s*$")


def parse(text: str) -> list[tuple[str, str]]:
    """Splits percent-format source into ``(kind, source)`` cells, kind "code" or "markdown"."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        m = _MARKER.match(line)
        if m:
            cells.append(("markdown" if m.group(1) else "code", []))
        elif cells:
            cells[-1][1].append(line)
    out = []
    for kind, lines in cells:
        if kind == "markdown":
            lines = [re.sub(r"^# ?", "", ln) for ln in lines]
        src = "\n".join(lines).strip("\n")
        if src:
            out.append((kind, src))
    return out


def make_notebook(name: str):
    import nbformat

    nb = nbformat.v4.new_notebook()
    for kind, src in parse((SRC / f"{name}.py").read_text()):
        new = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        nb.cells.append(new(src))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def collapse_carriage_returns(text: str) -> str:
    """Keeps what a terminal would show: for each line, the text after its last ``\\r``."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def clean_outputs(nb) -> None:
    """Merges consecutive stream outputs, drops progress-bar redraws, numbers cell ids stably."""
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{cell['cell_type'][:4]}-{i:02d}"
        merged = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                prev = merged[-1] if merged else None
                if prev is not None and prev.get("output_type") == "stream" and prev["name"] == out["name"]:
                    prev["text"] += out["text"]
                    continue
            merged.append(out)
        for out in merged:
            if out.get("output_type") == "stream":
                out["text"] = collapse_carriage_returns(out["text"])
        if "outputs" in cell:
            cell["outputs"] = merged


def execute(nb, timeout: int = 600):
    from nbclient import NotebookClient

    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", record_timing=False,
        resources={"metadata": {"path": str(HERE)}},
    )
    # The kernel imports dicefn from this checkout even when it is not installed.
    root = str(HERE.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    client.execute(env={**os.environ, "PYTHONPATH": path})
    return nb


def main(argv: list[str] | None = None) -> None:
    import nbformat

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"any of {NAMES} (default: all)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(NAMES))
    if unknown:
        parser.error(f"unknown notebooks {unknown}; choose from {NAMES}")
    for name in args.names or NAMES:
        if not (SRC / f"{name}.py").exists():
            print(f"{name}: no source, skipped", file=sys.stderr)
            continue
        start = time.perf_counter()
        nb = execute(make_notebook(name))
        clean_outputs(nb)
        path = HERE / f"{name}.ipynb"
        nbformat.write(nb, path)
        size = path.stat().st_size / 1e6
        print(f"{name}: executed in {time.perf_counter() - start:.1f} s, {size:.2f} MB")


if __name__ == "__main__":
    main()
