// bcnswift.torch's native operators: the CPU kernels of the ops that _ops.py defines (moments, update_running_,
// normalize, normalize_batch, normalize_backward, weight_standardization and its backward), in C++; and the eager
// route's own ops (_eager_normalize, _eager_weight_standardization), autograd Functions whose backward is C++.
//
// Why: a kernel written in Python costs its op tens of microseconds a call around the Swift kernels (numpy views
// of every tensor, the checks, the outputs, the thread settings), several times that in a training step, where
// the convolutions between two layers have evicted Python's caches; on a small network's layers that is more
// than the kernels themselves. Under torch.compile every layer calls these ops, forward and backward
// (docs/PYTORCH.md, "Native operators"). Here the same work costs a few microseconds.
//
// The contract is the Python kernels' (_ops.py): the same checks in the same order with the same messages and
// exception types, the same layouts (C order or channels-last read in place, anything else copied; outputs in
// the layout the fake kernels promise), the same calls of the same C ABI, so the same bits. _ops.py's kernels
// stay as the fallback when this file cannot be built (no C++ compiler), and the tests run both.
//
// The C ABI comes from bcnswift._ext (the build for this CPU) as a table of function pointers (_c_api.h), which
// is looked up once, under the GIL. Kernels run on torch's own OpenMP threads (its GOMP_parallel as the ABI's
// thread team), as _threads.py runs the Python kernels; set_num_threads' setting reaches this file through
// bcnswift::_native_threads. Built by _native.py; compiled against the torch it runs with.
#include <Python.h>
#include <dlfcn.h>
#include <pthread.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "_c_api.h"

namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

constexpr int kMessageCapacity = 512;
constexpr int kContextFormat = 6;   // the header's memory format: 0 C order, 1 channels-last

// ---- the C ABI, from bcnswift._ext ------------------------------------------------------------------------

// Found by _native.py's call of bcnswift::_native_enable, from Python, before any kernel is registered: so a
// kernel never takes the GIL here while a thread that holds it waits on `api_once`.
const bcn_c_api *api_table = nullptr;
std::string api_failure;
std::once_flag api_once;

void load_api() {
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *module = PyImport_ImportModule("bcnswift._ext");
    PyObject *capsule = module ? PyObject_GetAttrString(module, "_C_API") : nullptr;
    auto *table = capsule ? static_cast<const bcn_c_api *>(PyCapsule_GetPointer(capsule, BCN_C_API_CAPSULE)) : nullptr;
    if (!table) {
        api_failure = "bcnswift._ext exports no C API table (_C_API); reinstall bcnswift";
        if (PyErr_Occurred()) {  // the import's or the lookup's own words
            PyObject *type, *value, *traceback;
            PyErr_Fetch(&type, &value, &traceback);
            PyObject *text = value ? PyObject_Str(value) : nullptr;
            const char *utf8 = text ? PyUnicode_AsUTF8(text) : nullptr;
            if (utf8) api_failure += std::string(": ") + utf8;
            Py_XDECREF(text);
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(traceback);
        }
    } else if (table->size < sizeof(bcn_c_api) || table->abi_version != BCN_C_API_ABI_VERSION) {
        api_failure = "bcnswift._ext's C API table is not the one this file was built for; reinstall bcnswift";
    } else {
        api_table = table;
    }
    PyErr_Clear();
    Py_XDECREF(capsule);
    Py_XDECREF(module);  // the module stays in sys.modules, and with it the table
    PyGILState_Release(gil);
}

const bcn_c_api &api() {
    std::call_once(api_once, load_api);
    TORCH_CHECK(api_table, "bcnswift.torch's native operators: ", api_failure);
    return *api_table;
}

bool has(int64_t flags, uint32_t flag) { return (static_cast<uint64_t>(flags) & flag) != 0; }

// ---- the tests' probe (bcnswift::_native_probe) ---------------------------------------------------------

// While on, each kernel call appends (kind, flags, x's address, dy's address or 0, the thread count in force,
// whether a team runs it), and each parallel region on torch's threads (team_region, its thread count): what the
// tests of the Python kernels learn by wrapping bcnswift._ext's functions and GOMP_parallel.
enum ProbeKind : int64_t {
    probe_moments = 0, probe_forward = 1, probe_running_update = 2, probe_backward = 3, probe_team_region = 4,
    probe_ws_forward = 5, probe_ws_backward = 6
};
std::atomic<bool> probing{false};
std::mutex probe_mutex;
std::vector<int64_t> probe_log;

void probe(ProbeKind kind, uint32_t flags, const void *x, const void *dy, bool team) {
    if (!probing.load(std::memory_order_relaxed)) return;
    std::lock_guard<std::mutex> hold(probe_mutex);
    probe_log.insert(probe_log.end(), {kind, static_cast<int64_t>(flags), static_cast<int64_t>(
        reinterpret_cast<uintptr_t>(x)), static_cast<int64_t>(reinterpret_cast<uintptr_t>(dy)),
        api().get_num_threads(), team ? 1 : 0});
}

// ---- threads --------------------------------------------------------------------------------------------

// _threads.set_num_threads: -1 (None) torch's threads, 0 bcnswift's choice, n > 0 that many of bcnswift's.
std::atomic<int64_t> thread_setting{-1};
// In a process forked from this one, torch's OpenMP team may not start again (GNU OpenMP hangs once the
// parent's has run): the kernels run on the calling thread, as _threads._forget_team does in Python.
std::atomic<bool> forked{false};

// torch's OpenMP team: GOMP_parallel as torch's CPU library resolves it (dlsym on it searches it and the libraries
// it links: the runtime torch runs its operations on, which libgomp, libomp and libiomp5 all serve), or null for
// a torch with another parallel backend. As _threads._find_openmp_team finds it for the Python kernels.
// (at::parallel_for cannot stand in: it is inline, and without -fopenmp its region here would run serially;
// with it, this file would bring a second OpenMP runtime.)
bcn_c_api_team find_torch_team() {
    if (at::get_parallel_info().find("parallel backend: OpenMP") == std::string::npos) return nullptr;
    void *library = dlopen("libtorch_cpu.so", RTLD_NOLOAD | RTLD_LAZY);
    if (!library) return nullptr;
    void *symbol = dlsym(library, "GOMP_parallel");
    dlclose(library);  // torch holds it loaded
    return reinterpret_cast<bcn_c_api_team>(symbol);
}

bcn_c_api_team torch_gomp_parallel = nullptr;
std::once_flag torch_team_once;

// The team the kernels get: torch's GOMP_parallel, each region probed (one relaxed load when the probe is off).
void torch_team(void (*fn)(void *), void *data, uint32_t n, uint32_t flags) {
    probe(probe_team_region, 0, nullptr, nullptr, true);
    torch_gomp_parallel(fn, data, n, flags);
}

bcn_c_api_team torch_threads_team() {
    std::call_once(torch_team_once, [] { torch_gomp_parallel = find_torch_team(); });
    return torch_gomp_parallel ? &torch_team : nullptr;
}

// The calling thread's thread count and team for one kernel call (as _threads._kernel sets them), restored after.
class ThreadScope {
  public:
    ThreadScope() {
        int64_t setting = thread_setting.load(std::memory_order_relaxed);
        if (setting == 0) return;
        bcn_c_api_team team = nullptr;
        int32_t threads = static_cast<int32_t>(setting);
        if (setting < 0) {
            team = forked.load(std::memory_order_relaxed) ? nullptr : torch_threads_team();
            threads = team ? static_cast<int32_t>(at::get_num_threads()) : 1;
        }
        saved_threads_ = api().set_calling_thread_num_threads(threads);
        saved_team_ = api().set_calling_thread_team(team);
        active_ = true;
        team_ = team != nullptr;
    }
    bool team() const { return team_; }
    ~ThreadScope() {
        if (!active_) return;
        api().set_calling_thread_team(saved_team_);
        api().set_calling_thread_num_threads(saved_threads_);
    }
    ThreadScope(const ThreadScope &) = delete;
    ThreadScope &operator=(const ThreadScope &) = delete;

  private:
    bool active_ = false, team_ = false;
    int32_t saved_threads_ = 0;
    bcn_c_api_team saved_team_ = nullptr;
};

// A failed kernel call: its message as the Python kernels raise it (_ext.c's raise_status; these ops never ask
// for BCN_NAN_RAISE, whose FloatingPointError torch could not raise).
[[noreturn]] void fail(int32_t status, const char *message) {
    std::string text = message[0] ? message : "bcnswift: unknown error";
    if (status == api().status_no_forward) TORCH_CHECK(false, text);
    if (status == api().status_out_of_memory) TORCH_CHECK_WITH(OutOfMemoryError, false, text);
    TORCH_CHECK_VALUE(false, text);
}

void check(int32_t status, const char *message) {
    if (status != api().status_ok) fail(status, message);
}

// ---- names and shapes as Python prints them ---------------------------------------------------------------

const char *numpy_name(c10::ScalarType t) {
    switch (t) {
        case c10::kFloat: return "float32";
        case c10::kDouble: return "float64";
        case c10::kHalf: return "float16";
        case c10::kBFloat16: return "bfloat16";
        case c10::kLong: return "int64";
        case c10::kInt: return "int32";
        case c10::kShort: return "int16";
        case c10::kChar: return "int8";
        case c10::kByte: return "uint8";
        case c10::kBool: return "bool";
        case c10::kComplexFloat: return "complex64";
        case c10::kComplexDouble: return "complex128";
        default: return c10::toString(t);
    }
}

std::string torch_name(c10::ScalarType t) { return std::string("torch.") + numpy_name(t); }

