"""Packaging hook: the wheel carries the recipes' YAMLs (hparams/) as package data, under fedasr/hparams/.

Everything else is declared in pyproject.toml. In a checkout (and an editable install) fedasr reads hparams/ in
place; an installed wheel reads its own copy (fedasr.pipeline.HPARAMS_ROOT).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithHparams(build_py):
    def run(self):
        super().run()
        source = Path(__file__).resolve().parent / "hparams"
        for yaml_file in sorted(source.rglob("*.yaml")):
            target = Path(self.build_lib) / "fedasr" / "hparams" / yaml_file.relative_to(source)
            self.mkpath(str(target.parent))
            self.copy_file(str(yaml_file), str(target))


setup(cmdclass={"build_py": BuildWithHparams})
