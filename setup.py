"""Package layout: `plugins/` and `eval/` live at the top of the repository but install as
`vlmdistill.plugins` and `vlmdistill.eval`; everything else is in pyproject.toml."""
from setuptools import find_packages, setup

MAPPED_ROOTS = {"vlmdistill.plugins": "plugins", "vlmdistill.eval": "eval"}

packages = find_packages(include=["vlmdistill", "vlmdistill.*"])
package_dir = {"vlmdistill": "vlmdistill"}
for name, root in MAPPED_ROOTS.items():
    package_dir[name] = root
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(root)]

setup(packages=packages, package_dir=package_dir)