std::string shape_of(const Tensor &t) {  // tuple(t.shape)
    std::ostringstream out;
    out << "(";
    for (int64_t i = 0; i < t.dim(); ++i) out << (i ? ", " : "") << t.size(i);
    out << (t.dim() == 1 ? ",)" : ")");
    return out.str();
}

// ---- layouts (_ops._form, _context_layout, _output, _like) -----------------------------------------------

enum class Form { none, first, last };

bool channels_last_strides(const Tensor &t) {  // layers.channels_last_strides
    int64_t n = t.dim();
    if (n <= 2) return false;
    int64_t expected = 1;
    auto visit = [&](int64_t axis) {
        if (t.size(axis) != 1 && t.stride(axis) != expected) return false;
        expected *= t.size(axis);
        return true;
    };
    if (!visit(1)) return false;
    for (int64_t axis = n - 1; axis > 1; --axis)
        if (!visit(axis)) return false;
    return visit(0);
}

Form form_of(const Tensor &t) {
    if (t.is_contiguous()) return Form::first;
    return channels_last_strides(t) ? Form::last : Form::none;
}

Tensor output_like(const Tensor &x) {
    return form_of(x) != Form::none ? at::empty_like(x) : at::empty_like(x, at::MemoryFormat::Contiguous);
}

struct Laid {
    Tensor x;          // where the kernels read it
    uint32_t flag;     // its memory-format flag
    bool relaid;       // laid out otherwise than it would be without the context
};

// x where it lies if the kernels read that layout, else a C-order copy; unless `context` holds phases run on x
// in the other layout (its header's memory format), which then decides.
Laid context_layout(const Tensor &x, const Tensor *context) {
    Form form = form_of(x), natural = form == Form::none ? Form::first : form, want = natural;
    if (context && x.dim() > 2 && context->numel() > kContextFormat) {
        double recorded = context->scalar_type() == c10::kDouble && context->is_contiguous()
            ? context->data_ptr<double>()[kContextFormat]
            : context->reshape(-1)[kContextFormat].item<double>();
        if (recorded == 0.0 || recorded == 1.0) want = recorded == 1.0 ? Form::last : Form::first;
    }
    Tensor laid = x;
    if (want != form)
        laid = want == Form::first ? x.contiguous() : x.movedim(1, -1).contiguous().movedim(-1, 1);
    return {laid, want == Form::last ? api().channels_last : 0u, want != natural};
}

// t in x's memory layout, a copy only when they differ; the stride of an axis of size 1 says nothing about the
// layout, so it is not compared (_ops._like, axes paired as zip pairs them)
Tensor like(const Tensor &t, const Tensor &x) {
    bool same = true;
    for (int64_t i = 0; same && i < std::min(t.dim(), x.dim()); ++i)
        if (x.size(i) != 1 && t.stride(i) != x.stride(i)) same = false;
    return same ? t : at::empty_like(x).copy_(t);
}

// ---- what the kernels read and write (_ext.c's checks) --------------------------------------------------

// A gradient given to an op has its tensor's shape (_ops._check_same_shape): one that merely broadcasts to it
// would be copied into that shape and taken for the gradient of every sample.
void same_shape(const Tensor &grad, const Tensor &t, const char *name, const char *of) {
    TORCH_CHECK_VALUE(grad.sizes() == t.sizes(), name, " must have the ", of, "'s shape ", shape_of(t), ", got ",
                      shape_of(grad));
}

void check_input(const Tensor &x, const char *name = "input") {
    TORCH_CHECK_TYPE((x.scalar_type() == c10::kFloat || x.scalar_type() == c10::kDouble) && x.device().is_cpu(),
                     "bcnswift ops take CPU float32 or float64 tensors, got ", name, " ", torch_name(x.scalar_type()),
                     " on ", x.device().str());
    TORCH_CHECK_VALUE(x.dim() >= 2, name, " must have rank >= 2 ([B, C, *]), got shape ", shape_of(x));
    TORCH_CHECK_VALUE(x.numel() != 0, name, " must not be empty, got shape ", shape_of(x));
}

bool dense(const Tensor &t, bool channels_last) {
    return channels_last && t.dim() >= 3 ? channels_last_strides(t) : t.is_contiguous();
}

bool aligned(const Tensor &t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % t.element_size() == 0; }

// t's memory for the kernels: dtype `dtype`, aligned, dense (C order, or channels-last), `size` elements (any
// when size < 0); an undefined tensor gives nullptr.
void *take(const Tensor &t, const char *name, c10::ScalarType dtype, int64_t size, bool channels_last = false) {
    if (!t.defined()) return nullptr;
    TORCH_CHECK(t.device().is_cpu(), "bcnswift ops take every tensor on one device: ", name, " is on ",
                t.device().str(), ", but the kernels' input is on cpu");  // a meta tensor's memory is none
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " has dtype ", numpy_name(t.scalar_type()), ", expected ",
                     numpy_name(dtype));
    TORCH_CHECK_VALUE(aligned(t) && dense(t, channels_last), name, " must be aligned and ",
                      channels_last ? "dense in channels-last order" : "C-contiguous");
    TORCH_CHECK_VALUE(size < 0 || t.numel() == size, name, " has ", t.numel(), " elements, expected ", size);
    return t.data_ptr();
}

// A parameter the kernels only read (_ops._held without views): a C-order copy when it is not contiguous.
Tensor readable(const OptionalTensor &t) {
    if (!t) return Tensor();
    return t->is_contiguous() ? *t : t->contiguous();
}

// Doubles a context holds: NormalizationContext.length, through the C ABI (-1 for sizes it cannot hold)
int64_t context_length(int64_t batch, int64_t channels, int64_t groups) {
    int64_t length = api().context_length(batch, channels, groups);
    TORCH_CHECK_VALUE(length >= 0, "a context for ", batch, " samples of ", channels, " channels in ", groups,
                      " groups overflows");
    return length;
}

struct Shape {
    int64_t batch, channels, spatial;
};

Shape shape_of_input(const Tensor &x) { return {x.size(0), x.size(1), x.numel() / (x.size(0) * x.size(1))}; }

// flags as the kernels take them: a combination of the flags in `known` (the table's flags_all or ws_flags_all),
// refused otherwise before any array is read in the memory order they declare (_ext.c's parse_flags)
uint32_t checked_flags(int64_t flags, uint32_t known) {
    TORCH_CHECK_VALUE(flags >= 0 && flags <= static_cast<int64_t>(UINT32_MAX),
                      "flags must be a combination of bcnswift's flags, got ", flags);
    auto f = static_cast<uint32_t>(flags);
    if (f & ~known) {
        std::ostringstream bits;
        bits << std::hex << (f & ~known);
        TORCH_CHECK_VALUE(false, "unknown flag bits 0x", bits.str());
    }
    return f;
}

int64_t checked_groups(int64_t flags, int64_t groups) {  // _ext.c's parse_groups; 0 without a channel norm
    if (!has(flags, api().channel_norm)) return 0;
    TORCH_CHECK_VALUE(groups > 0, "num_groups must be positive, got ", groups);
    return groups;
}

// The groups to size contexts, scratch and gradients by: g when it divides the channels, else 0, for a call the
// C ABI will refuse (it checks the groups before it touches any buffer) and which need not allocate g values
// first, nor overflow a context's length.
int64_t sizing_groups(int64_t g, int64_t channels) { return g > 0 && channels % g == 0 ? g : 0; }

// ---- allocation ------------------------------------------------------------------------------------------

// Outputs straight from the CPU allocator: at::empty and its kin pass the dispatcher, about a microsecond each,
// which a small layer's call paid several times.
Tensor new_empty(int64_t n, c10::ScalarType dtype) { return Tensor(at::detail::empty_cpu({n}, dtype)); }

Tensor new_zeros(int64_t n, c10::ScalarType dtype) {
    Tensor t = new_empty(n, dtype);
    if (n > 0) std::memset(t.data_ptr(), 0, static_cast<size_t>(n) * t.element_size());
    return t;
}

// Uninitialized, x's sizes and strides: x is dense (C order or channels-last), so this is its memory layout.
Tensor new_like(const Tensor &x) {
    return Tensor(at::detail::empty_strided_cpu(x.sizes(), x.strides(), x.scalar_type()));
}

// Per-thread scratch the kernels read or write but nobody keeps: the parameters of an absent affine (ones, zeros)
// and the running buffers of a functional forward (_ops._normalize_impl's np.ones, np.zeros and copies). Six
// slots of each dtype; a kernel call uses each slot once.
thread_local std::vector<float> scratch_floats[6];
thread_local std::vector<double> scratch_doubles[6];

void *scratch(int slot, c10::ScalarType dtype, int64_t n, double value) {
    if (dtype == c10::kFloat) {
        scratch_floats[slot].assign(static_cast<size_t>(n), static_cast<float>(value));
        return scratch_floats[slot].data();
    }
    scratch_doubles[slot].assign(static_cast<size_t>(n), value);
    return scratch_doubles[slot].data();
}

void *scratch_copy(int slot, c10::ScalarType dtype, int64_t n, const void *from) {
    void *to = scratch(slot, dtype, n, 0);
    std::memcpy(to, from, static_cast<size_t>(n) * (dtype == c10::kFloat ? sizeof(float) : sizeof(double)));
    return to;
}

// ---- the ops' kernels ---------------------------------------------------------------------------------------

// The tensors a kernel makes (outputs, scratch, copies) skip autograd's kernels: called below autograd directly
// (the op's redispatch, or a caller's), every allocation would otherwise pass through them.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// _ops._STAMP: after the last double of a context the eager op saves (new_context): the largest magnitude and
// 1 + 2^-52, which a saved-tensor hook that stores the context lossily changes
constexpr double kContextStamps[] = {-std::numeric_limits<double>::max(), 1.0 + 0x1p-52};
constexpr int64_t kStampCount = 2;

