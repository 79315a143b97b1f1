"""What reading a notebook's code tells, before anything runs: `static_checks`.

A notebook that assigns to course_lib, to the checks (`grading`), to `sys.modules` or to torch's
comparisons gets no credit for the exercises it targets (all of them when it names none), nor does
an exercise whose own definition uses course_lib. The run-time guard (`grading.guard`) catches
what reading cannot (helpers in other cells, `importlib`); this gives the clearer message first.
"""

from __future__ import annotations

import ast
import re



def static_checks(cells: list[str], exercises: list[str]) -> tuple[dict[str, str], dict[str, int]]:
    """Read the code without running it. Returns {exercise: why it gets no credit} (the notebook
    changes course_lib, the checks, sys.modules or torch's comparisons; or the exercise uses
    course_lib) and {function: the code cell that defines it}, cells that do not compile included."""
    from IPython.core.inputtransformer2 import TransformerManager

    trees, where = [], {}
    for k, src in enumerate(cells, 1):
        where.update((name, k) for name in re.findall(r"^\s*def\s+(\w+)", src, flags=re.M))
        try:
            src = TransformerManager().transform_cell(src)  # `%pip ...` -> get_ipython().run_line_magic(...)
            trees.append((k, src, ast.parse(src)))
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            pass  # the worker reports it
    nodes = [(k, src, node) for k, src, tree in trees for node in ast.walk(tree)]

    def modules(node: ast.AST) -> list[tuple[str, ast.alias]]:  # (module, alias) for each name an import binds
        if isinstance(node, ast.ImportFrom):
            return [(node.module or "", a) for a in node.names]
        return [(a.name, a) for a in node.names] if isinstance(node, ast.Import) else []

    def bound(package: str) -> set[str]:  # the names that imports from a package bind
        return {package} | {a.asname or a.name.split(".")[0] for _, _, n in nodes for m, a in modules(n) if m.split(".")[0] == package}

    course, torch_names = bound("course_lib") | bound("grading"), bound("torch")
    comparisons = {"allclose", "isclose", "equal", "eq", "__eq__", "testing"}
    no_credit: dict[str, str] = {}
    for k, src, node in nodes:
        if isinstance(node, (ast.Assign, ast.Delete, ast.AugAssign, ast.AnnAssign)):
            targets = getattr(node, "targets", [getattr(node, "target", None)])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("setattr", "delattr") and len(node.args) > 1:
            targets = [ast.Attribute(node.args[0], getattr(node.args[1], "value", "?"))]
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in course:
            targets = [ast.Name(node.name)]  # `class checks: ...` stands in for the checks
        else:
            continue
        for chain in map(_chain, targets):
            if chain and (chain[0] in course or chain[:2] == ["sys", "modules"] or (chain[0] in torch_names and comparisons & set(chain))):
                line = (ast.get_source_segment(src, node) or "").split("\n")[0][:60]
                for name in [n for n in exercises if n in chain] or exercises:
                    no_credit.setdefault(name, f"no credit: the notebook changes {'.'.join(map(str, chain))} (code cell {k}: `{line}`)")
    definitions = {}  # the last top-level statement that binds each name
    for _, _, tree in trees:
        for node in tree.body:
            names = [getattr(node, "name", None)] + [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            definitions.update((n, node) for n in names + [a.asname or a.name.split(".")[0] for _, a in modules(node)] if n)
    for name in set(exercises) & definitions.keys():  # an exercise that lets course_lib do the work
        inside = list(ast.walk(definitions[name]))
        uses = [n for n in inside if isinstance(n, ast.Name) and n.id in course]
        if uses or any(m.split(".")[0] in ("course_lib", "grading") for n in inside for m, _ in modules(n)):
            how = f"`{uses[0].id}`, line {uses[0].lineno}" if uses else "an import"
            no_credit.setdefault(name, f"no credit: it uses course_lib ({how}); the lab asks for torch operations only")
    return no_credit, where


def _chain(node: ast.AST) -> list[str]:
    """['checks', 'LAB', 'run'] for `checks.LAB.run` (string subscripts included); [] for others."""
    parts = []
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
        elif isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            parts.append(node.slice.value)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else []
