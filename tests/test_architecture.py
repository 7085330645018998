"""The layering DESIGN.md and issue 19 ask for, read from the source (ast), so a change that
breaks it fails here: no import circle among the package's modules; objectives/ pure (only
parallel/ helpers from the project); models/ and the shared loop, state, accumulation and data
code free of any method's name; every method a module of methods/ and nothing else."""

import ast
import os

from xclip_jax import methods

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "xclip_jax")


def _modules() -> dict[str, str]:
  """{dotted module name: path} of every module of xclip_jax."""
  found = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        found[dotted.removesuffix(".__init__")] = path
  return found


MODULES = _modules()


def _imports(path: str, *, top_level_only: bool) -> set[str]:
  """xclip_jax modules `path` imports (`from a import b` counts a.b when that is a module)."""
  tree = ast.parse(open(path).read())
  nodes = tree.body if top_level_only else list(ast.walk(tree))
  out = set()
  for node in nodes:
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        out.add(sub if sub in MODULES else node.module)
  return {m for m in out if m.split(".")[0] == "xclip_jax"}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_no_import_circle_at_module_level():
  # Module-level imports only: a function-local import (kept to avoid loading TensorFlow where no
  # data is read) runs after both modules exist. Packages count as importing their __init__.
  graph = {m: {i for i in _imports(p, top_level_only=True) if i != m} for m, p in MODULES.items()}
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_circle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_objectives_import_only_parallel_helpers_from_the_project():
  for module, path in MODULES.items():
    if module.startswith("xclip_jax.objectives"):
      project = {i for i in _imports(path, top_level_only=False)
                 if not i.startswith(("xclip_jax.parallel", "xclip_jax.objectives"))}
      assert not project, f"{module} imports {sorted(project)}"


def _names_in(path: str) -> set[str]:
  """Every identifier, attribute and string constant of a module, lower-cased (docstrings, which
  may cite the method a recipe follows, and comments are prose and not read)."""
  tree = ast.parse(open(path).read())
  docstrings = {id(node.value) for node in ast.walk(tree)
                if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
  words = set()
  for node in ast.walk(tree):
    if id(node) in docstrings:
      continue
    if isinstance(node, ast.Name):
      words.add(node.id)
    elif isinstance(node, ast.Attribute):
      words.add(node.attr)
    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
      words.update(node.value.replace(".", " ").replace(":", " ").split())
    elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      words.add(node.name)
    elif isinstance(node, ast.keyword) and node.arg:
      words.add(node.arg)
  return {w.lower() for w in words}


# The input benchmark times the views of named methods (its modes): a tool over the registry.
NAMES_METHODS_ON_PURPOSE = ("xclip_jax.data.bench",)


def _shared_modules():
  for module, path in MODULES.items():
    if module in NAMES_METHODS_ON_PURPOSE:
      continue
    if module in ("xclip_jax.train", "xclip_jax.train_state", "xclip_jax.accumulate",
                  "xclip_jax.assembly") or module.startswith(("xclip_jax.models",
                                                              "xclip_jax.data")):
      yield module, path


def test_shared_code_names_no_method():
  # "clip" is also the name of the field (CLIP views, the CLIP BPE) and stays allowed; every
  # other method's name must not appear as a name, attribute (config.declip) or string.
  named = [n for n in methods.names() if n != "clip"]
  assert {"declip", "nclip", "xclip", "siglip", "slip"} <= set(named)
  offenders = {module: sorted(_names_in(path) & set(named)) for module, path in _shared_modules()}
  assert not {m: n for m, n in offenders.items() if n}, offenders


def test_shared_code_does_not_import_the_method_modules():
  for module, path in _shared_modules():
    imported = {i for i in _imports(path, top_level_only=False)
                if i.startswith("xclip_jax.methods.")}
    assert not imported, f"{module} imports {sorted(imported)}: ask the registry instead"


def test_the_name_scan_sees_attributes_and_strings(tmp_path):
  probe = tmp_path / "probe.py"
  probe.write_text('"""As siglip does."""\nx = config.declip.queue\ny = "model.nclip"\n')
  assert {"declip", "nclip"} <= _names_in(str(probe))
  assert "siglip" not in _names_in(str(probe))


def test_every_method_module_registers_and_nothing_else_does():
  files = {f[:-3] for f in os.listdir(os.path.join(PACKAGE, "methods"))
           if f.endswith(".py") and f not in ("__init__.py", "base.py")}
  assert set(methods.names()) == files
  assert {"clip", "declip", "nclip", "xclip", "siglip", "slip"} <= files
