"""A short libFuzzer run of the C ABI under AddressSanitizer (fuzz/run.sh --smoke; the long run is manual)."""
import os
import subprocess
from pathlib import Path

from conftest import require_tool

ROOT = Path(__file__).resolve().parents[2]


def test_c_abi_survives_20000_fuzzed_calls(tmp_path):
    require_tool("clang", "swift", hint="the Swift toolchain's clang, with libFuzzer")
    run = subprocess.run(["bash", str(ROOT / "fuzz" / "run.sh"), "--smoke"], cwd=ROOT, capture_output=True,
                         text=True, timeout=1500, env={**os.environ, "TMPDIR": str(tmp_path)})
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "Done 20000 runs" in out, out[-4000:]
    assert "ERROR: AddressSanitizer" not in out