// A zeroed context of `length` doubles; with `stamped`, a view of a tensor that ends with the stamps, that tensor
// into *stamped (_ops._new_context)
Tensor new_context(int64_t length, Tensor *stamped) {
    if (!stamped) return new_zeros(length, at::kDouble);
    *stamped = new_zeros(length + kStampCount, at::kDouble);
    std::copy(kContextStamps, kContextStamps + kStampCount, stamped->data_ptr<double>() + length);
    return stamped->narrow(0, 0, length);
}

// _ops._saved_context: the context kept aside if the saved `stamped` comes back in its own memory (at `at`) or
// without its stamps; else the saved one, a copy with its stamps (a recomputing checkpoint's own, or a hook's)
Tensor saved_context(const Tensor &aside, const Tensor &stamped, int64_t at) {
    int64_t n = aside.numel();
    if (reinterpret_cast<int64_t>(stamped.data_ptr()) == at) return aside;
    if (stamped.scalar_type() != at::kDouble || !stamped.is_cpu() || !stamped.is_contiguous() ||
        stamped.numel() != n + kStampCount)
        return aside;
    const double *tail = stamped.data_ptr<double>() + n;
    return std::equal(tail, tail + kStampCount, kContextStamps) ? stamped.narrow(0, 0, n) : aside;
}

// _ops.moment_arrays on x laid out for the kernels: (context, moments); `stamped` as new_context's
std::tuple<Tensor, Tensor> moments_of(const Laid &laid, int64_t flags, int64_t groups, Tensor *stamped = nullptr) {
    const Tensor &x = laid.x;
    Shape s = shape_of_input(x);
    uint32_t f = checked_flags(flags, api().flags_all) | laid.flag;
    int64_t g = checked_groups(flags, groups);
    take(x, "x", x.scalar_type(), -1, has(f, api().channels_last));  // as the flags say it lies (a caller's too)
    Tensor context = new_context(context_length(s.batch, s.channels, sizing_groups(g, s.channels)), stamped);
    Tensor moments = new_empty(3 * s.channels, at::kDouble);
    char message[kMessageCapacity] = "";
    int32_t status;
    {
        ThreadScope threads;
        probe(probe_moments, f, x.data_ptr(), nullptr, threads.team());
        auto *m = moments.data_ptr<double>();
        auto *c = context.data_ptr<double>();
        status = x.scalar_type() == c10::kFloat
            ? api().norm_moments_f32(f, s.batch, s.channels, s.spatial, groups, x.data_ptr<float>(), m, c,
                                     context.numel(), message, kMessageCapacity)
            : api().norm_moments_f64(f, s.batch, s.channels, s.spatial, groups, x.data_ptr<double>(), m, c,
                                     context.numel(), message, kMessageCapacity);
    }
    check(status, message);
    return {context, moments};
}

std::tuple<Tensor, Tensor> moments_op(const Tensor &x, int64_t flags, int64_t groups) {
    BelowAutograd below;
    check_input(x);
    return moments_of(context_layout(x, nullptr), flags, groups);
}

// The entry of an f32/f64 pair of the table that takes T.
template <class T, class F32, class F64>
auto pick(F32 f32, F64 f64) {
    if constexpr (std::is_same_v<T, float>) {
        return f32;
    } else {
        return f64;
    }
}

template <class T>
int32_t forward_call(bool finish, uint32_t f, Shape s, int64_t groups, double eps, double bn_eps, double momentum,
                     const Tensor &x, Tensor &y, void *bw, void *bb, void *rm, void *rv, void *nbt, void *cw,
                     void *cb, const double *moments, double *context, int64_t length, char *message) {
    auto T_ = [](void *p) { return static_cast<T *>(p); };
    const T *xp = x.data_ptr<T>();
    T *yp = y.data_ptr<T>();
    auto *nb = static_cast<int64_t *>(nbt);
    if (finish)
        return pick<T>(api().norm_finish_f32, api().norm_finish_f64)(
            f, s.batch, s.channels, s.spatial, groups, eps, bn_eps, momentum, xp, yp, T_(bw), T_(bb), T_(rm), T_(rv),
            nb, T_(cw), T_(cb), moments, context, length, message, kMessageCapacity);
    return pick<T>(api().norm_forward_f32, api().norm_forward_f64)(
        f, s.batch, s.channels, s.spatial, groups, eps, bn_eps, momentum, xp, yp, T_(bw), T_(bb), T_(rm), T_(rv), nb,
        T_(cw), T_(cb), context, length, message, kMessageCapacity);
}

// The running buffers that the eager route's training forward updates in place, in its one kernel call
// (_ops._normalize_impl with write_buffers=True), at `momentum` (or 1/count with BCN_CUMULATIVE_AVERAGE).
struct Written {
    Tensor running_mean, running_var, num_batches_tracked;
    double momentum;
};

// _ops._normalize_impl: phase (c) on `context` (continued in place) with `moments`, or the whole forward into a
// new context. Without `written` (the functional ops) the running buffers' update, if any, goes to scratch
// copies; with it, to the buffers it names. Returns (y, context).
std::tuple<Tensor, Tensor> normalize_laid(const Tensor &given, const Laid &laid, Tensor context, const Tensor &moments,
                                          const OptionalTensor &bn_weight, const OptionalTensor &bn_bias,
                                          const OptionalTensor &running_mean, const OptionalTensor &running_var,
                                          const OptionalTensor &cn_weight, const OptionalTensor &cn_bias, int64_t flags,
                                          int64_t groups, double eps, double bn_eps, const Written *written = nullptr,
                                          Tensor *stamped = nullptr) {
    const bcn_c_api &a = api();
    const Tensor &x = laid.x;
    uint32_t f = checked_flags(flags, a.flags_all) | laid.flag;
    if (!written) f &= ~a.cumulative_average;
    Shape s = shape_of_input(x);
    int64_t g = checked_groups(f, groups), c = s.channels, sized = sizing_groups(g, c);
    auto dtype = x.scalar_type();
    Tensor y = new_like(x);  // x lies where the kernels read it, so y takes its layout
    bool bn = has(f, a.batch_norm), cn = has(f, a.channel_norm);
    // parameters given are taken as they are (a C-order copy of one that is not contiguous); absent ones, and the
    // running buffers that a functional forward must not touch, are per-thread scratch
    Tensor bw = readable(bn_weight), bb = readable(bn_bias), cw = readable(cn_weight), cb = readable(cn_bias);
    Tensor rm, rv;
    int64_t nbt = 0;
    bool training = has(f, a.training);
    if (bn) {  // with batch statistics no buffer is read; the real update is update_running_'s: on copies (below)
        TORCH_CHECK_VALUE(training || (running_mean && running_var),
                          "normalizing with running statistics (eval) needs running_mean and running_var");
        rm = readable(running_mean);
        rv = readable(running_var);
    }
    bool finish = context.defined();
    if (!finish) context = new_context(context_length(s.batch, c, sized), stamped);
    take(x, "x", dtype, -1, has(f, a.channels_last));  // as the flags say it lies (a caller's too)
    void *pbw = !bn ? nullptr : bw.defined() ? take(bw, "bn_weight", dtype, c) : scratch(0, dtype, c, 1);
    void *pbb = !bn ? nullptr : bb.defined() ? take(bb, "bn_bias", dtype, c) : scratch(1, dtype, c, 0);
    void *prm = nullptr, *prv = nullptr;
    int64_t *pnbt = bn ? &nbt : nullptr;
    if (bn && written) {  // the buffers themselves, as they are: the kernels refuse one they cannot write
        prm = take(written->running_mean, "running_mean", dtype, c);
        prv = take(written->running_var, "running_var", dtype, c);
        if (written->num_batches_tracked.defined())  // a stage without a count updates a scratch one
            pnbt = static_cast<int64_t *>(take(written->num_batches_tracked, "num_batches_tracked", at::kLong, 1));
    } else if (bn) {
        prm = rm.defined() ? take(rm, "running_mean", dtype, c) : scratch(2, dtype, c, 0);
        prv = rv.defined() ? take(rv, "running_var", dtype, c) : scratch(3, dtype, c, 1);
    }
    if (bn && training && !written) {
        if (rm.defined()) prm = scratch_copy(2, dtype, c, prm);
        if (rv.defined()) prv = scratch_copy(3, dtype, c, prv);
    }
    int64_t held = std::max<int64_t>(sized, 1);
    void *pcw = !cn ? nullptr : cw.defined() ? take(cw, "cn_weight", dtype, g) : scratch(4, dtype, held, 1);
    void *pcb = !cn ? nullptr : cb.defined() ? take(cb, "cn_bias", dtype, g) : scratch(5, dtype, held, 0);
    auto *pctx = static_cast<double *>(take(context, "context", at::kDouble, -1));
    const double *pm = finish && moments.defined()
        ? static_cast<const double *>(take(moments, "moments", at::kDouble, 3 * c)) : nullptr;
    double momentum = written ? written->momentum : 0.1;  // 0.1: a scratch update's rate, as good as any
    char message[kMessageCapacity] = "";
    int32_t status;
    {
        ThreadScope threads;
        probe(probe_forward, f, x.data_ptr(), nullptr, threads.team());
        status = dtype == c10::kFloat
            ? forward_call<float>(finish, f, s, groups, eps, bn_eps, momentum, x, y, pbw, pbb, prm, prv, pnbt, pcw,
                                  pcb, pm, pctx, context.numel(), message)
            : forward_call<double>(finish, f, s, groups, eps, bn_eps, momentum, x, y, pbw, pbb, prm, prv, pnbt, pcw,
                                   pcb, pm, pctx, context.numel(), message);
    }
    check(status, message);
    if (laid.relaid) y = output_like(given).copy_(y);
    return {y, context};
}

