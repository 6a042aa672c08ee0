"""Package layout: `tasks/` and `configs/` live at the top of the repository but install as
`dcgen.tasks` and `dcgen.configs`, so they work from a non-editable install and any directory."""
from setuptools import find_packages, setup

packages = ["dcgen", *(f"dcgen.{p}" for p in find_packages("dcgen"))]
packages += ["dcgen.tasks", *(f"dcgen.tasks.{p}" for p in find_packages("tasks"))]
packages += ["dcgen.configs"]

setup(
    packages=packages,
    package_dir={"dcgen": "dcgen", "dcgen.tasks": "tasks", "dcgen.configs": "configs"},
)
