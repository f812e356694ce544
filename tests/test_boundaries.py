"""The package's layers, checked by walking every module's imports (AST), lazy imports inside
functions included: a boundary crossed anywhere fails here, not in a user's install.

* ``hvd_rsgc/algorithms/``: pure tensor code -- no horovod, torch.distributed, mpi4py, and
  nothing from the rest of hvd_rsgc;
* ``horovod`` is imported only under ``hvd_rsgc/horovod/`` (the application reaches it through
  ``hvd_rsgc.horovod.horovod_torch()``), ``mpi4py`` only under ``hvd_rsgc/mpi/``,
  ``torch.distributed`` only under ``hvd_rsgc/ddp/``;
* the library never imports the application (``hvd_rsgc/app/``), except the
  ``python -m`` entry points kept at the top level (train, compare, bench's tta);
* ``engine.py``, ``transport.py``, ``compressor.py``, ``registry.py``, ``compression.py`` import
  no backend at all.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "hvd_rsgc")


def modules():
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                yield os.path.relpath(path, ROOT).replace(os.sep, "/"), path


def imports(path, rel):
    """Absolute names of everything ``path`` imports (relative imports resolved)."""
    tree = ast.parse(open(path).read(), path)
    pkg = rel[:-3].replace("/", ".")
    if not rel.endswith("__init__.py"):
        pkg = pkg.rsplit(".", 1)[0]
    else:
        pkg = pkg[: -len(".__init__")]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def _hits(names, prefix):
    return sorted(n for n in names if n == prefix or n.startswith(prefix + "."))


def test_layers_hold():
    errors = []
    for rel, path in modules():
        names = imports(path, rel)
        inside = rel.startswith
        if inside("hvd_rsgc/algorithms/"):
            bad = [n for n in names if n.startswith(("horovod", "mpi4py", "torch.distributed"))
                   or (n.startswith("hvd_rsgc.") and not n.startswith("hvd_rsgc.algorithms"))]
            errors += [f"{rel}: pure layer imports {b}" for b in bad]
        if not inside("hvd_rsgc/horovod/"):
            errors += [f"{rel}: imports {b} (only hvd_rsgc/horovod/ may)" for b in _hits(names, "horovod")]
        if not inside("hvd_rsgc/mpi/"):
            errors += [f"{rel}: imports {b} (only hvd_rsgc/mpi/ may)" for b in _hits(names, "mpi4py")]
        if not inside("hvd_rsgc/ddp/"):
            errors += [f"{rel}: imports {b} (only hvd_rsgc/ddp/ may)" for b in _hits(names, "torch.distributed")]
        if not inside("hvd_rsgc/app/") and rel not in ("hvd_rsgc/train.py", "hvd_rsgc/compare.py",
                                                       "hvd_rsgc/bench.py"):
            errors += [f"{rel}: the library imports the application ({b})" for b in _hits(names, "hvd_rsgc.app")]
        if rel in ("hvd_rsgc/engine.py", "hvd_rsgc/transport.py", "hvd_rsgc/compressor.py",
                   "hvd_rsgc/registry.py", "hvd_rsgc/compression.py"):
            errors += [f"{rel}: backend-neutral module imports {b}"
                       for p in ("horovod", "mpi4py", "torch.distributed") for b in _hits(names, p)]
    assert not errors, "\n".join(errors)


def test_checker_sees_lazy_and_relative_imports(tmp_path):
    """The walker itself: a lazy relative import of the Horovod binding from the pure layer
    must be reported (a checker that sees nothing would pass anything)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from ..horovod.binding import HorovodBinding\n    import mpi4py\n")
    names = imports(str(f), "hvd_rsgc/algorithms/m.py")
    assert "hvd_rsgc.horovod.binding" in names and "mpi4py" in names


def test_docs_cited_by_the_code_exist():
    """Every docs/ file the code or README cites is in the repository (a user's clone)."""
    import re
    cited = set()
    for rel, path in list(modules()) + [("README.md", os.path.join(ROOT, "README.md"))]:
        cited |= set(re.findall(r"docs/[A-Za-z0-9_./-]+\.md", open(path).read()))
        assert "../shared" not in open(path).read(), f"{rel} cites a file outside the repository"
    assert cited
    missing = [c for c in cited if not os.path.exists(os.path.join(ROOT, c))]
    assert not missing, missing
