"""Packaging rules from the brief: `platform/` is a folder, never a package shadowing the stdlib."""

import subprocess
import sys

from notellm.config import REPO_ROOT


def test_platform_folder_is_not_a_package():
    assert not (REPO_ROOT / "platform" / "__init__.py").exists()


def test_import_platform_from_repo_root_gives_the_stdlib_module():
    code = (
        "import platform, sys, notellm; "
        "assert hasattr(platform, 'python_version'), platform; "
        "print(platform.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert "site-packages" not in out and str(REPO_ROOT / "platform") not in out
    assert out.endswith("platform.py")


def test_importing_notellm_forces_offline_hub():
    code = "import os; os.environ['HF_HUB_OFFLINE']='0'; import notellm; print(os.environ['HF_HUB_OFFLINE'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
