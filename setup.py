"""Build hook: cli.py sits at the repository's top level but installs as interpkit/cli.py."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        if not getattr(self, "editable_mode", False):      # editable: interpkit/__init__.py finds ../cli.py
            self.mkpath(str(Path(self.build_lib) / "interpkit"))
            self.copy_file("cli.py", str(Path(self.build_lib) / "interpkit" / "cli.py"))


setup(cmdclass={"build_py": BuildPy})
