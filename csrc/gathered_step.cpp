// adadelta_ext._C.step_gathered: FusedAdadelta.step's common case, in C++.
// Each param group's tensors are gathered from the param groups and the state
// dict as they are now, and the op is called on them; nothing is kept between
// steps (NOTE [Gathered in C++] in adadelta_ext/optimizer.py).
#include <Python.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/object_ptr.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <deque>
#include <optional>
#include <vector>

#include "fused_adadelta.h"

namespace adadelta_ext {
namespace {

// How FusedAdadelta rounds its float16/bfloat16 params (kahan_sum, stochastic_round).
enum class Rounding : long { kNearest = 0, kKahan = 1, kStochastic = 2 };

// One group's options, as FusedAdadelta._call_options makes them for `device`.
struct GroupOptions {
  c10::Device device = at::kCPU;
  double lr = 0.0;
  std::optional<at::Tensor> lr_tensor;
  bool round_lr_product = false;
  double rho = 0.0;
  double eps = 0.0;
  double weight_decay = 0.0;
  bool maximize = false;
  std::optional<at::Tensor> grad_scale;
  std::optional<at::Tensor> found_inf;
};

// NOTE [References while the op runs]
// The op runs without the GIL, so other threads may meanwhile replace a grad,
// a state entry or a param group's list, and free what they replaced. So every
// tensor a call reads is referenced until it returns. Params and state are
// referenced through their Python objects (PythonReferences: no atomic
// operation), and the op's lists borrow the tensors those objects hold, as
// torch's own op calls borrow their arguments' tensors. A C++ reference would
// cost an atomic increment and decrement, and, for a tensor whose only other
// owner is its Python object, a Python incref on the way in and a GIL-taking
// decref on the way out: about 0.35 µs a param for the four tensors (a
// thousand params of 64 elements: 0.68 against 0.33 ms a step). Grads may
// have no Python object (autograd makes them in C++): they are referenced in C++.

// Python objects kept alive until the gathered step returns (with the GIL).
class PythonReferences {
 public:
  PythonReferences() = default;
  PythonReferences(const PythonReferences&) = delete;
  PythonReferences& operator=(const PythonReferences&) = delete;
  ~PythonReferences() {
    for (PyObject* object : objects_) {
      Py_DECREF(object);
    }
  }

  PyObject* keep_object(PyObject* object) {
    Py_INCREF(object);
    objects_.push_back(object);
    return object;
  }

  // The tensor of a Python tensor `object`, kept alive with it.
  const at::Tensor& keep(PyObject* object) {
    return THPVariable_Unpack(keep_object(object));
  }

 private:
  std::vector<PyObject*> objects_;
};

// A list of tensors borrowed (no reference counted) from objects that
// PythonReferences keeps alive; held by one Call, which is never moved.
class BorrowedTensors {
 public:
  BorrowedTensors() = default;
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;
  ~BorrowedTensors() {
    for (at::Tensor& tensor : tensors_) {
      c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(tensor);
    }
  }

  void push_back(const at::Tensor& tensor) {
    tensors_.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(tensor));
  }
  // NOLINTNEXTLINE(google-explicit-constructor): passed as the op's lists
  operator at::TensorList() const {
    return tensors_;
  }

