"""Static checks, run by the README's test command: ruff (pyflakes + bugbear + pyupgrade, see
pyproject.toml) over the package and the tests, mypy over the pure layer."""
import os
import subprocess

from support import ROOT, tool


def test_ruff_clean():
    p = subprocess.run([tool("ruff"), "check", "hvd_rsgc", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]


def test_mypy_clean_on_the_pure_layer():
    p = subprocess.run([tool("mypy"), "hvd_rsgc/algorithms"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]


def test_package_version_is_one_number():
    """pyproject.toml's version (what pip records) is hvd_rsgc.__version__ (what code reports)."""
    import re

    import hvd_rsgc
    text = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    assert re.search(r'^version = "([^"]+)"', text, re.M).group(1) == hvd_rsgc.__version__
