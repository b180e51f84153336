"""bcnswift's on/off environment variables, read by one rule: 1, true, yes or on is on; 0, false, no or off is
off (any case, spaces around ignored); unset or empty is the variable's default; anything else warns and is the
default too. (BCNSWIFT_TORCH_COMPOSED once took every value but "" and "0" as on, "false" among them.) setup.py's
BCNSWIFT_STRIP uses the same words, but refuses others: a build can stop, an import should not."""
import os
import warnings

ON = ("1", "true", "yes", "on")
OFF = ("0", "false", "no", "off")


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
                      f"takes its default, {'on' if default else 'off'}", RuntimeWarning, stacklevel=2)
    return default