std::tuple<Tensor, Tensor> normalize_op(const Tensor &x, const OptionalTensor &context, const OptionalTensor &moments,
                                        const OptionalTensor &bn_weight, const OptionalTensor &bn_bias,
                                        const OptionalTensor &running_mean, const OptionalTensor &running_var,
                                        const OptionalTensor &cn_weight, const OptionalTensor &cn_bias, int64_t flags,
                                        int64_t groups, double eps, double bn_eps) {
    BelowAutograd below;
    check_input(x);
    // functional: a given context is continued in a copy
    Tensor ctx = context ? context->clone(at::MemoryFormat::Contiguous) : Tensor();
    Tensor m = moments ? moments->contiguous() : Tensor();
    Laid laid = context_layout(x, context ? &ctx : nullptr);
    return normalize_laid(x, laid, ctx, m, bn_weight, bn_bias, running_mean, running_var, cn_weight, cn_bias, flags,
                          groups, eps, bn_eps);
}

std::tuple<Tensor, Tensor, Tensor> normalize_batch_op(const Tensor &x, const OptionalTensor &bn_weight,
                                                      const OptionalTensor &bn_bias, const OptionalTensor &cn_weight,
                                                      const OptionalTensor &cn_bias, int64_t flags, int64_t groups,
                                                      double eps, double bn_eps) {
    BelowAutograd below;
    const bcn_c_api &a = api();
    checked_flags(flags, a.flags_all);
    TORCH_CHECK_VALUE(has(flags, a.training) && has(flags, a.batch_norm) && !has(flags, a.estimated),
                      "normalize_batch normalizes with batch statistics: flags need BCN_BATCH_NORM and BCN_TRAINING, "
                      "without BCN_ESTIMATED");
    check_input(x);
    Laid laid = context_layout(x, nullptr);
    auto [context, moments] = moments_of(laid, flags & ~static_cast<int64_t>(a.training), groups);
    auto [y, ctx] = normalize_laid(x, laid, context, moments, bn_weight, bn_bias, std::nullopt, std::nullopt, cn_weight,
                                   cn_bias, flags, groups, eps, bn_eps);
    return {y, ctx, moments};
}

double first_value(const Tensor &t) {  // float(t.reshape(-1)[0]), without the dispatcher for the common case
    if (t.numel() >= 1 && t.device().is_cpu() && t.scalar_type() == c10::kFloat) return t.data_ptr<float>()[0];
    if (t.numel() >= 1 && t.device().is_cpu() && t.scalar_type() == c10::kDouble) return t.data_ptr<double>()[0];
    return t.reshape(-1)[0].item<double>();
}

// An EstBN's rate, from its estbn_moving_speed buffer (one value): in [0, 1], else a ValueError naming the buffer
// (the kernels would name a momentum the user never set); _ops.moving_speed_value words it alike.
double moving_speed_value(const Tensor &speed) {
    TORCH_CHECK_VALUE(speed.numel() == 1, "estbn_moving_speed must hold one value, got ", speed.numel());
    double value = first_value(speed);
    TORCH_CHECK_VALUE(value >= 0 && value <= 1, "estbn_moving_speed must be in [0, 1], got ", value);
    return value;
}

void update_running_op(Tensor &running_mean, Tensor &running_var, Tensor &num_batches_tracked, const Tensor &moments,
                       int64_t flags, double momentum, const OptionalTensor &moving_speed) {
    BelowAutograd below;
    if (moving_speed) momentum = moving_speed_value(*moving_speed);
    TORCH_CHECK_VALUE(running_mean.defined() && running_var.defined(),
                      "updating the running statistics needs running_mean and running_var");
    TORCH_CHECK_VALUE(running_mean.is_contiguous(), "running_mean must be contiguous");
    TORCH_CHECK_VALUE(running_var.is_contiguous(), "running_var must be contiguous");
    uint32_t f = checked_flags(flags, api().flags_all);
    auto dtype = running_mean.scalar_type();
    TORCH_CHECK_TYPE(dtype == c10::kFloat || dtype == c10::kDouble, "running_mean must be float32 or float64");
    int64_t c = running_mean.numel();
    Tensor m = moments.contiguous();
    auto *pm = static_cast<const double *>(take(m, "moments", at::kDouble, 3 * c));
    void *rm = take(running_mean, "running_mean", dtype, c), *rv = take(running_var, "running_var", dtype, c);
    // a stage without a count (torch's batch norms allow it) updates a scratch one, as the eager op does
    int64_t scratch = 0;
    auto *nbt = num_batches_tracked.defined()
        ? static_cast<int64_t *>(take(num_batches_tracked, "num_batches_tracked", at::kLong, 1)) : &scratch;
    char message[kMessageCapacity] = "";
    int32_t status;
    {
        ThreadScope threads;
        probe(probe_running_update, f, rm, nullptr, threads.team());
        status = dtype == c10::kFloat
            ? api().running_update_f32(f, c, momentum, pm, static_cast<float *>(rm), static_cast<float *>(rv), nbt,
                                       message, kMessageCapacity)
            : api().running_update_f64(f, c, momentum, pm, static_cast<double *>(rm), static_cast<double *>(rv), nbt,
                                       message, kMessageCapacity);
    }
    check(status, message);
}

// The four parameters' gradients of a backward: (d_bn_weight, d_bn_bias, d_cn_weight, d_cn_bias).
using ParameterGradients = std::array<Tensor, 4>;

// The four parameters' shapes as a forward saw them; none for a parameter not given.
using ParameterShapes = std::array<std::optional<std::vector<int64_t>>, 4>;

// Zeroed gradients for the kernels to add to, of bn_size (C) or cn_size (G) values, 0 for a stage that computes
// none. Without `shapes`, 1-D (the op's outputs); with them (the eager route's), each parameter's in its shape,
// zeros too where its stage computes none (as _ops._parameter_gradients gives them).
ParameterGradients zeroed_gradients(int64_t bn_size, int64_t cn_size, c10::ScalarType dtype,
                                    const ParameterShapes *shapes) {
    ParameterGradients gradients;
    for (int i = 0; i < 4; ++i) {
        const auto *shape = shapes && (*shapes)[i] ? &*(*shapes)[i] : nullptr;
        Tensor &g = gradients[i];
        g = shape ? Tensor(at::detail::empty_cpu(*shape, dtype)) : new_empty(i < 2 ? bn_size : cn_size, dtype);
        if (g.numel()) std::memset(g.data_ptr(), 0, static_cast<size_t>(g.numel()) * g.element_size());
    }
    return gradients;
}

// _ops.backward_impl: (dx, the parameter gradients as `zeroed_gradients` makes them); with `shapes`, the
// gradients of the parameters not given are then undefined (when their stage is affine, they went to scratch).
std::tuple<Tensor, ParameterGradients> backward_of(const Tensor &dy_given, const Tensor &x_given,
                                                   const Tensor &context, int64_t flags, int64_t groups,
                                                   bool bn_affine, bool cn_affine, const ParameterShapes *shapes) {
    const bcn_c_api &a = api();
    same_shape(dy_given, x_given, "dy", "input");
    check_input(x_given);
    Laid laid = context_layout(x_given, &context);
    const Tensor &x = laid.x;
    uint32_t f = (checked_flags(flags, a.flags_all) & ~a.cumulative_average) | laid.flag;
    Shape s = shape_of_input(x);
    auto dtype = x.scalar_type();
    Tensor dy = like(dy_given.scalar_type() == dtype ? dy_given : dy_given.to(dtype), x);
    Tensor dx = new_like(x);
    bool bn = has(f, a.batch_norm) && bn_affine, cn = has(f, a.channel_norm) && cn_affine;
    int64_t g = sizing_groups(checked_groups(f, groups), s.channels);
    ParameterGradients grads = zeroed_gradients(bn ? s.channels : 0, cn ? g : 0, dtype, shapes);
    bool channels_last = has(f, a.channels_last);  // as the flags say x lies (a caller's flags too)
    int64_t n = x.numel();
    const void *px = take(x, "x", dtype, -1, channels_last);
    const void *pdy = take(dy, "dy", dtype, n, channels_last);
    void *pdx = take(dx, "dx", dtype, n, channels_last);
    auto *pctx = static_cast<const double *>(take(context, "context", at::kDouble, -1));
    // the kernels add to the gradients of the stages that compute them (a parameter given to a stage that does
    // not run gets its zeros)
    auto data = [](Tensor &t, bool computed) { return computed && t.numel() ? t.data_ptr() : nullptr; };
    void *p1 = data(grads[0], bn), *p2 = data(grads[1], bn), *p3 = data(grads[2], cn), *p4 = data(grads[3], cn);
    char message[kMessageCapacity] = "";
    int32_t status;
    {
        ThreadScope threads;
        probe(probe_backward, f, px, pdy, threads.team());
        status = dtype == c10::kFloat
            ? a.norm_backward_f32(f, s.batch, s.channels, s.spatial, groups, static_cast<const float *>(px),
                                  static_cast<const float *>(pdy), static_cast<float *>(pdx), static_cast<float *>(p1),
                                  static_cast<float *>(p2), static_cast<float *>(p3), static_cast<float *>(p4), pctx,
                                  context.numel(), message, kMessageCapacity)
            : a.norm_backward_f64(f, s.batch, s.channels, s.spatial, groups, static_cast<const double *>(px),
                                  static_cast<const double *>(pdy), static_cast<double *>(pdx),
                                  static_cast<double *>(p1), static_cast<double *>(p2), static_cast<double *>(p3),
                                  static_cast<double *>(p4), pctx, context.numel(), message, kMessageCapacity);
    }
    check(status, message);
    if (laid.relaid) dx = output_like(x_given).copy_(dx);
    if (shapes)
        for (int i = 0; i < 4; ++i)
            if (!(*shapes)[i]) grads[i] = Tensor();
    return {dx, grads};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> normalize_backward_op(const Tensor &dy, const Tensor &x,
                                                                         const Tensor &context, int64_t flags,
                                                                         int64_t groups, bool bn_affine,
                                                                         bool cn_affine) {
    BelowAutograd below;
    auto [dx, g] = backward_of(dy, x, context, flags, groups, bn_affine, cn_affine, nullptr);
    return {dx, g[0], g[1], g[2], g[3]};
}

// ---- the ops, as the dispatcher calls them -------------------------------------------------------------------

using OpSymInt = c10::SymInt;

// The typed handle of one of _ops.py's ops (defined there, in Python, before this library loads).
template <class Signature>
c10::TypedOperatorHandle<Signature> find_op(const char *name) {
    return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using MomentsSig = std::tuple<Tensor, Tensor>(const Tensor &, OpSymInt, OpSymInt);
using UpdateSig = void(Tensor &, Tensor &, Tensor &, const Tensor &, OpSymInt, double, const OptionalTensor &);
using NormalizeSig = std::tuple<Tensor, Tensor>(const Tensor &, const OptionalTensor &, const OptionalTensor &,
                                                const OptionalTensor &, const OptionalTensor &, const OptionalTensor &,
                                                const OptionalTensor &, const OptionalTensor &, const OptionalTensor &,
                                                OpSymInt, OpSymInt, double, double);
using NormalizeBatchSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor &, const OptionalTensor &,
                                                             const OptionalTensor &, const OptionalTensor &,
                                                             const OptionalTensor &, OpSymInt, OpSymInt, double,
                                                             double);
using BackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor &, const Tensor &, const Tensor &,
                                                                       OpSymInt, OpSymInt, bool, bool);
