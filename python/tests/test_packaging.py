"""The sdist builds from source, and what it builds is what the wheel promises: the kernels of a path as a
stripped extension without RUNPATH that exports only its PyInit_, and a manylinux_2_27 policy (auditwheel).
Builds one path only (BCNSWIFT_ISAS=baseline) to keep the suite short; scripts/build_wheel.sh builds both."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import require, require_python, require_tool

ROOT = Path(__file__).resolve().parents[2]


def tool(name):
    return require_tool(name, hint="the build and binary tools the packaging checks run")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    require("build")
    tool("swift")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    sdist = next(out.glob("bcnswift-*.tar.gz"))
    tarfile.open(sdist).extractall(out)
    tree = next(p for p in out.iterdir() if p.is_dir() and p.name.startswith("bcnswift-"))

    def wheel(into, **settings):  # pip builds in the tree, as in a checkout: build/ stays between builds
        env = dict(os.environ, BCNSWIFT_ISAS="baseline", **settings)
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", str(tree),
                               "-w", str(into)], capture_output=True, text=True, timeout=1200, env=env, cwd=out)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return next(into.glob("bcnswift-*.whl"))

    # A build with other settings first, and a kernel extension of a path the next build does not make: the
    # wheel below must relink stripped, and leave that path out (both shipped from build/ before)
    first = wheel(out / "first", BCNSWIFT_STRIP="0")
    lib = next(p.parent for p in (tree / "build").glob("lib*/bcnswift/_cpu*.so"))
    suffix = next(lib.glob("_cpu*.so")).name[len("_cpu"):]
    (lib / ("_ext_x86_64_v3" + suffix)).write_bytes(b"left by an earlier build")
    zipfile.ZipFile(first).extractall(out / "first" / "unpacked")
    unstripped = next((out / "first" / "unpacked").glob("bcnswift/_ext_baseline*.so"))
    sections = subprocess.run([tool("readelf"), "-S", str(unstripped)], capture_output=True, text=True).stdout
    assert ".symtab" in sections  # BCNSWIFT_STRIP=0 kept the symbols: the next build must relink
    return sdist, wheel(out), out


def test_the_sdist_carries_the_swift_package(built):
    sdist, _, _ = built
    names = tarfile.open(sdist).getnames()
    for needed in ("Package.swift", "Sources/CBCNSwift/include/bcnswift.h", "Sources/BCNSwiftC",
                   "Sources/BCNSwift/Engine/NormalizationEngine.swift", "python/bcnswift/_ext.c",
                   "python/bcnswift/_cpu.c", "python/bcnswift/_glibc_compat.c", "python/bcnswift/_c_api.h",
                   "python/bcnswift/torch/native_ops.cpp", "setup.py",
                   # what test_fuzz_smoke.py and test_bench.py run, so that the suite passes from the sdist
                   "fuzz/run.sh", "fuzz/fuzz_abi.c", "scripts/ab_builds.py", "scripts/build_wheel.sh", ".ci/run"):
        assert any(n.endswith("bcnswift-0.1.0/" + needed) for n in names), f"the sdist lacks {needed}"
    assert not any(n.endswith((".so", ".o", ".a")) or "/.build/" in n for n in names)


def test_the_extensions_are_stripped_self_contained_and_export_only_pyinit(built):
    _, wheel, out = built
    unpacked = out / "unpacked"
    zipfile.ZipFile(wheel).extractall(unpacked)
    kernels = next(unpacked.glob("bcnswift/_ext_baseline*.so"))
    assert next(unpacked.glob("bcnswift/_cpu*.so"))
    readelf = tool("readelf")
    dynamic = subprocess.run([readelf, "-d", str(kernels)], capture_output=True, text=True, check=True).stdout
    assert "RUNPATH" not in dynamic and "RPATH" not in dynamic
    needed = set(re.findall(r"Shared library: \[(.+?)\]", dynamic))
    assert needed <= {"libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1", "ld-linux-x86-64.so.2",
                      "libdl.so.2", "libpthread.so.0"}, needed
    sections = subprocess.run([readelf, "-S", str(kernels)], capture_output=True, text=True, check=True).stdout
    assert ".debug_info" not in sections and ".symtab" not in sections
    exported = subprocess.run([tool("nm"), "-D", "--defined-only", str(kernels)], capture_output=True, text=True,
                              check=True).stdout.split()
    assert [s for s in exported if s.startswith("PyInit")] == ["PyInit__ext_baseline"]
    functions = [exported[i + 2] for i in range(0, len(exported) - 2, 3) if exported[i + 1] in "TtWw"]
    assert functions == ["PyInit__ext_baseline"], functions[:10]


def test_every_extension_records_libc_so_auditwheel_finds_it_whichever_it_reads_first(built):
    """auditwheel takes the wheel's libc from the first extension it reads that links one, and stops ("couldn't
    detect libc") if a Python extension comes before it. _cpu calls nothing in libc, so an --as-needed link
    recorded none: the repair of a cp39 wheel stopped so, by the order of the unpacked files."""
    _, wheel, out = built
    unpacked = out / "unpacked-libc"
    zipfile.ZipFile(wheel).extractall(unpacked)
    extensions = sorted(unpacked.glob("bcnswift/*.so"))
    assert len(extensions) == 2, extensions  # _cpu and the one path built
    for so in extensions:
        dynamic = subprocess.run([tool("readelf"), "-d", str(so)], capture_output=True, text=True,
                                 check=True).stdout
        assert "libc.so.6" in re.findall(r"Shared library: \[(.+?)\]", dynamic), (so.name, dynamic)


def test_the_wheel_holds_only_this_builds_paths(built):
    """A review: a path built earlier in the same tree (BCNSWIFT_ISAS then with x86-64-v3) went into a wheel built
    for baseline alone, and _ext.py would have loaded it."""
    _, wheel, _ = built
    kernels = [n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("bcnswift/_ext_") and n.endswith(".so")]
    assert len(kernels) == 1 and "_ext_baseline" in kernels[0], kernels


def test_the_wheel_carries_the_sources_of_the_native_operators(built):
    """bcnswift.torch builds its native operators where it is used (bcnswift/torch/_native.py), from these."""
    _, wheel, _ = built
    names = zipfile.ZipFile(wheel).namelist()
    assert {"bcnswift/_c_api.h", "bcnswift/torch/native_ops.cpp"} <= set(names)


def test_auditwheel_finds_the_manylinux_2_27_policy(built):
    require("auditwheel")
    _, wheel, _ = built
    proc = subprocess.run([sys.executable, "-m", "auditwheel", "show", str(wheel)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert 'platform tag: "manylinux_2_27_x86_64"' in " ".join(proc.stdout.split()), proc.stdout


# What a wheel for another Python computes: one training step of BatchChannelNorm against the authors' BCNorm
# transcribed in numpy (bcnswift.reference), float32 and float64, C order and channels-last; every result agrees.
_SMOKE = """
import sys, numpy as np, bcnswift
from bcnswift import reference as R
assert bcnswift.build_info()["python"].startswith(sys.argv[1]), bcnswift.build_info()
rng = np.random.default_rng(5)
for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
    for last in (False, True):
        x, dy = rng.normal(1.5, 2.0, (4, 8, 3, 5)), rng.normal(0.5, 1.0, (4, 8, 3, 5))
        ref = R.AuthorsBCNorm(8, 4, 1e-5)
        y_ref, dx_ref = ref.forward(x), ref.backward(dy)
        if last:
            x, dy = (np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1) for a in (x, dy))
        layer = bcnswift.BatchChannelNorm(8, 4, estimate=False, dtype=dtype)
        y, dx = layer(x.astype(dtype)), layer.backward(dy.astype(dtype))
        pairs = [("y", y, y_ref), ("dx", dx, dx_ref)] + [(k, v, ref.grads[k]) for k, v in layer.grads.items()]
        pairs += [(k, v, ref.state_dict()[k]) for k, v in layer.state_dict().items()]
        for name, got, want in pairs:
            err = np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1e-300)
            assert err <= tol, (dtype, last, name, err)
        assert y.strides == x.astype(dtype).strides, (last, y.strides)
