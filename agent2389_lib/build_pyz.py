"""One file for boxes without pip: `python -m agent2389_lib.build_pyz [-o agent2389.pyz]`.

Builds a zipapp (PEP 441) holding agent2389 and its dependencies, pure-Python wheels only
(so one file serves every CPU; jsonschema stays below 4.18, whose `rpds-py` needs a compiled
wheel). The box needs only a Python interpreter of the version the archive was built for, or
newer: build it with the box's version (`python3.9 -m agent2389_lib.build_pyz`, or
`--python-version 3.9`), then `python3 agent2389.pyz run`. Building needs pip and the package
index (or a `--find-links` directory).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipapp
from typing import Optional, Sequence

PURE_REQUIREMENTS = ("paho-mqtt>=2.1", "requests>=2.28", "jsonschema>=4.17,<4.18", "python-dotenv>=0.21",
                     "tomli>=1.1")  # tomli serves Python < 3.11; newer interpreters ignore it
PACKAGE = os.path.dirname(os.path.abspath(__file__))
BOOTSTRAP = """# agent2389.pyz entry point
import functools, sys, zipfile
if sys.version_info < (3, 10):  # 3.9's zipfile.Path.joinpath takes one part; jsonschema passes two
    _joinpath = zipfile.Path.joinpath
    zipfile.Path.joinpath = lambda self, *parts: functools.reduce(_joinpath, parts, self)
from agent2389_lib.cli import main
main()
"""


def install_pure_dependencies(target: str, python_version: str, find_links: Optional[str] = None) -> None:
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
               "--no-warn-conflicts",
               "--target", target, "--only-binary=:all:", "--platform", "any", "--implementation", "py",
               "--python-version", python_version, *PURE_REQUIREMENTS]
    if find_links:
        command += ["--find-links", find_links]
    subprocess.run(command, check=True)
    shutil.rmtree(os.path.join(target, "bin"), ignore_errors=True)  # console scripts of the dependencies


def build(output: str, python_version: str, find_links: Optional[str] = None) -> str:
    with tempfile.TemporaryDirectory(prefix="agent2389-pyz-") as staging:
        install_pure_dependencies(staging, python_version, find_links)
        shutil.copytree(PACKAGE, os.path.join(staging, "agent2389_lib"),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        with open(os.path.join(staging, "__main__.py"), "w") as handle:
            handle.write(BOOTSTRAP)
        zipapp.create_archive(staging, output, interpreter="/usr/bin/env python3", compressed=True)
    return output


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agent2389_lib.build_pyz", description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="agent2389.pyz", help="where to write it (default: agent2389.pyz)")
    parser.add_argument("--python-version", default="%d.%d" % sys.version_info[:2], metavar="X.Y",
                        help="the oldest Python that will run it (default: this interpreter's)")
    parser.add_argument("--find-links", metavar="DIR", help="wheels from this directory instead of the index")
    args = parser.parse_args(argv)
    try:
        path = build(args.output, args.python_version, args.find_links)
    except subprocess.CalledProcessError as exc:
        sys.exit(f"pip could not fetch the dependencies (exit {exc.returncode}); see its output above")
    print(f"wrote {path} ({os.path.getsize(path) // 1024} KiB): run it with "
          f"`python3 {path} run --config agent.toml.example`")


if __name__ == "__main__":
    main()