using WSSig = Tensor(const Tensor &, double, OpSymInt);
using WSBackwardSig = Tensor(const Tensor &, const Tensor &, double, OpSymInt);

// The ops the autograd kernels redispatch to and call, and the eager route's backwards call for batched gradients,
// each looked up once.
struct Ops {
    c10::TypedOperatorHandle<MomentsSig> moments = find_op<MomentsSig>("bcnswift::moments");
    c10::TypedOperatorHandle<UpdateSig> update_running = find_op<UpdateSig>("bcnswift::update_running_");
    c10::TypedOperatorHandle<NormalizeSig> normalize = find_op<NormalizeSig>("bcnswift::normalize");
    c10::TypedOperatorHandle<NormalizeBatchSig> normalize_batch =
        find_op<NormalizeBatchSig>("bcnswift::normalize_batch");
    c10::TypedOperatorHandle<BackwardSig> backward = find_op<BackwardSig>("bcnswift::normalize_backward");
    c10::TypedOperatorHandle<WSSig> ws = find_op<WSSig>("bcnswift::weight_standardization");
    c10::TypedOperatorHandle<WSBackwardSig> ws_backward =
        find_op<WSBackwardSig>("bcnswift::weight_standardization_backward");
};

const Ops &ops() {
    static const Ops found;
    return found;
}

// _ops._vmapped: whether t is a vmap's BatchedTensor, without memory of its own for the kernels. Autograd's
// grad(..., is_grads_batched=True) and jacobian(..., vectorize=True) run a backward under (legacy) vmap with such
// output gradients; the eager route's backwards then call the backward op through the dispatcher, where vmap runs
// it once per gradient of the batch.
bool vmapped(const Tensor &t) {
    return t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Batched, c10::DispatchKey::FuncTorchBatched,
                                                     c10::DispatchKey::FuncTorchGradWrapper}));
}

// ---- the eager route (bcnswift::_eager_normalize) ------------------------------------------------------------

// _ops._EagerForward in C++: a module's whole forward in one op call, and its backward a node of autograd's graph
// that runs no Python. In eager mode the Python route's autograd.Function, its numpy views and its bookkeeping
// cost a small layer several times its kernels, forward and backward, in a training step (docs/PYTORCH.md,
// "Native operators"). Same kernel calls with the same flags as the Python route, so the same bits.

constexpr const char *kNoSecondDerivative =
    "bcnswift.torch's kernels have no second derivative (double backward); set BCNSWIFT_TORCH_COMPOSED=1 for the "
    "composed pure-torch path, which has";  // _ops._NO_SECOND_DERIVATIVE

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

}  // namespace

// The eager route's autograd Functions, named outside the anonymous namespace: autograd names their nodes after
// them (a graph shows torch::autograd::CppNode<bcnswift::EagerNormalize>).
namespace bcnswift {

// _ops._NoSecondDerivative: g, whose derivative raises. Applied to a backward's gradients when it builds a graph
// (create_graph=True), with anchors (the forward's input or a parameter, and the output gradient, those that
// require grad) that attach it to that graph, as a gradient computed by torch would be.
struct NoSecondDerivative : public torch::autograd::Function<NoSecondDerivative> {
    static Tensor forward(AutogradContext *, const Tensor &g, at::TensorList /*anchors*/) { return g.clone(); }
    static variable_list backward(AutogradContext *, variable_list) {
        TORCH_CHECK(false, kNoSecondDerivative);
        return {};
    }
};

// _ops._first_order_only: with create_graph=True (grad mode on in a backward) each gradient marked so that its
// derivative raises, attached to the graph through `anchor` and the output gradient `dy` (those that require
// grad); else the gradients as they are.
variable_list first_order_only(variable_list grads, const Tensor &anchor, const Tensor &dy) {
    if (!at::GradMode::is_enabled()) return grads;
    std::vector<Tensor> anchors;
    for (const Tensor &t : {anchor, dy})
        if (t.defined() && t.requires_grad()) anchors.push_back(t);
    if (anchors.empty()) return grads;
    for (Tensor &g : grads)
        if (g.defined()) g = NoSecondDerivative::apply(g, at::TensorList(anchors));
    return grads;
}

// The arguments of an eager forward besides the tensors that may need gradients.
struct EagerCall {
    OptionalTensor running_mean, running_var, num_batches_tracked, moving_speed;
    int64_t flags, groups;
    double eps, bn_eps, momentum;
    bool update;  // training with running buffers: they are updated in place
};

// What the normalization after an estimated update checks, checked before it (the update writes the buffers, and
// a call that fails must change none): each parameter's dtype and size, and each stage's eps. Phase (a) checked
// the rest (groups, a non-finite x under BCN_NAN_RAISE). _ops._check_before_estimates is the Python route's.
void check_before_estimates(const Tensor &x, const OptionalTensor &bn_weight, const OptionalTensor &bn_bias,
                            const OptionalTensor &cn_weight, const OptionalTensor &cn_bias, const EagerCall &call) {
    const bcn_c_api &a = api();
    auto dtype = x.scalar_type();
    int64_t c = x.size(1), g = checked_groups(call.flags, call.groups);
    if (has(call.flags, a.batch_norm)) {
        take(readable(bn_weight), "bn_weight", dtype, c);
        take(readable(bn_bias), "bn_bias", dtype, c);
        TORCH_CHECK_VALUE(call.bn_eps > 0 && std::isfinite(call.bn_eps), "eps must be a positive finite number, got ",
                          call.bn_eps);
    }
    if (g > 0) {
        take(readable(cn_weight), "cn_weight", dtype, g);
        take(readable(cn_bias), "cn_bias", dtype, g);
        TORCH_CHECK_VALUE(call.eps > 0 && std::isfinite(call.eps), "eps must be a positive finite number, got ",
                          call.eps);
    }
}

struct EagerNormalize : public torch::autograd::Function<EagerNormalize> {
    static Tensor forward(AutogradContext *ctx, const Tensor &x, const OptionalTensor &bn_weight,
                          const OptionalTensor &bn_bias, const OptionalTensor &cn_weight, const OptionalTensor &cn_bias,
                          const EagerCall &call) {
        BelowAutograd below;
        const bcn_c_api &a = api();
        // the speed is the rate of the estimates' update alone: read (and checked) only for one
        double momentum = call.moving_speed && call.update ? moving_speed_value(*call.moving_speed) : call.momentum;
        check_input(x);
        Laid laid = context_layout(x, nullptr);  // where it lies, or a C-order copy
        Tensor y, context, stamped;  // the context, and the stamped tensor it is a view of (new_context)
        if (call.update && has(call.flags, a.estimated)) {
            // the estimates first, rounded to the buffers' dtype, then the eval normalization with them
            auto [measured, moments] = moments_of(laid, call.flags, call.groups, &stamped);
            check_before_estimates(x, bn_weight, bn_bias, cn_weight, cn_bias, call);
            Tensor rm = call.running_mean.value_or(Tensor()), rv = call.running_var.value_or(Tensor());
            Tensor nbt = call.num_batches_tracked.value_or(Tensor());
            update_running_op(rm, rv, nbt, moments, call.flags, momentum, std::nullopt);
            std::tie(y, context) = normalize_laid(x, laid, measured, Tensor(), bn_weight, bn_bias, call.running_mean,
                                                  call.running_var, cn_weight, cn_bias, call.flags, call.groups,
                                                  call.eps, call.bn_eps);
        } else if (call.update) {  // one call: the normalization and the buffers' update
            Written written{call.running_mean.value_or(Tensor()), call.running_var.value_or(Tensor()),
                            call.num_batches_tracked.value_or(Tensor()), momentum};
            std::tie(y, context) = normalize_laid(x, laid, Tensor(), Tensor(), bn_weight, bn_bias, std::nullopt,
                                                  std::nullopt, cn_weight, cn_bias, call.flags | a.training,
                                                  call.groups, call.eps, call.bn_eps, &written, &stamped);
        } else {
            std::tie(y, context) = normalize_laid(x, laid, Tensor(), Tensor(), bn_weight, bn_bias, call.running_mean,
                                                  call.running_var, cn_weight, cn_bias, call.flags, call.groups,
                                                  call.eps, call.bn_eps, nullptr, &stamped);
        }
        if (call.update)  // written through their memory: tell autograd, as an in-place torch op would
            for (const OptionalTensor *t : {&call.running_mean, &call.running_var, &call.num_batches_tracked})
                if (*t && t->value().defined() && !t->value().is_inference())
                    torch::autograd::impl::bump_version(t->value());
        // the context, stamped, beside x, so that a recomputing checkpoint replaces both; and aside, exact, for a
        // saved-tensor hook that rounds what it stores (_ops._save)
        ctx->save_for_backward({x, stamped});
        auto &saved = ctx->saved_data;
        saved["context"] = context;
        saved["stamped_at"] = reinterpret_cast<int64_t>(stamped.data_ptr());
        saved["flags"] = call.flags;
        saved["groups"] = call.groups;
        // a stage is affine when either parameter is given (the kernels then compute both gradients)
        saved["bn_affine"] = bn_weight.has_value() || bn_bias.has_value();
        saved["cn_affine"] = cn_weight.has_value() || cn_bias.has_value();
        const OptionalTensor *parameters[] = {&bn_weight, &bn_bias, &cn_weight, &cn_bias};
        c10::List<std::optional<std::vector<int64_t>>> shapes;  // ska's map holds IValues
        Tensor anchor;  // what attaches the gradients to a second backward's graph: x, else a parameter
        for (const OptionalTensor *p : parameters) {
            shapes.push_back(*p ? std::optional<std::vector<int64_t>>((*p)->sizes().vec()) : std::nullopt);
            if (!x.requires_grad() && !anchor.defined() && *p && (*p)->requires_grad()) anchor = **p;
        }
        saved["shapes"] = shapes;
        if (anchor.defined()) saved["anchor"] = anchor;
        return y;
    }

