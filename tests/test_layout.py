"""The package's shape: no import circles (imports inside functions count), no library module
importing a command, and every source and test file small enough to read whole."""

import ast
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "astrollama_jax"
MAX_LINES = 500


def _modules() -> dict[str, Path]:
  out = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(REPO).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
  """module -> the package's modules it imports anywhere in its body."""
  graph = {}
  for name, path in modules.items():
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("astrollama_jax"):
        for alias in node.names:
          child = f"{node.module}.{alias.name}"
          found.add(child if child in modules else node.module)
      elif isinstance(node, ast.Import):
        found |= {a.name for a in node.names if a.name.startswith("astrollama_jax")}
    # a package's __init__ is run by importing its children: not an arrow of its own
    graph[name] = {m for m in found if m in modules and m != name and not name.startswith(m + ".")}
  return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan, iterative)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  circles = []
  for root in graph:
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = len(index)
    stack.append(root)
    on_stack.add(root)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = len(index)
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph[child]))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.append(member)
          if member == node:
            break
        if len(component) > 1:
          circles.append(sorted(component))
  return circles


def test_no_import_circles():
  assert _circles(_imports(_modules())) == []


def test_the_circle_finder_finds_one():
  assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_library_never_imports_a_command():
  graph = _imports(_modules())
  library = [m for m in graph if not m.startswith("astrollama_jax.commands")]
  wrong = {
    m: sorted(d for d in graph[m] if d.startswith("astrollama_jax.commands"))
    for m in library
    if m != "astrollama_jax.__main__"
  }
  assert {m: d for m, d in wrong.items() if d} == {}


def test_every_file_is_short_enough_to_read_whole():
  files = [*PACKAGE.rglob("*.py"), *(REPO / "tests").glob("*.py")]
  long = {
    str(p.relative_to(REPO)): n
    for p in files
    if (n := len(p.read_bytes().splitlines())) > MAX_LINES
  }
  assert long == {}