print("ok", np.__version__)
"""


@pytest.mark.parametrize("version", ["3.9", "3.13"])
def test_a_wheel_for_the_oldest_and_newest_python_computes_what_the_documents_say(built, version, tmp_path):
    """CI builds and tests the running Python's wheel; requires-python says 3.9 and later. The oldest and the
    newest supported CPython each build a wheel from the same source tree (its Swift kernels built once, so
    each only links its extension against its own headers and numpy 2), install it in a venv of their own with
    numpy from PyPI, and run one training step against the numpy reference of the authors' module."""
    python = require_python(version)
    _, _, out = built
    tree = next(p for p in out.iterdir() if p.is_dir() and p.name.startswith("bcnswift-"))
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    interpreter = str(venv / "bin" / "python")

    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}  # only the venv's

    def run(*args, env=clean, **kw):
        proc = subprocess.run([interpreter, *args], capture_output=True, text=True, timeout=1200, env=env, **kw)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    run("-m", "pip", "install", "-q", "setuptools>=64", "numpy>=2", "wheel")
    run("-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(tree), "-w", str(tmp_path / "dist"),
        env=dict(clean, BCNSWIFT_ISAS="baseline"), cwd=out)
    wheel = next((tmp_path / "dist").glob("bcnswift-*.whl"))
    tag = "cp" + version.replace(".", "")
    assert wheel.name.startswith(f"bcnswift-0.1.0-{tag}-{tag}-"), wheel.name
    run("-m", "pip", "install", "-q", "--no-deps", str(wheel))
    said = run("-c", _SMOKE, version, cwd=tmp_path)  # not the source tree: the installed wheel
    assert said.startswith("ok "), said