    static variable_list backward(AutogradContext *ctx, variable_list grad_outputs) {
        auto variables = ctx->get_saved_variables();  // checks that x was not modified in place since
        const Tensor &x = variables[0];
        auto &saved = ctx->saved_data;
        Tensor context = saved_context(saved["context"].toTensor(), variables[1], saved["stamped_at"].toInt());
        const Tensor &dy = grad_outputs[0];
        ParameterShapes shapes;
        auto listed = saved["shapes"].to<c10::List<std::optional<std::vector<int64_t>>>>();
        for (int i = 0; i < 4; ++i) shapes[i] = listed.get(i);
        Tensor dx;
        ParameterGradients g;
        if (vmapped(dy)) {  // the op, which vmap batches; each parameter's gradient in its shape, as backward_of's
            Tensor g0, g1, g2, g3;
            std::tie(dx, g0, g1, g2, g3) = ops().backward.call(dy, x, context, saved["flags"].toInt(),
                                                               saved["groups"].toInt(), saved["bn_affine"].toBool(),
                                                               saved["cn_affine"].toBool());
            g = {g0, g1, g2, g3};
            for (int i = 0; i < 4; ++i)
                g[i] = !shapes[i] ? Tensor() : shapes[i]->size() == 1 ? g[i] : g[i].view(*shapes[i]);
        } else {
            BelowAutograd below;
            std::tie(dx, g) = backward_of(dy, x, context, saved["flags"].toInt(),
                                          saved["groups"].toInt(), saved["bn_affine"].toBool(),
                                          saved["cn_affine"].toBool(), &shapes);
        }
        auto anchor = saved.find("anchor");
        // x, the parameters, then EagerCall
        return first_order_only({dx, g[0], g[1], g[2], g[3], Tensor()},
                                anchor == saved.end() ? x : anchor->second.toTensor(), dy);
    }
};

}  // namespace bcnswift

namespace {

Tensor eager_normalize_op(const Tensor &x, const OptionalTensor &bn_weight, const OptionalTensor &bn_bias,
                          const OptionalTensor &cn_weight, const OptionalTensor &cn_bias,
                          const OptionalTensor &running_mean, const OptionalTensor &running_var,
                          const OptionalTensor &num_batches_tracked, const OptionalTensor &moving_speed, int64_t flags,
                          int64_t groups, double eps, double bn_eps, double momentum, bool update) {
    // _ops.check_running_statistics, in its words: a pair, neither requiring grad (the kernels would give them no
    // gradient, silently)
    if (running_mean.has_value() != running_var.has_value())
        TORCH_CHECK_VALUE(false, "the batch-norm stage has a running ", running_mean ? "mean" : "variance",
                          " but no running ", running_mean ? "variance" : "mean",
                          " (None): give it both running statistics, or neither");
    for (auto [t, what] : {std::pair{&running_mean, "mean"}, std::pair{&running_var, "variance"}})
        TORCH_CHECK(!(*t && t->value().defined() && t->value().requires_grad()), "the running ", what,
                    " requires grad: running statistics are held constant, never differentiated (torch's batch norms "
                    "refuse them too); turn it off with requires_grad_(False)");
    bcnswift::EagerCall call{running_mean, running_var, num_batches_tracked, moving_speed, flags, groups, eps, bn_eps,
                             momentum, update};
    return bcnswift::EagerNormalize::apply(x, bn_weight, bn_bias, cn_weight, cn_bias, call);
}

// ---- Weight Standardization (_ops._weight_standardization and its backward) ------------------------------

// t as [O, fan-in] rows over its own memory, when each t[o] is one dense block in C order or any other (a
// channels_last weight's block is [kh, kw, I]): standardization per output channel does not care in which order
// a block holds its fan-in (_ops._rows).
bool dense_rows(const Tensor &t) {
    int64_t rows = t.size(0), fan = t.numel() / rows;
    if (rows > 1 && t.stride(0) != fan) return false;
    std::vector<std::pair<int64_t, int64_t>> axes;  // (stride, size) of the axes of the fan-in that count
    for (int64_t d = 1; d < t.dim(); ++d)
        if (t.size(d) != 1) axes.emplace_back(t.stride(d), t.size(d));
    std::sort(axes.begin(), axes.end());
    int64_t expected = 1;
    for (auto [stride, size] : axes) {
        if (stride != expected) return false;
        expected *= size;
    }
    return true;
}

void check_weight(const Tensor &w) {  // _ops._check_weight
    TORCH_CHECK_TYPE(w.device().is_cpu() && (w.scalar_type() == c10::kFloat || w.scalar_type() == c10::kDouble),
                     "bcnswift ops take CPU float32 or float64 tensors, got a weight ", torch_name(w.scalar_type()),
                     " on ", w.device().str());
    TORCH_CHECK_VALUE(w.dim() >= 2 && w.numel() != 0, "weight must have rank >= 2 ([out_channels, ...]) and values, "
                      "got shape ", shape_of(w));
}

// w where its rows lie (dense per output channel, in any order of the fan-in), else a C-order copy; aligned, as
// _ext.c's take checks every array
Tensor weight_rows(const Tensor &w) {
    check_weight(w);
    Tensor rows = w.is_contiguous() || dense_rows(w) ? w : w.contiguous();
    TORCH_CHECK_VALUE(aligned(rows), "w must be aligned and C-contiguous");
    return rows;
}

Tensor ws_forward_op(const Tensor &given, double eps, int64_t flags) {
    BelowAutograd below;
    Tensor w = weight_rows(given);
    uint32_t f = checked_flags(flags, api().ws_flags_all);
    Tensor out = new_like(w);  // in w's own layout
    int64_t rows = w.size(0), fan = w.numel() / rows;
    char message[kMessageCapacity] = "";
    int32_t status;
    {
        ThreadScope threads;
        probe(probe_ws_forward, f, w.data_ptr(), nullptr, threads.team());
        status = w.scalar_type() == c10::kFloat
            ? api().ws_forward_f32(f, rows, fan, eps, w.data_ptr<float>(), out.data_ptr<float>(), message,
                                   kMessageCapacity)
            : api().ws_forward_f64(f, rows, fan, eps, w.data_ptr<double>(), out.data_ptr<double>(), message,
                                   kMessageCapacity);
    }
    check(status, message);
    return out;
}

Tensor ws_backward_op(const Tensor &grad_given, const Tensor &given, double eps, int64_t flags) {
    BelowAutograd below;
    same_shape(grad_given, given, "grad", "weight");
    Tensor w = weight_rows(given);
    Tensor grad = like(grad_given.scalar_type() == w.scalar_type() ? grad_given : grad_given.to(w.scalar_type()), w);
    Tensor out = new_like(w);
    int64_t rows = w.size(0), fan = w.numel() / rows;
    uint32_t f = checked_flags(flags, api().ws_flags_all);
    // grad has w's shape, so like() gave it w's strides (its rows in the same order); aligned, as _ext.c checks
    TORCH_CHECK_VALUE(aligned(grad), "grad_w_hat must be aligned and C-contiguous");
    char message[kMessageCapacity] = "";
    int32_t status;
    {
        ThreadScope threads;
        probe(probe_ws_backward, f, w.data_ptr(), grad.data_ptr(), threads.team());
        status = w.scalar_type() == c10::kFloat
            ? api().ws_backward_f32(f, rows, fan, eps, w.data_ptr<float>(), grad.data_ptr<float>(),
                                    out.data_ptr<float>(), message, kMessageCapacity)
            : api().ws_backward_f64(f, rows, fan, eps, w.data_ptr<double>(), grad.data_ptr<double>(),
                                    out.data_ptr<double>(), message, kMessageCapacity);
    }
    check(status, message);
    return out;
}

}  // namespace

