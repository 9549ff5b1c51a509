"""What a cell reads from and writes to its namespace, found from its AST."""

from __future__ import annotations

import ast
import builtins
from dataclasses import dataclass

__all__ = ["CellNames", "analyze_cell"]

_BUILTINS = frozenset(dir(builtins))


@dataclass(frozen=True)
class CellNames:
    """``reads``: names used before the cell binds them; ``writes``: names it binds."""

    reads: tuple[str, ...]
    writes: tuple[str, ...]


class _TopLevel(ast.NodeVisitor):
    """Walks module-level statements in order.

    A name read at the top level is free if the cell has not bound it yet at that point.
    Names read inside functions, lambdas, classes and comprehensions are looked up when
    that code runs, so any of them not bound locally there counts as free unless the cell
    binds it somewhere at the top level.
    """

    def __init__(self) -> None:
        self.bound: set[str] = set()
        self.reads: dict[str, None] = {}
        self.deferred_reads: dict[str, None] = {}
        self.writes: dict[str, None] = {}

    def _bind(self, name: str) -> None:
        self.bound.add(name)
        self.writes[name] = None

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            if node.id not in self.bound:
                self.reads[node.id] = None
        elif isinstance(node.ctx, ast.Store):
            self._bind(node.id)
        else:  # del x: the name must exist before
            if node.id not in self.bound:
                self.reads[node.id] = None

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)  # the value is read before the targets are bound
        for target in node.targets:
            self.visit(target)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.visit(node.value)
        if isinstance(node.target, ast.Name):
            if node.target.id not in self.bound:
                self.reads[node.target.id] = None
            self._bind(node.target.id)
        else:
            self.visit(node.target)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
            self.visit(node.target)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self._bind(node.target.id)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._bind(alias.asname or alias.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name != "*":
                self._bind(alias.asname or alias.name)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.type is not None:
            self.visit(node.type)
        if node.name:
            self._bind(node.name)
        for stmt in node.body:
            self.visit(stmt)

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        args = node.args
        for default in [*args.defaults, *(d for d in args.kw_defaults if d is not None)]:
            self.visit(default)
        if not isinstance(node, ast.Lambda):
            for decorator in node.decorator_list:
                self.visit(decorator)
            self._bind(node.name)
        self._collect_scope(node, deferred=True)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _visit_function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expr in [*node.bases, *(k.value for k in node.keywords), *node.decorator_list]:
            self.visit(expr)
        self._collect_scope(node, deferred=False)
        self._bind(node.name)

    def _visit_comprehension(self, node: ast.AST) -> None:
        generators = node.generators  # type: ignore[attr-defined]
        self.visit(generators[0].iter)  # evaluated in the enclosing scope
        self._collect_scope(node, deferred=False)

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _visit_comprehension

    def visit_Global(self, node: ast.Global) -> None:
        for name in node.names:
            self._bind(name)

    def _collect_scope(self, scope: ast.AST, *, deferred: bool) -> None:
        """Record reads of a nested scope: a class body or comprehension runs now, a
        function body later (so the cell may still bind what it reads)."""
        local = _names_bound_within(scope)
        for node in ast.walk(scope):
            if (
                isinstance(node, ast.Name)
                and isinstance(node.ctx, ast.Load)
                and node.id not in local
            ):
                if deferred:
                    self.deferred_reads[node.id] = None
                elif node.id not in self.bound:
                    self.reads[node.id] = None
            elif isinstance(node, ast.Global):
                for name in node.names:
                    self._bind(name)


def _names_bound_within(scope: ast.AST) -> set[str]:
    """Names local to a function/class/comprehension body (and the scopes nested in it)."""
    names: set[str] = set()
    for node in ast.walk(scope):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif (
            isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and node is not scope
        ):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    globals_ = {n for node in ast.walk(scope) if isinstance(node, ast.Global) for n in node.names}
    return names - globals_


def analyze_cell(source: str) -> CellNames:
    """Find the free names a cell reads and the names it assigns at the top level.

    Raises :class:`SyntaxError` for a cell that does not parse, before anything is sent.

    >>> analyze_cell("y = x + 1\\nz = [y * k for k in range(n)]")
    CellNames(reads=('x', 'n'), writes=('y', 'z'))
    """
    tree = ast.parse(source)
    visitor = _TopLevel()
    for stmt in tree.body:
        visitor.visit(stmt)
    reads = dict(visitor.reads)
    for name in visitor.deferred_reads:
        if name not in visitor.bound:
            reads[name] = None
    free = tuple(name for name in reads if name not in _BUILTINS)
    return CellNames(reads=free, writes=tuple(visitor.writes))
