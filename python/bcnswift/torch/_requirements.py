"""The oldest torch bcnswift.torch supports, checked before any op is registered, so that an older torch fails at
import with the version it needs rather than with an AttributeError deep in torch.library.

torch 2.9 is the oldest on which the test suite's torch files pass, allowing for two faults of torch itself (gone
in 2.14 and 2.15: docs/PYTORCH.md, "Supported torch versions"). torch 2.8 takes the ops (custom_op's ``tags``
came in 2.8), but its compiled graphs drop the range checks (``torch._assert_async``) that refuse an EstBN moving
speed outside [0, 1] before a buffer is written; 2.4 to 2.7 have no ``tags`` for custom ops at all.
"""
import re

import torch

#: (major, minor) of the oldest torch supported; pyproject.toml's extras say the same (test_torch_ops checks)
MINIMUM_TORCH = (2, 9)


def release(version):
    """(major, minor) of a torch version string: "2.9.1+cu128" and "2.10.0a0+git1234" give (2, 9) and (2, 10)."""
    found = re.match(r"\s*(\d+)\.(\d+)", str(version))
    if found is None:
        raise ImportError(f"bcnswift.torch cannot read torch's version {version!r}")
    return int(found.group(1)), int(found.group(2))


def require_torch():
    """Raises ImportError, naming the version needed and the one found, if torch is older than MINIMUM_TORCH."""
    if release(torch.__version__) < MINIMUM_TORCH:
        needed = ".".join(map(str, MINIMUM_TORCH))
        raise ImportError(
            f"bcnswift.torch needs torch >= {needed}, but found torch {torch.__version__} "
            f"({getattr(torch, '__file__', 'location unknown')}): pip install 'torch>={needed}'. "
            "import bcnswift (numpy) works without torch.")