namespace bcnswift {

// _ops._EagerWeightStandardization in C++ (bcnswift::_eager_weight_standardization): a WS layer's weight, whose
// backward is a node of autograd's graph that runs no Python, as the eager norms' (EagerNormalize).
struct EagerWeightStandardization : public torch::autograd::Function<EagerWeightStandardization> {
    static Tensor forward(AutogradContext *ctx, const Tensor &w, double eps, int64_t flags) {
        Tensor out = ws_forward_op(w, eps, flags);
        ctx->save_for_backward({w});
        ctx->saved_data["eps"] = eps;
        ctx->saved_data["flags"] = flags;
        return out;
    }

    static variable_list backward(AutogradContext *ctx, variable_list grad_outputs) {
        Tensor w = ctx->get_saved_variables()[0];
        const Tensor &grad = grad_outputs[0];
        double eps = ctx->saved_data["eps"].toDouble();
        int64_t flags = ctx->saved_data["flags"].toInt();
        // batched: the op, which vmap batches (as EagerNormalize's)
        Tensor dw = vmapped(grad) ? ops().ws_backward.call(grad, w, eps, flags) : ws_backward_op(grad, w, eps, flags);
        return first_order_only({dw, Tensor(), Tensor()}, w, grad);  // w, then eps and flags
    }
};

}  // namespace bcnswift

namespace {

Tensor eager_weight_standardization_op(const Tensor &w, double eps, int64_t flags) {
    return bcnswift::EagerWeightStandardization::apply(w, eps, flags);
}

// ---- the ops' autograd kernels on the CPU ---------------------------------------------------------------

// _ops.py's register_autograd formulas, in C++ for CPU tensors (the dispatcher's AutogradCPU; other devices keep
// the Python ones). torch.library runs an op's Python autograd kernel on every call, and a compiled graph calls
// the ops with gradients off: there the kernel only redispatches, and that Python cost more than the CPU kernel
// of a small layer (in a compiled training step of "small", 40 us a call: docs/PERFORMANCE.md). So with nothing
// to differentiate these redispatch in C++; otherwise they build the same graph as the formulas in Python: x and
// the context saved, the context and moments not differentiable, the backward the op normalize_backward (whose
// own kernel here makes a second derivative raise), each parameter's gradient in its parameter's shape.

bool any_requires_grad(std::initializer_list<const Tensor *> tensors) {
    if (!at::GradMode::is_enabled()) return false;
    for (const Tensor *t : tensors)
        if (t->defined() && t->requires_grad()) return true;
    return false;
}

const Tensor &or_undefined(const OptionalTensor &t) {
    static const Tensor undefined;
    return t ? *t : undefined;
}

}  // namespace

namespace bcnswift {

// What `_ops._save` keeps of a forward for `_normalize_gradients`: x and the context (saved: an in-place change of
// either is caught), flags, groups, which stages are affine, and each parameter's shape (none where not given).
void save_normalization(AutogradContext *ctx, const Tensor &x, const Tensor &context, const OpSymInt &flags,
                        const OpSymInt &groups, const OptionalTensor *const (&parameters)[4]) {
    ctx->save_for_backward({x, context});
    auto &saved = ctx->saved_data;
    saved["flags"] = flags;
    saved["groups"] = groups;
    saved["bn_affine"] = parameters[0]->has_value() || parameters[1]->has_value();
    saved["cn_affine"] = parameters[2]->has_value() || parameters[3]->has_value();
    const char *keys[] = {"shape0", "shape1", "shape2", "shape3"};
    for (int i = 0; i < 4; ++i)
        saved[keys[i]] = *parameters[i] ? c10::IValue((*parameters[i])->sym_sizes()) : c10::IValue();
}

// `_normalize_gradients`: (dx, d_bn_weight, d_bn_bias, d_cn_weight, d_cn_bias) by the op normalize_backward, each
// parameter's in its shape (undefined where not given).
variable_list normalization_gradients(AutogradContext *ctx, const Tensor &dy) {
    auto saved_tensors = ctx->get_saved_variables();
    auto &saved = ctx->saved_data;
    auto [dx, g0, g1, g2, g3] = ops().backward.call(dy, saved_tensors[0], saved_tensors[1],
                                                    saved["flags"].toSymInt(), saved["groups"].toSymInt(),
                                                    saved["bn_affine"].toBool(), saved["cn_affine"].toBool());
    variable_list grads = {dx};
    const char *keys[] = {"shape0", "shape1", "shape2", "shape3"};
    Tensor params[] = {g0, g1, g2, g3};
    for (int i = 0; i < 4; ++i) {
        const c10::IValue &shape = saved[keys[i]];
        if (shape.isNone()) {
            grads.emplace_back();
            continue;
        }
        auto sizes = shape.toSymIntVector();
        grads.push_back(sizes.size() == 1 ? params[i] : params[i].view_symint(sizes));
    }
    return grads;
}

struct NormalizeOp : public torch::autograd::Function<NormalizeOp> {
    static variable_list forward(AutogradContext *ctx, c10::DispatchKeySet ks, const Tensor &x,
                                 const OptionalTensor &context, const OptionalTensor &moments,
                                 const OptionalTensor &bn_weight, const OptionalTensor &bn_bias,
                                 const OptionalTensor &running_mean, const OptionalTensor &running_var,
                                 const OptionalTensor &cn_weight, const OptionalTensor &cn_bias, OpSymInt flags,
                                 OpSymInt groups, double eps, double bn_eps) {
        at::AutoDispatchBelowAutograd below;
        auto [y, made] = ops().normalize.redispatch(ks & c10::after_autograd_keyset, x, context, moments, bn_weight,
                                                    bn_bias, running_mean, running_var, cn_weight, cn_bias, flags,
                                                    groups, eps, bn_eps);
        save_normalization(ctx, x, made, flags, groups, {&bn_weight, &bn_bias, &cn_weight, &cn_bias});
        ctx->mark_non_differentiable({made});  // the context is bookkeeping, not a value
        return {y, made};
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        variable_list g = normalization_gradients(ctx, grads[0]);
        // ks, x, context, moments, bn_weight, bn_bias, running_mean, running_var, cn_weight, cn_bias, then flags,
        // groups, eps, bn_eps
        return {Tensor(), g[0], Tensor(), Tensor(), g[1], g[2], Tensor(), Tensor(), g[3], g[4],
                Tensor(), Tensor(), Tensor(), Tensor()};
    }
};

struct NormalizeBatchOp : public torch::autograd::Function<NormalizeBatchOp> {
    static variable_list forward(AutogradContext *ctx, c10::DispatchKeySet ks, const Tensor &x,
                                 const OptionalTensor &bn_weight, const OptionalTensor &bn_bias,
                                 const OptionalTensor &cn_weight, const OptionalTensor &cn_bias, OpSymInt flags,
                                 OpSymInt groups, double eps, double bn_eps) {
        at::AutoDispatchBelowAutograd below;
        auto [y, context, moments] = ops().normalize_batch.redispatch(ks & c10::after_autograd_keyset, x, bn_weight,
                                                                      bn_bias, cn_weight, cn_bias, flags, groups, eps,
                                                                      bn_eps);
        save_normalization(ctx, x, context, flags, groups, {&bn_weight, &bn_bias, &cn_weight, &cn_bias});
        ctx->mark_non_differentiable({context, moments});  // bookkeeping and statistics, not values
        return {y, context, moments};
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        variable_list g = normalization_gradients(ctx, grads[0]);
        // ks, x, bn_weight, bn_bias, cn_weight, cn_bias, then flags, groups, eps, bn_eps
        return {Tensor(), g[0], g[1], g[2], g[3], g[4], Tensor(), Tensor(), Tensor(), Tensor()};
    }
};

struct WeightStandardizationOp : public torch::autograd::Function<WeightStandardizationOp> {
    static Tensor forward(AutogradContext *ctx, c10::DispatchKeySet ks, const Tensor &w, double eps, OpSymInt flags) {
        at::AutoDispatchBelowAutograd below;
        Tensor out = ops().ws.redispatch(ks & c10::after_autograd_keyset, w, eps, flags);
        ctx->save_for_backward({w});
        ctx->saved_data["eps"] = eps;
        ctx->saved_data["flags"] = flags;
        return out;
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        Tensor dw = ops().ws_backward.call(grads[0], ctx->get_saved_variables()[0],
                                           ctx->saved_data["eps"].toDouble(), ctx->saved_data["flags"].toSymInt());
        return {Tensor(), dw, Tensor(), Tensor()};  // ks, w, eps, flags
    }
};

// An op whose outputs have no derivative: differentiating them raises `message` (the backward ops' second
// derivative, as _ops._no_double_backward; the moments, as torch.library says of an op without a formula).
template <class Op>
struct Underivable : public torch::autograd::Function<Underivable<Op>> {
    template <class... Args>
    static variable_list forward(AutogradContext *, c10::DispatchKeySet ks, const Args &...args) {
        at::AutoDispatchBelowAutograd below;
        auto out = Op::handle().redispatch(ks & c10::after_autograd_keyset, args...);
        if constexpr (std::is_same_v<decltype(out), Tensor>) {
            return {out};
        } else {
            return std::apply([](auto &...t) { return variable_list{t...}; }, out);
        }
    }
    static variable_list backward(AutogradContext *, variable_list) {
        TORCH_CHECK(false, Op::message());
        return {};
    }
};

}  // namespace bcnswift

