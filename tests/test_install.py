"""Packaging: the torch versions allowed are the ones tested, and `pip install` installs the model
file as the module `dualwhisper` and nothing else (train.py, sample.py, ... stay scripts)."""

import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT, need


def _project():
    tomllib = need("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_torch_range_is_the_tested_one():
    import torch
    from packaging.requirements import Requirement
    from packaging.version import Version

    torch_req = [Requirement(r) for r in _project()["project"]["dependencies"] if Requirement(r).name == "torch"]
    assert len(torch_req) == 1, "pyproject.toml must name torch once"
    spec = torch_req[0].specifier
    ci_pin = re.search(r"torch==([\d.]+)", (ROOT / ".ci" / "run").read_text())[1]
    assert Version(ci_pin) in spec, f"CI tests torch {ci_pin}, which pyproject.toml does not allow"
    assert spec.contains(torch.__version__), f"torch {torch.__version__} runs these tests, but pyproject.toml does not allow it"
    # bounded above and below: the next minor release and an older one are not allowed until tested
    major, minor = Version(ci_pin).release[:2]
    assert f"{major}.{minor + 1}.0" not in spec and f"{major}.{minor - 2}.0" not in spec
    # requirements.txt installs the project itself, so that the two cannot disagree
    assert any(line.strip() == "-e ." for line in (ROOT / "requirements.txt").read_text().splitlines())


def test_wheel_holds_only_the_model_file(tmp_path):
    project = _project()
    assert project["tool"]["setuptools"]["py-modules"] == ["dualwhisper"]
    assert {"audio", "parquet", "test"} <= set(project["project"]["optional-dependencies"])
    src = tmp_path / "src"
    src.mkdir()
    for p in ROOT.iterdir():  # the repository's top level as a fresh clone has it, without build leftovers
        if p.is_file():
            shutil.copy(p, src / p.name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp_path)],
                       capture_output=True, text=True)
    if r.returncode and "No module named" in r.stderr:
        pytest.skip("setuptools is not installed")
    assert r.returncode == 0, r.stderr[-2000:]
    wheel, = tmp_path.glob("dualwhisper-*.whl")
    modules = [n for n in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in n]
    assert modules == ["dualwhisper.py"]