def _setup_module():
    """setup.py as a module: importing it defines its functions without running setup()."""
    spec = importlib.util.spec_from_file_location("bcnswift_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_static_runtime_is_found_where_the_toolchain_says(tmp_path):
    """The platform directory comes from `swiftc -print-target-info`, not a hard-coded 'linux'."""
    setup = _setup_module()
    for arch, system in (("x86_64", "linux"), ("aarch64", "linux"), ("arm64", "macosx")):
        info = {"paths": {"runtimeResourcePath": "/toolchain/usr/lib/swift"},
                "target": {"arch": arch, "platform": system}}
        static_dir, swiftrt, found = setup.static_runtime(info)
        assert static_dir == Path("/toolchain/usr/lib/swift_static") / system and found == system
        assert swiftrt == static_dir / arch / "swiftrt.o"
    swiftc = Path(tool("swift")).resolve().parent / "swiftc"
    info = json.loads(subprocess.check_output([str(swiftc), "-print-target-info"], text=True, timeout=120,
                                              env={**os.environ, "TMPDIR": str(tmp_path)}))
    static_dir, swiftrt, _ = setup.static_runtime(info)
    assert swiftrt.is_file() and (static_dir / "libswiftCore.a").is_file()


@pytest.mark.parametrize("value, expected", [
    ("baseline", ["baseline"]), (" baseline , baseline ", ["baseline"]),
    ("x86-64-v3,baseline,x86-64-v3", ["x86-64-v3", "baseline"]),
    ("", None), (",", None), (" , ", None), ("foo", None), ("baseline,avx512", None)])
def test_isa_paths_refuse_an_empty_or_unknown_list_and_build_each_path_once(monkeypatch, value, expected):
    """An empty BCNSWIFT_ISAS once built a package with no kernels, which installed and then could not import."""
    setup = _setup_module()
    monkeypatch.setattr(setup, "X86", True)
    monkeypatch.setenv("BCNSWIFT_ISAS", value)
    if expected is None:
        with pytest.raises(RuntimeError, match="BCNSWIFT_ISAS"):
            setup.isa_paths()
        assert setup.requested_kernels() == []  # setup() still runs (an sdist needs no ISA) ...
        command = setup.SwiftBuildExt.__new__(setup.SwiftBuildExt)
        with pytest.raises(RuntimeError, match="BCNSWIFT_ISAS"):  # ... and build_ext stops before building
            command.run()
    else:
        assert setup.isa_paths() == expected
        assert [e.name for e in setup.requested_kernels()] == [f"bcnswift._ext_{p.replace('-', '_')}"
                                                               for p in expected]


@pytest.mark.parametrize("value, strip", [("1", True), ("yes", True), ("ON", True), ("0", False), ("false", False),
                                          (" off ", False), ("no", False), ("2", None), ("", True)])
def test_strip_setting_reads_words_and_refuses_the_rest(monkeypatch, value, strip):
    """BCNSWIFT_STRIP=false once stripped the extensions: only the exact "0" kept their symbols."""
    setup = _setup_module()
    monkeypatch.setenv("BCNSWIFT_STRIP", value)
    if strip is None:
        with pytest.raises(RuntimeError, match="BCNSWIFT_STRIP"):
            setup.strip_symbols()
    else:
        assert setup.strip_symbols() is strip