namespace {

struct MomentsOp {
    static const auto &handle() { return ops().moments; }
    static const char *message() {
        return "Trying to backward through bcnswift.moments.default but no autograd formula was registered. Please "
               "use register_autograd to add one.";  // torch.library's words for it
    }
};
struct BackwardOp {
    static const auto &handle() { return ops().backward; }
    static const char *message() { return kNoSecondDerivative; }
};
struct WSBackwardOp {
    static const auto &handle() { return ops().ws_backward; }
    static const char *message() { return kNoSecondDerivative; }
};

std::tuple<Tensor, Tensor> moments_autograd(c10::DispatchKeySet ks, const Tensor &x, OpSymInt flags, OpSymInt groups) {
    if (!any_requires_grad({&x})) {
        at::AutoDispatchBelowAutograd below;
        return MomentsOp::handle().redispatch(ks & c10::after_autograd_keyset, x, flags, groups);
    }
    auto out = bcnswift::Underivable<MomentsOp>::apply(ks, x, flags, groups);
    return {out[0], out[1]};
}

// update_running_ differentiates nothing; it mutates its first three arguments, whose versions it bumps, as
// torch.library's ADInplaceOrView kernel for it (Python) does, which this one passes by.
void update_running_autograd(c10::DispatchKeySet ks, Tensor &running_mean, Tensor &running_var,
                             Tensor &num_batches_tracked, const Tensor &moments, OpSymInt flags, double momentum,
                             const OptionalTensor &moving_speed) {
    {
        at::AutoDispatchBelowADInplaceOrView below;
        ops().update_running.redispatch(ks & c10::after_ADInplaceOrView_keyset, running_mean, running_var,
                                        num_batches_tracked, moments, flags, momentum, moving_speed);
    }
    for (Tensor *t : {&running_mean, &running_var, &num_batches_tracked})
        if (t->defined() && !t->is_inference()) torch::autograd::impl::bump_version(*t);
}

std::tuple<Tensor, Tensor> normalize_autograd(c10::DispatchKeySet ks, const Tensor &x, const OptionalTensor &context,
                                              const OptionalTensor &moments, const OptionalTensor &bn_weight,
                                              const OptionalTensor &bn_bias, const OptionalTensor &running_mean,
                                              const OptionalTensor &running_var, const OptionalTensor &cn_weight,
                                              const OptionalTensor &cn_bias, OpSymInt flags, OpSymInt groups,
                                              double eps, double bn_eps) {
    // every tensor argument, as torch.library's kernel asks (the context, moments and buffers get no gradient)
    if (!any_requires_grad({&x, &or_undefined(context), &or_undefined(moments), &or_undefined(bn_weight),
                            &or_undefined(bn_bias), &or_undefined(running_mean), &or_undefined(running_var),
                            &or_undefined(cn_weight), &or_undefined(cn_bias)})) {
        at::AutoDispatchBelowAutograd below;
        return ops().normalize.redispatch(ks & c10::after_autograd_keyset, x, context, moments, bn_weight, bn_bias,
                                          running_mean, running_var, cn_weight, cn_bias, flags, groups, eps, bn_eps);
    }
    auto out = bcnswift::NormalizeOp::apply(ks, x, context, moments, bn_weight, bn_bias, running_mean, running_var,
                                            cn_weight, cn_bias, flags, groups, eps, bn_eps);
    return {out[0], out[1]};
}

std::tuple<Tensor, Tensor, Tensor> normalize_batch_autograd(c10::DispatchKeySet ks, const Tensor &x,
                                                            const OptionalTensor &bn_weight,
                                                            const OptionalTensor &bn_bias,
                                                            const OptionalTensor &cn_weight,
                                                            const OptionalTensor &cn_bias, OpSymInt flags,
                                                            OpSymInt groups, double eps, double bn_eps) {
    if (!any_requires_grad({&x, &or_undefined(bn_weight), &or_undefined(bn_bias), &or_undefined(cn_weight),
                            &or_undefined(cn_bias)})) {
        at::AutoDispatchBelowAutograd below;
        return ops().normalize_batch.redispatch(ks & c10::after_autograd_keyset, x, bn_weight, bn_bias, cn_weight,
                                                cn_bias, flags, groups, eps, bn_eps);
    }
    auto out = bcnswift::NormalizeBatchOp::apply(ks, x, bn_weight, bn_bias, cn_weight, cn_bias, flags, groups, eps,
                                                 bn_eps);
    return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> normalize_backward_autograd(
    c10::DispatchKeySet ks, const Tensor &dy, const Tensor &x, const Tensor &context, OpSymInt flags, OpSymInt groups,
    bool bn_affine, bool cn_affine) {
    if (!any_requires_grad({&dy, &x, &context})) {
        at::AutoDispatchBelowAutograd below;
        return BackwardOp::handle().redispatch(ks & c10::after_autograd_keyset, dy, x, context, flags, groups,
                                               bn_affine, cn_affine);
    }
    auto out = bcnswift::Underivable<BackwardOp>::apply(ks, dy, x, context, flags, groups, bn_affine, cn_affine);
    return {out[0], out[1], out[2], out[3], out[4]};
}

Tensor ws_autograd(c10::DispatchKeySet ks, const Tensor &w, double eps, OpSymInt flags) {
    if (!any_requires_grad({&w})) {
        at::AutoDispatchBelowAutograd below;
        return ops().ws.redispatch(ks & c10::after_autograd_keyset, w, eps, flags);
    }
    return bcnswift::WeightStandardizationOp::apply(ks, w, eps, flags);
}

Tensor ws_backward_autograd(c10::DispatchKeySet ks, const Tensor &grad, const Tensor &w, double eps, OpSymInt flags) {
    if (!any_requires_grad({&grad, &w})) {
        at::AutoDispatchBelowAutograd below;
        return WSBackwardOp::handle().redispatch(ks & c10::after_autograd_keyset, grad, w, eps, flags);
    }
    return bcnswift::Underivable<WSBackwardOp>::apply(ks, grad, w, eps, flags)[0];
}

// bcnswift::_native_threads(setting): _threads.set_num_threads' setting (-1: torch's threads; clamped).
void native_threads_op(int64_t setting) { thread_setting.store(setting < 0 ? -1 : std::min<int64_t>(setting, 4096)); }

// bcnswift::_native_probe(bool on) -> int[]: starts (on) or stops recording the kernel calls (`probe`), and
// returns what was recorded since the last call, six numbers a call. For the tests.
std::vector<int64_t> native_probe_op(bool on) {
    std::lock_guard<std::mutex> hold(probe_mutex);
    probing.store(on);
    std::vector<int64_t> log;
    log.swap(probe_log);
    return log;
}

// bcnswift::_native_enable() -> int: finds the C ABI's table, then registers the ops' CPU kernels (once), and
// returns the ABI's version. Until it has run the ops keep their Python kernels, so a table that is missing or
// of another version (a raise here) leaves them working.
int64_t native_enable_op() {
    static std::once_flag once;
    // held for the process's lifetime, as TORCH_LIBRARY_IMPL holds its own Library
    static torch::Library *kernels = nullptr, *eager = nullptr, *autograd = nullptr;
    int64_t version = api().abi_version;
    std::call_once(once, [] {
        kernels = new torch::Library(torch::Library::IMPL, "bcnswift", c10::DispatchKey::CPU, __FILE__, __LINE__);
        kernels->impl("moments", &moments_op);
        kernels->impl("update_running_", &update_running_op);
        kernels->impl("normalize", &normalize_op);
        kernels->impl("normalize_batch", &normalize_batch_op);
        kernels->impl("normalize_backward", &normalize_backward_op);
        kernels->impl("weight_standardization", &ws_forward_op);
        kernels->impl("weight_standardization_backward", &ws_backward_op);
        // the eager route's op: its own autograd node, so a kernel above autograd (for the CPU tensors it takes)
        eager = new torch::Library(torch::Library::IMPL, "bcnswift", c10::DispatchKey::CompositeImplicitAutograd,
                                   __FILE__, __LINE__);
        eager->impl("_eager_normalize", &eager_normalize_op);
        eager->impl("_eager_weight_standardization", &eager_weight_standardization_op);
        // the ops' autograd formulas for CPU tensors (the Python ones, at the Autograd alias, serve the rest)
        autograd = new torch::Library(torch::Library::IMPL, "bcnswift", c10::DispatchKey::AutogradCPU, __FILE__,
                                      __LINE__);
        autograd->impl("moments", &moments_autograd);
        autograd->impl("update_running_", &update_running_autograd);
        autograd->impl("normalize", &normalize_autograd);
        autograd->impl("normalize_batch", &normalize_batch_autograd);
        autograd->impl("normalize_backward", &normalize_backward_autograd);
        autograd->impl("weight_standardization", &ws_autograd);
        autograd->impl("weight_standardization_backward", &ws_backward_autograd);
    });
    return version;
}

}  // namespace

// Private ops. _native.py's take no tensors, so their kernels serve every dispatch key; the eager route's get
// theirs from _native_enable, with the ops' CPU kernels.
TORCH_LIBRARY_FRAGMENT(bcnswift, m) {
    m.def("_native_threads(int setting) -> ()", &native_threads_op);
    m.def("_native_enable() -> int", &native_enable_op);
    m.def("_native_probe(bool on) -> int[]", &native_probe_op);
    // the eager route's whole forward (_ops.eager_forward), and a WS layer's weight
    m.def("_eager_normalize(Tensor x, Tensor? bn_weight, Tensor? bn_bias, Tensor? cn_weight, Tensor? cn_bias, "
          "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, Tensor? moving_speed, "
          "int flags, int groups, float eps, float bn_eps, float momentum, bool update) -> Tensor");
    m.def("_eager_weight_standardization(Tensor w, float eps, int flags) -> Tensor");
}

namespace {
struct ForkHandler {
    ForkHandler() { pthread_atfork(nullptr, nullptr, [] { forked.store(true); }); }
} fork_handler;
}  // namespace
