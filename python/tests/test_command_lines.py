"""The command lines behave as Unix tools: a reader that closes their output early (`| head`) ends them quietly."""
import os
import subprocess
import sys

import pytest


# argparse's --help ignores a write that fails and exits 0; the commands' own output ends them with status 1
@pytest.mark.parametrize("argv, status", [(["bcnswift"], 1), (["bcnswift.example"], 1),
                                          (["bcnswift.bench", "--help"], 0), (["bcnswift.demo", "--help"], 0),
                                          (["bcnswift.bench_sync", "--help"], 0)])
def test_a_closed_output_ends_the_command_quietly(argv, status):
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: the command's first print meets EPIPE, as under `| head -0`
    try:
        proc = subprocess.run([sys.executable, "-m", *argv], stdout=write_end, stderr=subprocess.PIPE, text=True,
                              timeout=120)
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.returncode == status, (proc.returncode, proc.stderr)


@pytest.mark.parametrize("argv, last", [(["bcnswift"], "threads_source:"), (["bcnswift.bench", "--help"], "--rows"),
                                        (["bcnswift.example"], "\nok\n")])
def test_an_open_output_gets_everything(argv, last):
    """Each command runs to its end: build_info, the benchmark's help, and README's first look (`example`, which
    asserts its gradient check)."""
    proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert last in proc.stdout, proc.stdout
