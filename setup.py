"""Builds the Swift static library (the C ABI) once per ISA path, then one CPython extension per path that links
it, and bcnswift._cpu, which tells at import time which path the CPU runs (bcnswift/_ext.py chooses).

Each extension is one self-contained shared object: the Swift runtime is linked statically (with swiftrt.o,
without which protocol conformances silently go missing), every symbol but its PyInit_ is hidden, debug info is
stripped, and no RUNPATH points at the build host.

Environment:
  BCNSWIFT_ISAS        the ISA paths to build, comma-separated. Default on x86_64: "baseline,x86-64-v3"
                       (x86-64 with SSE2; AVX2 + FMA + BMI); elsewhere "baseline" (the compiler's portable default).
  BCNSWIFT_SWIFT       the swift driver to use (default: `swift` on PATH).
  BCNSWIFT_STRIP       0 keeps the symbols in the extensions (for perf and callgrind); 1, the default, strips them.
"""
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


X86 = platform.machine().lower() in ("x86_64", "amd64")
#: the CPU flags of each path; the clang importer's -march sets the target CPU of Swift's code generation too
ISA_FLAGS = {"baseline": ["-Xcc", "-march=x86-64"] if X86 else [], "x86-64-v3": ["-Xcc", "-march=x86-64-v3"]}


#: functions of the static Swift runtime (and the core's per-thread thread count: pthread_getspecific) bound to
#: their oldest glibc version (python/bcnswift/_glibc_compat.c)
GLIBC_WRAPPED = ["dlopen", "dlsym", "dlerror", "dladdr", "pthread_create", "pthread_attr_getstack",
                 "pthread_getattr_np", "pthread_once", "pthread_key_create", "pthread_getspecific",
                 "pthread_setspecific", "pthread_sigmask",
                 "expf", "logf", "exp2f", "log2f", "exp", "log", "exp2", "log2", "stat"]


#: libstdc++ stays shared: a static one from a new GCC refers to new glibc functions (arc4random, 2.36)
STDCXX = "-lstdc++"


def isa_paths():
    """The ISA paths BCNSWIFT_ISAS names, each once, in its order; RuntimeError if it names none, or one this
    machine cannot build (an empty list would install a package without kernels, which no CPU can import)."""
    buildable = "baseline, x86-64-v3" if X86 else "baseline"
    value = os.environ.get("BCNSWIFT_ISAS", buildable)
    paths = list(dict.fromkeys(p.strip() for p in value.split(",") if p.strip()))
    if not paths:
        raise RuntimeError(f"bcnswift: BCNSWIFT_ISAS={value!r} names no ISA path; name one or more of {buildable}, "
                           "or unset it for all of them")
    for p in paths:
        if p not in ISA_FLAGS or (p != "baseline" and not X86):
            raise RuntimeError(f"bcnswift: BCNSWIFT_ISAS names {p!r}; this machine can build {buildable}")
    return paths


