"""What pyproject.toml cannot say on its own: the packages, with the repository's models/ folder installed
under a project-specific name, `sdekit_models` (configs name networks as `sdekit_models.mlp:MLP`), so that
installing sdekit never puts a top-level package called `models` into site-packages. Editable installs map
`sdekit_models` to models/ the same way."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["sdekit", "sdekit.*"]) + ["sdekit_models"],
    package_dir={"sdekit_models": "models"},
)
