"""The package's import structure: the import-linter contracts of .importlinter (layers), no
import cycle, and library modules that import geotoken_jax at the top of the file only.

Every import statement counts, also one inside a function: a lazy import hides a dependency,
it does not remove it.
"""

import ast
import configparser
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "geotoken_jax"
PACKAGE_DIR = os.path.join(REPO, PACKAGE)

# Thin command-line modules: they may import the library inside main() (so --help is fast).
COMMAND_MODULES = {
    "geotoken_jax.cli", "geotoken_jax.command_line", "geotoken_jax.train", "geotoken_jax.evaluate",
    "geotoken_jax.predict", "geotoken_jax.embed", "geotoken_jax.index", "geotoken_jax.rerank", "geotoken_jax.report", "geotoken_jax.sweep",
    "geotoken_jax.tokenize",
    "geotoken_jax.data.prepare",
}
COMMAND_PACKAGES = ("geotoken_jax.bench",)


def _modules(package_dir: str) -> dict[str, str]:
  """{dotted module name: file path} of every .py file under the package (packages by name)."""
  base, out = os.path.dirname(package_dir), {}
  for folder, _, files in os.walk(package_dir):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, base)[:-3].split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        out[".".join(parts)] = path
  return out


def _imports(module: str, path: str, modules) -> list[tuple[str, int, bool]]:
  """(imported module of the package, line, whether the statement is at the top of the file)
  for every import statement in the file, at any depth (functions, methods, conditionals).  A
  name imported from a package counts as its submodule when it is one; `from . import x` is
  resolved like Python does."""
  is_package = os.path.basename(path) == "__init__.py"
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  top_level = {id(node) for node in tree.body}
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[:len(parts) - (node.level - 1)]
        source = ".".join(parts + ([node.module] if node.module else []))
      else:
        source = node.module or ""
      targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                 for alias in node.names]
    else:
      continue
    for target in targets:
      if target.split(".")[0] != PACKAGE:
        continue
      while target and target not in modules:  # geotoken_jax.s2.TokenSpec -> geotoken_jax.s2
        target = target.rpartition(".")[0]
      if target and target != module:
        out.append((target, node.lineno, id(node) in top_level))
  return out


def import_graph(package_dir: str = PACKAGE_DIR) -> dict[str, set[str]]:
  """Module -> the package's modules it imports (a package's __init__ importing its own
  submodules counts too: a submodule that imports its package back is a cycle)."""
  modules = _modules(package_dir)
  return {m: {target for target, _, _ in _imports(m, p, modules)} for m, p in modules.items()}


def strongly_connected_components(graph: dict[str, set[str]]) -> list[list[str]]:
  """Tarjan's algorithm, iterative (no recursion limit)."""
  index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], 0
  for root in sorted(graph):
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = counter
    counter += 1
    stack.append(root)
    on_stack.add(root)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = counter
          counter += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph.get(child, ())))))
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
        components.append(sorted(component))
  return components


def test_the_cycle_finder_finds_cycles():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": set(), "f": {"f"}}
  cycles = [c for c in strongly_connected_components(graph) if len(c) > 1]
  assert cycles == [["a", "b", "c"]]


def test_no_import_cycles():
  graph = import_graph()
  assert "geotoken_jax.inference.predictor" in graph and "geotoken_jax.runtime" in graph
  cycles = [c for c in strongly_connected_components(graph) if len(c) > 1]
  assert not cycles, "import cycles (every import statement counts, also inside functions):\n" + "\n".join(
      " <-> ".join(c) for c in cycles)


def test_library_modules_import_the_package_at_the_top_only():
  modules = _modules(PACKAGE_DIR)
  nested = []
  for module, path in sorted(modules.items()):
    if module in COMMAND_MODULES or module.startswith(COMMAND_PACKAGES):
      continue
    for target, line, at_top in _imports(module, path, modules):
      if not at_top:
        nested.append(f"{os.path.relpath(path, REPO)}:{line} imports {target} inside a function or block")
  assert not nested, "\n".join(nested)


def test_import_linter_contracts():
  try:
    import importlinter  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    pytest.fail("import-linter is not installed: pip install -r requirements-test.txt (it checks .importlinter)")
  result = subprocess.run(
      [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()",
       "--no-cache", "--no-logo", os.path.join(REPO, ".importlinter")],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, f"import-linter contracts broken:\n{result.stdout}\n{result.stderr}"
  config = configparser.ConfigParser()
  config.read(os.path.join(REPO, ".importlinter"))
  contracts = [name for name in config.sections() if name.startswith("importlinter:contract:")]
  assert len(contracts) >= 3, contracts
  assert f"Contracts: {len(contracts)} kept, 0 broken." in result.stdout, result.stdout
