"""The kernels' extension for this CPU: one build per ISA path ships (bcnswift._ext_<path>), and this module
loads the best one the CPU and OS can run, then stands for it (``from bcnswift import _ext``).

Paths, best first: "x86-64-v3" (AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE) and "baseline" (x86-64: SSE2; on other
architectures the compiler's portable default, NEON on aarch64). What the CPU can run comes from CPUID and XGETBV
(bcnswift._cpu), never from /proc/cpuinfo. BCNSWIFT_ISA=<path> forces a path (tests, benchmarks); forcing one
the CPU lacks, or one not built, raises ImportError instead of crashing on an illegal instruction.
"""
import importlib
import importlib.util
import os
import platform

from . import _cpu

#: every path bcnswift knows, best first, with the CPU features it needs (GCC's names; "abm" is LZCNT)
REQUIREMENTS = {"x86-64-v3": ("avx", "avx2", "bmi", "bmi2", "f16c", "fma", "abm", "movbe"), "baseline": ()}


_SHOWN = {"abm": "lzcnt", "bmi": "bmi1"}  # the names the manuals use


def _module_name(path):
    return "bcnswift._ext_" + path.replace("-", "_")


def _allowed(features):
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return [p for p, needs in REQUIREMENTS.items() if (x86 or not needs) and all(features.get(f) for f in needs)]


def _choose():
    features = _cpu.features()
    built = [p for p in REQUIREMENTS if importlib.util.find_spec(_module_name(p)) is not None]
    allowed = _allowed(features)
    forced = os.environ.get("BCNSWIFT_ISA", "").strip()
    if forced:
        if forced not in REQUIREMENTS:
            raise ImportError(f"BCNSWIFT_ISA={forced!r} names no ISA path; the paths are {', '.join(REQUIREMENTS)}")
        if forced not in built:
            raise ImportError(f"BCNSWIFT_ISA={forced!r}: this installation has no {forced} build (built: "
                              f"{', '.join(built) or 'none'})")
        if forced not in allowed:
            missing = [_SHOWN.get(f, f) for f in REQUIREMENTS[forced] if not features.get(f)] or ["an x86_64 CPU"]
            raise ImportError(f"BCNSWIFT_ISA={forced!r}: this CPU (or its OS) lacks {', '.join(missing)}, which the "
                              f"{forced} path needs; it can run {', '.join(allowed)}")
        chosen = forced
    else:
        usable = [p for p in allowed if p in built]
        if not usable:
            raise ImportError(f"bcnswift: no kernel build this CPU can run (built: {', '.join(built) or 'none'}; "
                              f"the CPU allows {', '.join(allowed)}); reinstall bcnswift")
        chosen = usable[0]
    return chosen, allowed, built, bool(forced)


#: ISA_FORCED: whether BCNSWIFT_ISA chose the path, as it was at import (build_info reports it)
ISA, ISA_ALLOWED, ISA_BUILT, ISA_FORCED = _choose()
_kernels = importlib.import_module(_module_name(ISA))
globals().update({k: v for k, v in vars(_kernels).items() if not k.startswith("__") and k != "ISA"})
