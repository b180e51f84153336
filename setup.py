"""Builds the Swift static library (the C ABI), then the CPython extension that links it.

The result is one self-contained shared object: the Swift runtime is linked statically (with swiftrt.o, without
which protocol conformances silently go missing) and every symbol but PyInit__ext is hidden.

Environment:
  BCNSWIFT_CPU_FLAGS   flags for `swift build` selecting CPU features. Default on x86_64: "-Xcc -march=x86-64-v3"
                       (AVX2 + FMA); elsewhere none. Set it to "" for a portable build, or e.g. "-Xcc -march=native".
  BCNSWIFT_SWIFT       the swift driver to use (default: `swift` on PATH).
"""
import json
import os
import platform
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def swift_build_flags():
    if "BCNSWIFT_CPU_FLAGS" in os.environ:
        cpu = shlex.split(os.environ["BCNSWIFT_CPU_FLAGS"])
    elif platform.machine().lower() in ("x86_64", "amd64"):
        cpu = ["-Xcc", "-march=x86-64-v3"]
    else:
        cpu = []
    # Release (-O) with exclusivity checks off: the kernels own their buffers; bounds are checked at the ABI.
    return ["-c", "release", "-Xswiftc", "-enforce-exclusivity=unchecked"] + cpu


class SwiftBuildExt(build_ext):
    def build_extension(self, ext):
        swift = os.environ.get("BCNSWIFT_SWIFT", "swift")
        driver = shutil.which(swift)
        if driver is None:
            raise RuntimeError(f"bcnswift: the Swift driver {swift!r} is not on PATH; install a Swift toolchain")
        base = [swift, "build", "--package-path", str(ROOT)] + swift_build_flags()
        subprocess.check_call(base + ["--product", "BCNSwiftC"])
        bin_dir = Path(subprocess.check_output(base + ["--show-bin-path"], text=True).strip())
        archive = bin_dir / "libBCNSwiftC.a"

        swiftc = Path(driver).resolve().parent / "swiftc"
        info = json.loads(subprocess.check_output([str(swiftc), "-print-target-info"], text=True))
        resource = Path(info["paths"]["runtimeResourcePath"])  # <toolchain>/usr/lib/swift
        arch, system = info["target"]["arch"], info["target"]["platform"]  # x86_64, linux
        static_dir = resource.parent / "swift_static" / system
        swiftrt = static_dir / arch / "swiftrt.o"
        for needed in (archive, swiftrt, static_dir / "libswiftCore.a"):
            if not needed.exists():
                raise RuntimeError(f"bcnswift: {needed} not found; is a Swift toolchain with static libraries installed?")

        # The runtime libraries the objects ask for (swift-autolink-extract reads their autolink entries).
        tmp = Path(self.build_temp) / "swift-objects"
        tmp.mkdir(parents=True, exist_ok=True)
        for old in tmp.glob("*.o"):
            old.unlink()
        subprocess.check_call(["ar", "x", str(archive)], cwd=tmp)
        extract = resource.parent.parent / "bin" / "swift-autolink-extract"
        libs = subprocess.check_output([str(extract)] + sorted(str(p) for p in tmp.glob("*.o")) + ["-o", "-"],
                                       text=True).split()
        libs = [flag[2:] for flag in libs if flag.startswith("-l")]

        version_script = Path(self.build_temp) / "bcnswift.map"
        version_script.write_text("{ global: PyInit__ext; local: *; };\n")
        ext.extra_objects = [str(archive), str(swiftrt)]
        ext.depends = list(ext.depends) + [str(archive)]  # relink whenever the Swift library changed
        ext.library_dirs = [str(static_dir)]
        # A group: the static runtime libraries refer to each other in both directions.
        ext.extra_link_args = (["-Wl,--start-group"] + [f"-l{lib}" for lib in libs] + ["-Wl,--end-group"]
                               + ["-lstdc++", "-lm", "-ldl", "-lpthread",
                                  f"-Wl,--version-script={version_script}", "-Wl,--exclude-libs,ALL"])
        super().build_extension(ext)


setup(
    ext_modules=[
        Extension(
            "bcnswift._ext",
            sources=["python/bcnswift/_ext.c"],
            include_dirs=[numpy.get_include(), str(ROOT / "Sources" / "CBCNSwift" / "include")],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Werror=implicit-function-declaration"],
        )
    ],
    cmdclass={"build_ext": SwiftBuildExt},
)
