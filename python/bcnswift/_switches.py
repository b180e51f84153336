"""bcnswift's on/off environment variables, read by one rule: 1, true, yes or on is on; 0, false, no or off is
off (any case, spaces around ignored); unset or empty is the variable's default; anything else warns and is the
default too. (BCNSWIFT_TORCH_COMPOSED once took every value but "" and "0" as on, "false" among them.) setup.py's
BCNSWIFT_STRIP uses the same words, but refuses others: a build can stop, an import should not."""
import os
import sys
import warnings

ON = ("1", "true", "yes", "on")
OFF = ("0", "false", "no", "off")


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def user_stacklevel():
    """The stacklevel with which the function that calls this warns about the user's import, not a line of
    bcnswift's: the first frame above it outside this package. (warnings skips importlib's frames uncounted.)"""
    frame, level = sys._getframe(2), 2
    while frame is not None:
        name = frame.f_code.co_filename
        if "importlib" in name and "_bootstrap" in name:
            frame = frame.f_back
            continue
        if not name.startswith(_PACKAGE):
            return level
        frame, level = frame.f_back, level + 1
    return 2


def switch(name, default):
    """Whether the environment variable `name` is on now (see the module's rule)."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if value in ON:
        return True
    if value in OFF:
        return False
    if value:
        warnings.warn(f"{name}={raw!r} is neither on ({', '.join(ON)}) nor off ({', '.join(OFF)}); bcnswift "
                      f"takes its default, {'on' if default else 'off'}", RuntimeWarning,
                      stacklevel=user_stacklevel())
    return default