 private:
  std::vector<at::Tensor> tensors_;
};

// One op call (see NOTE [References while the op runs]).
struct Call {
  const GroupOptions* options = nullptr;
  BorrowedTensors params;
  std::vector<at::Tensor> grads;
  BorrowedTensors square_avgs;
  BorrowedTensors acc_deltas;
  BorrowedTensors state_steps;
  BorrowedTensors compensations;  // kahan_sum's 16-bit call only
  std::vector<int64_t> seeds;  // stochastic_round's 16-bit call only
};

// Whether `object` is a plain tensor: torch.Tensor or torch.nn.Parameter, no
// subclass (a DTensor's grad and state are not its local tensor's).
bool is_plain_tensor(PyObject* object) {
  return object != nullptr && THPVariable_CheckExact(object);
}

// Whether `state` is what FusedAdadelta._state_like would make for `param`
// now, in `dtype`: else the Python path converts it, or the op names the
// mismatch. Strides as empty_like(param, preserve_format) makes them (asked on
// meta, as _layout_differs does, where they differ from the param's).
bool fits(const at::Tensor& state, const at::Tensor& param, at::ScalarType dtype) {
  if (state.scalar_type() != dtype || state.device() != param.device() || state.sizes() != param.sizes()) {
    return false;
  }
  if (state.strides() == param.strides()) {
    return true;
  }
  const at::Tensor layout = at::empty_like(
      param, param.options().device(at::kMeta), at::MemoryFormat::Preserve);
  return state.strides() == layout.strides();
}

PyObject* interned(const char* name) {
  PyObject* string = PyUnicode_InternFromString(name);
  if (string == nullptr) {
    throw python_error();
  }
  return string;
}

// A Python float or int (not bool) as a double, or nothing.
std::optional<double> plain_number(PyObject* object) {
  if (PyFloat_Check(object)) {
    return PyFloat_AS_DOUBLE(object);
  }
  if (!PyLong_Check(object) || PyBool_Check(object)) {
    return std::nullopt;
  }
  const double value = PyLong_AsDouble(object);
  if (value == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();  // too large for a double: the Python path names it
    return std::nullopt;
  }
  return value;
}

// Reads one group's options tuple: (params, device, lr, rho, eps,
// weight_decay, maximize, grad_scale, found_inf, round_lr_product). Nothing
// where an option is not of the type the op takes (a string lr, say): the
// Python path then calls the op, which names it.
std::optional<GroupOptions> parse_options(PyObject* group) {
  GroupOptions options;
  PyObject* device = PyTuple_GET_ITEM(group, 1);
  PyObject* lr = PyTuple_GET_ITEM(group, 2);
  PyObject* maximize = PyTuple_GET_ITEM(group, 6);
  PyObject* round_lr_product = PyTuple_GET_ITEM(group, 9);
  if (!THPDevice_Check(device) || !PyBool_Check(maximize) || !PyBool_Check(round_lr_product)) {
    return std::nullopt;
  }
  options.device = reinterpret_cast<THPDevice*>(device)->device;
  options.maximize = maximize == Py_True;
  options.round_lr_product = round_lr_product == Py_True;
  if (THPVariable_Check(lr)) {
    options.lr_tensor = THPVariable_Unpack(lr);
  } else if (const std::optional<double> value = plain_number(lr)) {
    options.lr = *value;
  } else {
    return std::nullopt;
  }
  for (const auto& [index, value] :
       {std::pair{3, &options.rho}, std::pair{4, &options.eps}, std::pair{5, &options.weight_decay}}) {
    const std::optional<double> number = plain_number(PyTuple_GET_ITEM(group, index));
    if (!number.has_value()) {
      return std::nullopt;
    }
    *value = *number;
  }
  for (const auto& [index, tensor] :
       {std::pair{7, &options.grad_scale}, std::pair{8, &options.found_inf}}) {
    PyObject* object = PyTuple_GET_ITEM(group, index);
    if (object != Py_None) {
      if (!THPVariable_Check(object)) {
        return std::nullopt;
      }
      *tensor = THPVariable_Unpack(object);
    }
  }
  return options;
}

// The state dict's value for `key`, or nullptr (a missing key is no error).
PyObject* lookup(PyObject* dict, PyObject* key) {
  PyObject* value = PyDict_GetItemWithError(dict, key);
  if (value == nullptr && PyErr_Occurred()) {
    throw python_error();
  }
  return value;
}

// Gathers one group's params that have grads into calls (one per rounding
// kind, in the order of their first param, as FusedAdadelta._kernel_calls
// splits them). Returns false where the Python path has work to do: state to
// create or convert, a param of another type or device, or a state entry that
// is not what the optimizer keeps.
//
// The state lookup hashes each param with Tensor.__hash__, Python code during
// which another thread may run and change the groups, the state or the grads.
// So the group's params are read from a copy of its list (kept in
// `references`), and whatever is read is referenced before the next lookup.
bool gather_group(
    PyObject* group_params,
    PyObject* state,
    const GroupOptions& options,
    bool fp32_state,
    Rounding rounding,
    PythonReferences& references,
    std::deque<Call>& calls) {
  static PyObject* const kSquareAvg = interned("square_avg");
  static PyObject* const kAccDelta = interned("acc_delta");
  static PyObject* const kStep = interned("step");
  static PyObject* const kKahanComp = interned("kahan_comp");
  static PyObject* const kSeed = interned("stochastic_round_seed");
  THPObjectPtr params(PyList_GetSlice(group_params, 0, PyList_GET_SIZE(group_params)));
  if (!params) {
    throw python_error();
  }
  PyObject* const param_objects = references.keep_object(params.get());
  // This group's plain and rounded calls, once made.
  std::array<Call*, 2> call_of = {nullptr, nullptr};
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(param_objects); ++i) {
    PyObject* object = PyList_GET_ITEM(param_objects, i);
    if (!is_plain_tensor(object)) {
      return false;
    }
    const at::Tensor& param = THPVariable_Unpack(object);
    at::Tensor grad = param.grad();
    if (!grad.defined()) {
      continue;
    }
    if (param.device() != options.device) {
      return false;
    }
    PyObject* param_state = lookup(state, object);
    if (param_state == nullptr || !PyDict_Check(param_state) || PyDict_GET_SIZE(param_state) == 0) {
      return false;
    }
    // String keys: no Python code runs in these lookups. What they find is referenced before
    // anything that could run Python code (fits(), under a dispatch mode).
    PyObject* square_avg = lookup(param_state, kSquareAvg);
    PyObject* acc_delta = lookup(param_state, kAccDelta);
    PyObject* step = lookup(param_state, kStep);
    PyObject* compensation = rounding == Rounding::kKahan ? lookup(param_state, kKahanComp) : nullptr;
    PyObject* seed_object = rounding == Rounding::kStochastic ? lookup(param_state, kSeed) : nullptr;
    const at::ScalarType dtype = param.scalar_type();
    const bool rounded = rounding != Rounding::kNearest && is_reduced_float(dtype);
    // A 16-bit param's buffer or seed, where it rounds so; any other param keeps no buffer
    // (a stale one is dropped by the Python path).
    const bool kahan_ready = rounding != Rounding::kKahan ||
        (rounded ? is_plain_tensor(compensation) : compensation == nullptr);
    const bool seeded = rounding == Rounding::kStochastic && rounded;
    int64_t seed = 0;
    if (seeded) {
      int overflow = 1;  // stays so unless the seed is a Python int
      if (seed_object != nullptr && PyLong_CheckExact(seed_object)) {
        seed = PyLong_AsLongLongAndOverflow(seed_object, &overflow);
      }
      if (overflow != 0) {
        return false;
      }
    }
    if (!is_plain_tensor(square_avg) || !is_plain_tensor(acc_delta) || !is_plain_tensor(step) ||
        !kahan_ready) {
      return false;
    }
    const at::Tensor& square_avg_tensor = references.keep(square_avg);
    const at::Tensor& acc_delta_tensor = references.keep(acc_delta);
    const at::Tensor& step_tensor = references.keep(step);
    const at::Tensor* compensation_tensor =
        rounded && rounding == Rounding::kKahan ? &references.keep(compensation) : nullptr;
    const at::ScalarType state_dtype = fp32_state && is_reduced_float(dtype) ? at::kFloat : dtype;
    if (!fits(square_avg_tensor, param, state_dtype) ||
        (compensation_tensor != nullptr && !fits(*compensation_tensor, param, dtype))) {
      return false;
    }
    Call*& call = call_of[rounded];
    if (call == nullptr) {
      call = &calls.emplace_back();
      call->options = &options;
    }
    call->params.push_back(param);
    call->grads.push_back(std::move(grad));
    call->square_avgs.push_back(square_avg_tensor);
    call->acc_deltas.push_back(acc_delta_tensor);
    call->state_steps.push_back(step_tensor);
    if (compensation_tensor != nullptr) {
      call->compensations.push_back(*compensation_tensor);
    } else if (seeded) {
      call->seeds.push_back(seed);
    }
  }
  return true;
}

