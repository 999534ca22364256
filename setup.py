"""Packaging: everything is in setup.cfg, except that the shipped configs (`configs/`, outside the
package so that a checkout keeps its short paths) are copied into the built package as
`bam/configs/`, where `bam pretrain --config demo` finds them in an installed bam."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        shutil.copytree(Path(__file__).parent / "configs", Path(self.build_lib) / "bam" / "configs", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithConfigs})