def strip_symbols():
    """BCNSWIFT_STRIP: 1 (the default, also when empty) strips the extensions, 0 keeps their symbols (for perf and
    callgrind)."""
    value = os.environ.get("BCNSWIFT_STRIP", "").strip().lower()
    if value in ("", "1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise RuntimeError(f"bcnswift: BCNSWIFT_STRIP={value!r}; use 1 to strip the extensions or 0 to keep symbols")


def module_name(path):
    return "_ext_" + path.replace("-", "_")


def swift_build_flags(path):
    # Release (-O) with exclusivity checks off: the kernels own their buffers; bounds are checked at the ABI.
    return (["-c", "release", "-Xswiftc", "-enforce-exclusivity=unchecked",
             "--scratch-path", str(ROOT / ".build" / f"isa-{path}")] + ISA_FLAGS[path])


class SwiftBuildExt(build_ext):
    def run(self):
        # the settings are checked here, where they matter, so that an sdist never depends on them
        paths = isa_paths()
        strip_symbols()
        super().run()
        self.remove_other_paths(paths)

    def remove_other_paths(self, paths):
        """Deletes kernel extensions of ISA paths not built this time from where the extensions went: a tree built
        before with other BCNSWIFT_ISAS (pip builds in the source tree's build/) would otherwise ship them, and
        bcnswift/_ext.py loads any path it finds."""
        kept = {Path(self.get_ext_fullpath(f"bcnswift.{module_name(p)}")).name for p in paths}
        out_dir = Path(self.get_ext_fullpath(f"bcnswift.{module_name(paths[0])}")).parent
        suffix = Path(self.get_ext_fullpath("bcnswift._cpu")).name[len("_cpu"):]  # .cpython-311-x86_64-linux-gnu.so
        for stale in out_dir.glob("_ext_*" + suffix):
            if stale.name not in kept:
                stale.unlink()

    def settings_stamp(self, ext, settings):
        """A file in build_temp holding what the link of `ext` depends on besides its inputs (strip, the Swift
        version, the ISA flags), rewritten when that changes: in ext.depends it relinks an extension that a
        build with other settings left (a stripped one after BCNSWIFT_STRIP=0, say), which only the Swift
        library's date decided before."""
        stamp = Path(self.build_temp) / f"settings-{ext.name}.json"
        text = json.dumps(settings, sort_keys=True)
        if not stamp.exists() or stamp.read_text() != text:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.write_text(text)
        ext.depends = list(ext.depends) + [str(stamp)]

    def build_extension(self, ext):
        # no RUNPATH: the interpreter's link flags may carry one pointing at the build host
        self.compiler.linker_so = [a for a in self.compiler.linker_so if "-rpath" not in a]
        strip = strip_symbols()
        if strip:
            ext.extra_link_args = list(ext.extra_link_args) + ["-Wl,--strip-all"]  # .symtab too: PyInit_ stays
        if ext.name == "bcnswift._cpu":
            if sys.platform.startswith("linux"):
                # It calls nothing in libc, so an --as-needed link (Debian's and Ubuntu's default) records no
                # libc.so.6; auditwheel then stops ("couldn't detect libc") whenever it reads this extension before
                # the kernels' in the wheel, which the order of the files in the unpacked wheel decides.
                ext.extra_link_args = list(ext.extra_link_args) + ["-Wl,--no-as-needed", "-lc", "-Wl,--as-needed"]
            self.settings_stamp(ext, {"strip": strip, "libc": sys.platform.startswith("linux")})
            return super().build_extension(ext)
        path = ext.isa
        swift = os.environ.get("BCNSWIFT_SWIFT", "swift")
        driver = shutil.which(swift)
        if driver is None:
            raise RuntimeError(f"bcnswift: the Swift driver {swift!r} is not on PATH; install a Swift toolchain")
        # The driver leaves an empty TemporaryDirectory.* in $TMPDIR at every call; they go to build_temp.
        scratch = Path(self.build_temp).resolve() / "swift-tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TMPDIR": str(scratch)}
        version = subprocess.check_output([swift, "--version"], text=True, stderr=subprocess.STDOUT,
                                          env=env).splitlines()[0]
        self.settings_stamp(ext, {"strip": strip, "swift": version, "flags": swift_build_flags(path)})
        ext.define_macros = [("BCN_MODULE", module_name(path)), ("BCN_ISA", f'"{path}"'),
                             ("BCN_SWIFT_VERSION", '"' + version.replace('"', "'") + '"')]
        base = [swift, "build", "--package-path", str(ROOT)] + swift_build_flags(path)
        subprocess.check_call(base + ["--product", "BCNSwiftC"], env=env)
        bin_dir = Path(subprocess.check_output(base + ["--show-bin-path"], text=True, env=env).strip())
        archive = bin_dir / "libBCNSwiftC.a"

        # the driver's own description of its toolchain: BCNSWIFT_SWIFT may be a wrapper script elsewhere
        info = json.loads(subprocess.check_output([swift, "-print-target-info"], text=True, env=env))
        shutil.rmtree(scratch, ignore_errors=True)
        static_dir, swiftrt, system = static_runtime(info)
        for needed in (archive, swiftrt, static_dir / "libswiftCore.a"):
            if not needed.exists():
                raise RuntimeError(f"bcnswift: {needed} not found; "
                                   "is a Swift toolchain with static libraries installed?")

        # The runtime libraries the objects ask for (swift-autolink-extract reads their autolink entries).
        tmp = Path(self.build_temp) / f"swift-objects-{path}"
        tmp.mkdir(parents=True, exist_ok=True)
        for old in tmp.glob("*.o"):
            old.unlink()
        subprocess.check_call(["ar", "x", str(archive)], cwd=tmp)
        extract = toolchain_bin(info) / "swift-autolink-extract"
        libs = subprocess.check_output([str(extract)] + sorted(str(p) for p in tmp.glob("*.o")) + ["-o", "-"],
                                       text=True).split()
        libs = [flag[2:] for flag in libs if flag.startswith("-l")]

        version_script = Path(self.build_temp) / f"bcnswift-{path}.map"
        version_script.write_text(f"{{ global: PyInit_{module_name(path)}; local: *; }};\n")
        ext.extra_objects = [str(archive), str(swiftrt)]
        ext.depends = list(ext.depends) + [str(archive)]  # relink whenever the Swift library changed
        ext.library_dirs = [str(static_dir)]
        # A group: the static runtime libraries refer to each other in both directions.
        if X86 and system == "linux":  # the manylinux floor: see _glibc_compat.c
            ext.sources = list(ext.sources) + ["python/bcnswift/_glibc_compat.c"]
            ext.extra_link_args += [f"-Wl,--wrap={name}" for name in GLIBC_WRAPPED] + [
                "-Wl,--no-as-needed", "-ldl", "-lpthread", "-Wl,--as-needed"]
        ext.extra_link_args += (["-Wl,--start-group"] + [f"-l{lib}" for lib in libs] + ["-Wl,--end-group"]
                               + [STDCXX, "-lm", "-ldl", "-lpthread",
                                  f"-Wl,--version-script={version_script}", "-Wl,--exclude-libs,ALL"])
        # each path's objects apart: the same _ext.c compiles once per path
        build_temp, self.build_temp = self.build_temp, str(Path(self.build_temp) / path)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = build_temp
        check_no_wrapped_left(Path(self.get_ext_fullpath(ext.name)))


