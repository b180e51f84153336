/* Lowers the glibc floor of the kernels' extensions (linked into each on x86_64 Linux; see setup.py).
 *
 * The static Swift runtime refers to a few functions that glibc 2.29-2.34 gave new symbol versions (dlopen and
 * pthread_create moved into libc at 2.34, stat became a real symbol at 2.33, exp and log got new versions at
 * 2.29). Linked on a new glibc they would demand that version, so the wheel could only be manylinux_2_34. glibc
 * keeps every old version for old binaries, with the same behaviour (the libm ones differ in errno handling
 * only), so each reference is wrapped
 * (-Wl,--wrap=<name>) and sent to the oldest version of x86_64 (GLIBC_2.2.5). stat goes to __xstat, which is
 * what stat was before 2.33. */
#include <sys/stat.h>
#include <pthread.h>
#if defined(__linux__) && defined(__x86_64__) && defined(__GLIBC__) /* (__GLIBC__ comes with the headers) */

#define OLD(ret, name, params, args)                                      \
    extern ret name##_glibc_2_2_5 params;                                 \
    __asm__(".symver " #name "_glibc_2_2_5, " #name "@GLIBC_2.2.5");    \
    ret __wrap_##name params { return name##_glibc_2_2_5 args; }

OLD(void *, dlopen, (const char *file, int mode), (file, mode))
OLD(void *, dlsym, (void *handle, const char *name), (handle, name))
OLD(char *, dlerror, (void), ())
OLD(int, dladdr, (const void *addr, void *info), (addr, info))
OLD(int, pthread_create, (pthread_t *t, const pthread_attr_t *a, void *(*f)(void *), void *arg), (t, a, f, arg))
OLD(int, pthread_attr_getstack, (const pthread_attr_t *a, void **s, size_t *n), (a, s, n))
OLD(int, pthread_getattr_np, (pthread_t t, pthread_attr_t *a), (t, a))
OLD(int, pthread_once, (pthread_once_t *o, void (*f)(void)), (o, f))
OLD(int, pthread_key_create, (pthread_key_t *k, void (*d)(void *)), (k, d))
OLD(void *, pthread_getspecific, (pthread_key_t k), (k))
OLD(int, pthread_setspecific, (pthread_key_t k, const void *v), (k, v))
OLD(int, pthread_sigmask, (int how, const void *set, void *old), (how, set, old))
OLD(float, expf, (float x), (x))
OLD(float, logf, (float x), (x))
OLD(float, exp2f, (float x), (x))
OLD(float, log2f, (float x), (x))
OLD(double, exp, (double x), (x))
OLD(double, log, (double x), (x))
OLD(double, exp2, (double x), (x))
OLD(double, log2, (double x), (x))

extern int __xstat(int version, const char *path, struct stat *buf);
int __wrap_stat(const char *path, struct stat *buf) { return __xstat(1 /* _STAT_VER_LINUX */, path, buf); }

/* std::__throw_bad_array_new_length() is GLIBCXX_3.4.29 (GCC 11); the runtime reaches it only when an array
 * size overflows. Throw its base class, std::bad_alloc, which every libstdc++ has. */
extern void _ZSt17__throw_bad_allocv(void) __attribute__((noreturn));
__attribute__((noreturn, visibility("hidden"))) void _ZSt28__throw_bad_array_new_lengthv(void) {
    _ZSt17__throw_bad_allocv();
}
#endif
