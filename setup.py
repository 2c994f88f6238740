"""Build hook: wheels carry the model-card templates of the top-level ``model_cards/`` folder as
``star_hf/model_cards/`` (package configuration lives in pyproject.toml)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithModelCards(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib, "star_hf", "model_cards")
        self.mkpath(str(target))
        for template in sorted(Path(__file__).parent.joinpath("model_cards").glob("*.j2")):
            self.copy_file(str(template), str(target / template.name))


setup(cmdclass={"build_py": BuildPyWithModelCards})