// fused_adadelta_ (or, with check_only, check_fused_adadelta) on one call.
void run(const Call& call, bool check_only) {
  const GroupOptions& options = *call.options;
  const at::TensorList compensation_list = call.compensations;
  const CompensationsArgument compensations = compensation_list.empty()
      ? std::nullopt
      : CompensationsArgument(compensation_list);
  const SeedsArgument seeds = call.seeds.empty() ? SeedsArgument() : SeedsArgument(call.seeds);
  if (options.lr_tensor.has_value()) {
    static const auto ops = std::array{
        typed_overload<const at::Tensor&, bool, CompensationsArgument, SeedsArgument>(
            "adadelta_ext::fused_adadelta_"),
        typed_overload<const at::Tensor&, bool, CompensationsArgument, SeedsArgument>(
            "adadelta_ext::check_fused_adadelta")};
    ops[check_only].call(
        call.params, call.grads, call.square_avgs, call.acc_deltas, call.state_steps,
        *options.lr_tensor, options.rho, options.eps, options.weight_decay, options.maximize,
        options.grad_scale, options.found_inf, options.round_lr_product, compensations, seeds);
  } else {
    static const auto ops = std::array{
        typed_overload<double, CompensationsArgument, SeedsArgument>("adadelta_ext::fused_adadelta_"),
        typed_overload<double, CompensationsArgument, SeedsArgument>(
            "adadelta_ext::check_fused_adadelta")};
    ops[check_only].call(
        call.params, call.grads, call.square_avgs, call.acc_deltas, call.state_steps, options.lr,
        options.rho, options.eps, options.weight_decay, options.maximize, options.grad_scale,
        options.found_inf, compensations, seeds);
  }
}

