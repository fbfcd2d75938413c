"""Check the built sdist and wheel against the source tree (used by .ci/run).

Every file under pml_ms_plus/ in the source tree (Python modules, py.typed, package data; not
__pycache__) must be in the wheel and in the sdist, the wheel must hold nothing else under
pml_ms_plus/, and both must carry the LICENSE and the version set in pyproject.toml.
Usage: python .ci/check_dist.py DIST_DIR
"""

import glob
import os
import sys
import tarfile
import zipfile

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_files() -> set:
    found = set()
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, "pml_ms_plus")):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            if not name.endswith((".pyc", ".pyo")):
                found.add(os.path.relpath(os.path.join(dirpath, name), ROOT).replace(os.sep, "/"))
    return found


def main(dist: str) -> int:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    (wheel,) = glob.glob(os.path.join(dist, "*.whl"))
    (sdist,) = glob.glob(os.path.join(dist, "*.tar.gz"))
    src = source_files()
    problems = []

    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        in_wheel = {n for n in names if n.startswith("pml_ms_plus/")}
        info = f"pml_ms_plus-{version}.dist-info/"
        if info + "METADATA" not in names:
            problems.append(f"wheel: no {info}METADATA (version {version} expected)")
        if info + "licenses/LICENSE" not in names:
            problems.append("wheel: no LICENSE")
        if info + "entry_points.txt" not in names:
            problems.append("wheel: no entry_points.txt (console script)")
    problems += [f"wheel lacks {p}" for p in sorted(src - in_wheel)]
    problems += [f"wheel has {p}, which is not in the source tree" for p in sorted(in_wheel - src)]

    with tarfile.open(sdist) as t:
        prefix = f"pml_ms_plus-{version}/"
        in_sdist = {n[len(prefix) :] for n in t.getnames() if n.startswith(prefix)}
    problems += [
        f"sdist lacks {p}" for p in sorted((src | {"LICENSE", "pyproject.toml", "README.md"}) - in_sdist)
    ]

    for p in problems:
        print("check_dist:", p)
    if problems:
        return 1
    print(
        f"check_dist: wheel and sdist hold all {len(src)} package files; version {version}; LICENSE present"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "dist"))
