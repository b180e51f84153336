"""What the command lines (bench, demo) check before they start work that takes minutes."""
import os
import sys
from pathlib import Path


def output_file_problem(path):
    """Why `path` cannot be written, or None: tried now by opening it to append (and removing it again if it
    did not exist), so that a bad --json path fails at once, not after the run whose results it was to hold."""
    if path is None:
        return None
    target = Path(path)
    if target.is_symlink() and not target.exists():  # opening it would make its target, which we could not tidy
        return f"cannot write {path}: a symbolic link to nothing"
    existed = target.exists()
    try:
        with open(target, "a"):
            pass
    except OSError as e:
        return f"cannot write {path}: {e.strerror or e}"
    if not existed:
        target.unlink()
    return None


def output_directory_problem(path):
    """Why files cannot be written in directory `path` (made now if missing), or None."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot make the directory {path}: {e.strerror or e}"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"cannot write in the directory {path}"
    return None


def run(main):
    """Call `main()` as a command line's entry point, so that a reader closing its output early (`| head`) ends
    the command quietly with status 1, as Unix tools do, instead of with a BrokenPipeError traceback."""
    try:
        main()
        sys.stdout.flush()  # inside the try: a pipe closed after the last print fails here, not at exit
    except BrokenPipeError:
        # Python flushes stdout once more at exit; pointing it at /dev/null keeps that flush from failing too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
