"""``platform/__init__.py`` stands in for the standard library's ``platform`` module."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT


def test_stdlib_api_through_our_package_with_torch_ray_mlflow_imported():
    code = (
        "import platform, sysconfig, os\n"
        "assert platform.__file__.startswith(os.getcwd()), platform.__file__\n"
        "import torch, ray, mlflow, open_clip, transformers\n"
        "print(platform.system(), platform.python_version(), platform.machine(), platform.uname().system, platform.platform())\n"
        "import platform.sweep\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    system, version = result.stdout.split()[:2]
    assert system == "Linux" and version == ".".join(map(str, sys.version_info[:3]))


def test_python_dash_m_platform_sweep_runs_from_the_repo_root():
    result = subprocess.run([sys.executable, "-m", "platform.sweep", "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--space" in result.stdout