def static_runtime(info):
    """(directory of the static runtime libraries, swiftrt.o, platform) of the toolchain `info` describes (the
    JSON of `swiftc -print-target-info`): <resource dir>/../swift_static/<platform>, with the platform as the
    toolchain names it (linux, macosx, ...) rather than assumed."""
    resource = Path(info["paths"]["runtimeResourcePath"])  # <toolchain>/usr/lib/swift
    arch, system = info["target"]["arch"], info["target"]["platform"]  # x86_64, linux
    static_dir = resource.parent / "swift_static" / system
    return static_dir, static_dir / arch / "swiftrt.o", system


def toolchain_bin(info):
    """The bin directory of the toolchain `info` describes: <toolchain>/usr/bin, beside usr/lib/swift."""
    return Path(info["paths"]["runtimeResourcePath"]).parent.parent / "bin"


def check_no_wrapped_left(so):
    """A --wrap with no __wrap_ definition links (a shared object may leave symbols undefined) but fails at
    import: refuse it here."""
    nm = shutil.which("nm")
    if nm is None:
        return
    undefined = subprocess.check_output([nm, "-D", "--undefined-only", str(so)], text=True).split()
    left = [name for name in undefined if name.startswith("__wrap_")]
    if left:
        raise RuntimeError(f"bcnswift: {so.name} leaves {', '.join(left)} undefined (_glibc_compat.c)")


def kernels(path):
    ext = Extension(f"bcnswift.{module_name(path)}", sources=["python/bcnswift/_ext.c"],
                    depends=["Sources/CBCNSwift/include/bcnswift.h", "python/bcnswift/_c_api.h"],  # _ext.c's
                    include_dirs=[numpy.get_include(), str(ROOT / "Sources" / "CBCNSwift" / "include")],
                    extra_compile_args=["-O2", "-std=c11", "-Wall", "-Werror=implicit-function-declaration"])
    ext.isa = path
    return ext


def requested_kernels():
    """The kernel extensions to build; none if BCNSWIFT_ISAS is bad, which build_ext then reports (`run`)."""
    try:
        return [kernels(path) for path in isa_paths()]
    except RuntimeError:
        return []


if __name__ == "__main__":  # as pip's build backend and `python setup.py` run it; tests import it
    setup(
        ext_modules=[Extension("bcnswift._cpu", sources=["python/bcnswift/_cpu.c"],
                               extra_compile_args=["-O2", "-Wall"])] + requested_kernels(),
        cmdclass={"build_ext": SwiftBuildExt},
    )
