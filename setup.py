"""Build step only; everything else is declared in pyproject.toml.

The repository keeps `conf/`, `recipes/` and `csrc/` at its root. A wheel ships them inside
the package as `bs_lightning/conf`, `bs_lightning/recipes` and `bs_lightning/csrc`, where the
installed package looks for them (`bs_lightning.config_paths`, `bs_lightning._build`).
Editable installs read the root folders in place.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("conf", "recipes", "csrc")


class BuildPyWithRootFolders(build_py):
    """`build_py` that also copies the root folders of `SHIPPED` into the built package."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        for name in SHIPPED:
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(
                    source,
                    Path(self.build_lib) / "bs_lightning" / name,
                    dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.o", "build"),
                )


setup(cmdclass={"build_py": BuildPyWithRootFolders})