// step_gathered(groups, state, fp32_state, rounding) -> bool. groups: one
// options tuple per param group (see parse_options); state: the optimizer's
// state dict. Returns False, having changed nothing, where the Python path
// must take the step; else steps every group and returns True.
PyObject* step_gathered(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* groups = nullptr;
  PyObject* state = nullptr;
  int fp32_state = 0;
  long rounding = 0;
  if (!PyArg_ParseTuple(args, "O!O!pl", &PyList_Type, &groups, &PyDict_Type, &state, &fp32_state, &rounding)) {
    return nullptr;
  }
  const Py_ssize_t group_count = PyList_GET_SIZE(groups);
  // Destroyed after `calls`, whose lists borrow from what it references, and with the GIL.
  PythonReferences references;
  std::vector<GroupOptions> options(group_count);
  std::deque<Call> calls;  // never moved: a deque's elements stay where they are made
  for (Py_ssize_t g = 0; g < group_count; ++g) {
    PyObject* group = PyList_GET_ITEM(groups, g);
    TORCH_CHECK(
        PyTuple_Check(group) && PyTuple_GET_SIZE(group) == 10 && PyList_Check(PyTuple_GET_ITEM(group, 0)),
        "step_gathered: each group must be a tuple of 10, its params a list");
    std::optional<GroupOptions> parsed = parse_options(group);
    if (!parsed.has_value()) {
      Py_RETURN_FALSE;
    }
    options[g] = std::move(*parsed);
    if (!gather_group(
            PyTuple_GET_ITEM(group, 0), state, options[g], fp32_state != 0,
            static_cast<Rounding>(rounding), references, calls)) {
      Py_RETURN_FALSE;
    }
  }
  {
    // Every tensor is referenced (NOTE [References while the op runs]): other threads may run.
    const pybind11::gil_scoped_release no_gil;
    // As the Python path: with several calls, every one is checked before any changes a tensor.
    if (calls.size() > 1) {
      for (const Call& call : calls) {
        run(call, /*check_only=*/true);
      }
    }
    for (const Call& call : calls) {
      run(call, /*check_only=*/false);
    }
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"step_gathered", step_gathered, METH_VARARGS,
     "FusedAdadelta.step's common case: see NOTE [Gathered in C++] in adadelta_ext/optimizer.py."},
    {nullptr, nullptr, 0, nullptr}};

} // namespace
} // namespace adadelta_ext

// `import adadelta_ext._C` loads this library, which runs the op registrations
// (fused_adadelta.cpp); the module holds step_gathered.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, adadelta_ext::methods};
  return PyModule_Create(&module_def);
}
