/* bcnswift._cpu: what this CPU and its OS can run, read with CPUID and XGETBV (through the compiler's
 * __builtin_cpu_supports, which checks that the OS saves the AVX registers), never from /proc/cpuinfo, which
 * under emulation shows the host's flags. Built without any -march flag, so importing it is safe everywhere;
 * bcnswift/_ext.py imports it first to choose which kernel build to load. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *features(PyObject *self, PyObject *unused) {
    PyObject *d = PyDict_New();
    if (!d) return NULL;
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
#define FEATURE(name) \
    if (PyDict_SetItemString(d, name, __builtin_cpu_supports(name) ? Py_True : Py_False) < 0) goto fail;
    /* x86-64-v2 and x86-64-v3 as the psABI defines them (v3: AVX, AVX2, BMI1, BMI2, F16C, FMA, LZCNT, MOVBE,
     * OSXSAVE); LZCNT is "abm" to GCC and clang */
    FEATURE("sse3") FEATURE("ssse3") FEATURE("sse4.1") FEATURE("sse4.2") FEATURE("popcnt")
    FEATURE("avx") FEATURE("avx2") FEATURE("bmi") FEATURE("bmi2") FEATURE("f16c") FEATURE("fma")
    FEATURE("abm") FEATURE("movbe")
#undef FEATURE
#endif
    return d;
#if defined(__x86_64__) || defined(_M_X64)
fail:
    Py_DECREF(d);
    return NULL;
#endif
}

static PyMethodDef methods[] = {
    {"features", features, METH_NOARGS, "{feature: supported by this CPU and OS} (x86_64; empty elsewhere)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "bcnswift._cpu", "CPU features, from CPUID", -1,
                                    methods};

PyMODINIT_FUNC PyInit__cpu(void) { return PyModule_Create(&module); }
