"""Package discovery that pyproject.toml cannot express: calib/ and pipelines/ sit at the
top of the repository and install as the data packages `dq_calib` and `dq_pipelines`."""

from setuptools import find_packages, setup

RENAMED = {"dq_calib": "calib", "dq_pipelines": "pipelines"}

packages = find_packages(include=["dq", "dq.*"])
package_dir = {"dq": "dq"}
for name, folder in RENAMED.items():
    packages.append(name)
    package_dir[name] = folder
    packages += [f"{name}.{sub}" for sub in find_packages(where=folder)]

setup(packages=packages, package_dir=package_dir)
