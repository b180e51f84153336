"""The README's examples run as written: the Python ones (numpy, PyTorch, MPI), the C program against the static
library, and the Swift program as a package depending on this one. The front door must not rot. (Its shell
commands are CI's own Quick start.)"""
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import require, require_tool

ROOT = Path(__file__).resolve().parents[2]


def example(language, containing):
    """The README's one ```language block whose text contains `containing`."""
    blocks = re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"the README should have one {language} example with {containing!r}, has {len(found)}"
    return found[0]


def run(code, tmp_path, timeout=900):
    """stdout of `code` run by this interpreter in a fresh process (outside the repository)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_the_python_api_and_weight_standardization_examples(tmp_path):
    layers = example("python", "bcnswift.BatchChannelNorm(")
    ws = example("python", "bcnswift.weight_standardization(")
    checks = ("\nassert y.shape == x.shape == dx.shape and np.isfinite(dx).all()"
              "\nassert w_hat.shape == dw.shape == w.shape and abs(w_hat.mean(axis=(1, 2, 3))).max() < 1e-6"
              "\nprint('checked')")
    out = run(layers + ws + checks, tmp_path)
    assert out.split() == ["(1,", "32,", "1)", "checked"]


def test_the_pytorch_example_trains_and_compiles(tmp_path):
    require("torch")
    code = example("python", "import bcnswift.torch as bt")
    lines = run(code, tmp_path).split("\n")
    losses = [float(m) for m in re.findall(r"step \d: loss (\S+)", "\n".join(lines))]
    assert len(losses) == 3 and losses[-1] < losses[0], lines
    assert lines[-2] == "True", lines  # the compiled model gives the eager model's outputs


def test_the_mpi_example(tmp_path):
    require("mpi4py")
    code = example("python", "from mpi4py import MPI")
    out = run(code + "\nprint(y.shape, float(abs(y).max()) > 0)", tmp_path, timeout=300)
    assert out.split() == ["(1,", "64,", "8,", "8)", "True"]


def test_the_c_example_compiles_links_and_runs(tmp_path):
    """Built, compiled and linked as the README says: the static library, the header, and the Swift driver
    linking the runtime statically (no Swift shared library left to find at run time)."""
    swift, clang = require_tool("swift", "clang", hint="the Swift toolchain, with its clang")
    swiftc = Path(swift).resolve().parent / "swiftc"
    (tmp_path / "main.c").write_text(example("c", "bcn_norm_forward_f32"))
    build = [swift, "build", "-c", "release", "--package-path", str(ROOT)]
    for step in ([*build, "--product", "BCNSwiftC"],
                 [clang, "-std=c11", "-Wall", "-Werror", f"-I{ROOT / 'Sources/CBCNSwift/include'}", "-c",
                  str(tmp_path / "main.c"), "-o", str(tmp_path / "main.o")],
                 [str(swiftc), "-static-stdlib", str(tmp_path / "main.o"),
                  str(ROOT / ".build" / "release" / "libBCNSwiftC.a"), "-o", str(tmp_path / "main")]):
        # TMPDIR: the Swift driver leaves an empty directory there at every call
        done = subprocess.run(step, capture_output=True, text=True, timeout=1200,
                              env={**os.environ, "TMPDIR": str(tmp_path)})
        assert done.returncode == 0, f"{step[:3]}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    out = subprocess.run([str(tmp_path / "main")], capture_output=True, text=True, timeout=60, check=True).stdout
    first, second = out.strip().split("\n")
    assert re.fullmatch(r"status 0, y\[0\] = -?\d+\.\d+, running_mean\[0\] = \d+\.\d+", first), out
    assert second == "status 1: channels (4) must be divisible by groups (3)", out
    linked = subprocess.run(["ldd", str(tmp_path / "main")], capture_output=True, text=True, timeout=60).stdout
    assert "libswift" not in linked, linked


def test_the_swift_example_builds_as_a_dependency_and_runs(tmp_path):
    """A package that depends on this one by path, as the README's comment lines declare it."""
    swift = require_tool("swift", hint="the Swift toolchain")
    code = example("swift", "import BCNSwift")
    dependencies = re.search(r"^// dependencies: (.*?),?$", code, re.M).group(1)
    targets = re.search(r"^// targets: (.*?),?$", code, re.M).group(1)
    (tmp_path / "bcnswift").symlink_to(ROOT)  # a path dependency's identity is its directory's name
    demo = tmp_path / "demo"
    (demo / "Sources" / "Demo").mkdir(parents=True)
    (demo / "Package.swift").write_text("// swift-tools-version:6.0\nimport PackageDescription\n\n"
                                        f'let package = Package(name: "Demo", dependencies: {dependencies}, '
                                        f"targets: {targets})\n")
    (demo / "Sources" / "Demo" / "main.swift").write_text(code)
    built = subprocess.run([swift, "build", "--package-path", str(demo)], capture_output=True, text=True,
                           timeout=1200, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    out = subprocess.run([str(demo / ".build" / "debug" / "Demo")], capture_output=True, text=True, timeout=60,
                         check=True).stdout.strip().split("\n")
    assert [line.split(" ")[0] for line in out] == ["y[0..<4]", "running", "grad", "restored:", "standardized",
                                                    "error:"], out
    assert out[3] == "restored: true", out  # a state loaded into a fresh layer
    assert out[-1] == "error: input has 3 channels but the layer has 8", out
    assert abs(float(out[4].rsplit(" ", 1)[1])) < 1e-12, out  # a standardized row has mean 0
