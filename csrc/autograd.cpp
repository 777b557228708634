// Plain eager autograd of the training and eval forwards, in C++ (fusedbn._C.batch_norm_training /
// batch_norm_eval): the "eager" variant of fusedbn/_functions.py's TrainingFunction and EvalFunction, with the
// same saved tensors, gradients and checks. A Python autograd.Function costs ~25 us of host time per forward
// and backward, more than the kernels take on a BatchNorm3d of 10^4-10^5 values; these nodes cost a few.
// torch.func transforms, forward-mode AD and tracing still apply the Python Functions (_autograd.pick).
//
// The backward calls the `backward` op of the namespace the forward ran ("fusedbn", or the tests' emulator
// library): below autograd for a first-order backward; through its autograd kernel (fusedbn/_op_autograd.py,
// BackwardFunction, itself differentiable) under create_graph, so gradients of gradients work as before.
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <map>
#include <mutex>
#include <string>

#include "autograd.h"

namespace fusedbn::autograd {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardTrainOp = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&,
                                                          const OptTensor&, const OptTensor&, double, double,
                                                          const OptTensor&, c10::string_view, double,
                                                          const OptTensor&);
using ForwardEvalOp = Tensor(const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, double,
                             const OptTensor&, c10::string_view, double, const OptTensor&);
using BackwardOp = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&, bool, std::array<bool, 3>,
    const OptTensor&, const OptTensor&, const OptTensor&, c10::string_view, double, bool, const OptTensor&, bool);

struct Ops {
  c10::TypedOperatorHandle<ForwardTrainOp> forward_train;
  c10::TypedOperatorHandle<ForwardEvalOp> forward_eval;
  c10::TypedOperatorHandle<BackwardOp> backward;
};

// The ops of one namespace (csrc/schemas.h), looked up once.
const Ops& ops_of(const std::string& ns) {
  static std::mutex lock;
  static std::map<std::string, Ops> found;
  const std::lock_guard<std::mutex> guard(lock);
  auto it = found.find(ns);
  if (it == found.end()) {
    auto& dispatcher = c10::Dispatcher::singleton();
    auto typed = [&](const char* name) { return dispatcher.findSchemaOrThrow((ns + "::" + name).c_str(), ""); };
    it = found.emplace(ns, Ops{typed("forward_train").typed<ForwardTrainOp>(),
                               typed("forward_eval").typed<ForwardEvalOp>(),
                               typed("backward").typed<BackwardOp>()}).first;
  }
  return it->second;
}

bool requires_grad(const OptTensor& t) { return t.has_value() && t->defined() && t->requires_grad(); }

bool defined(const OptTensor& t) { return t.has_value() && t->defined(); }

Tensor value_or_undefined(const OptTensor& t) { return defined(t) ? *t : Tensor(); }

// What a node keeps besides its forward's statistics: fusedbn/_derivatives.py's saved_for_activation, the
// tensors act'(z) needs. Nothing without an activation; ReLU with a residual, its output (the mask); else the
// bias and the residual (z recomputed from x and the statistics) and PReLU's weight. Order: bias, output,
// residual, act_weight.
std::array<Tensor, 4> saved_for_activation(c10::string_view activation, const OptTensor& bias, const Tensor& output,
                                           const OptTensor& residual, const OptTensor& act_weight) {
  if (activation == "identity") return {};
  if (activation == "relu" && defined(residual)) return {Tensor(), output, Tensor(), Tensor()};
  return {value_or_undefined(bias), Tensor(), value_or_undefined(residual), value_or_undefined(act_weight)};
}

// Which tensors the gradients are for, by their position among the forward's arguments and the index of
// their edge in the graph (-1: not a tensor, no gradient): input, weight, bias, residual, act_weight. A node's
// edges are its defined tensor arguments, in order (torch::autograd::extract_vars).
struct GradTargets {
  std::array<int64_t, 5> position;
  std::array<int64_t, 5> edge;
};

// The edges of `tensors` (every tensor argument of the forward, in order), at `targets` positions.
template <size_t kTensors>
std::vector<int64_t> target_edges(const std::array<const OptTensor*, kTensors>& tensors,
                                  const std::array<size_t, 5>& targets) {
  std::array<int64_t, kTensors> edge_of;
  int64_t next = 0;
  for (size_t i = 0; i < kTensors; ++i) edge_of[i] = defined(*tensors[i]) ? next++ : -1;
  std::vector<int64_t> edges;
  for (size_t t : targets) edges.push_back(edge_of[t]);
  return edges;
}

// Records what `gradients` needs beside the saved tensors.
void save_context(AutogradContext* ctx, const std::string& ns, c10::string_view activation, double param,
                  std::vector<int64_t> edges) {
  ctx->saved_data["ns"] = ns;
  ctx->saved_data["activation"] = std::string(activation);
  ctx->saved_data["param"] = param;
  ctx->saved_data["edges"] = std::move(edges);
  ctx->set_materialize_grads(false);
}

// The fused backward's gradients of (input, weight, bias, residual, act_weight), placed at their positions
// among the forward's `num_args` arguments. `saved`: input, weight, bias, output, residual, act_weight, then
// two more (the statistics' sources); mean and invstd the statistics the forward normalized with.
variable_list gradients(AutogradContext* ctx, const Tensor& grad_output, const variable_list& saved,
                        const Tensor& mean, const Tensor& invstd, bool training, size_t num_args,
                        const std::array<int64_t, 5>& positions) {
  variable_list grads(num_args);
  if (!grad_output.defined()) return grads;  // nothing reached the output: zero gradients
  const auto edges = ctx->saved_data["edges"].toIntVector();
  std::array<bool, 5> needed;
  for (size_t i = 0; i < 5; ++i) needed[i] = edges[i] >= 0 && ctx->needs_input_grad(edges[i]);
  const std::string activation = ctx->saved_data["activation"].toStringRef();
  const Ops& ops = ops_of(ctx->saved_data["ns"].toStringRef());
  auto run = [&] {
    return ops.backward.call(grad_output, saved[0], saved[1], mean, invstd, training,
                             {needed[0], needed[1], needed[2]}, saved[2], saved[3], saved[4], activation,
                             ctx->saved_data["param"].toDouble(), needed[3], saved[5], needed[4]);
  };
  // Under create_graph the op's autograd kernel records BackwardFunction; else the op runs below autograd.
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> result;
  if (at::GradMode::is_enabled()) {
    result = run();
  } else {
    const at::AutoDispatchBelowAutograd below_autograd;
    result = run();
  }
  auto& [grad_input, grad_weight, grad_bias, grad_residual, grad_act_weight] = result;
  std::array<Tensor*, 5> computed{&grad_input, &grad_weight, &grad_bias, &grad_residual, &grad_act_weight};
  for (size_t i = 0; i < 5; ++i) {
    if (needed[i]) grads[positions[i]] = std::move(*computed[i]);
  }
  return grads;
}

struct TrainingNode : torch::autograd::Function<TrainingNode> {
  static constexpr size_t kArgs = 12;  // forward's, ctx excluded

  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                               double momentum, double eps, const OptTensor& residual, c10::string_view activation,
                               double param, const OptTensor& act_weight, const std::string& ns) {
    auto [output, mean, invstd] = [&] {
      const at::AutoDispatchBelowAutograd below_autograd;
      return ops_of(ns).forward_train.call(input, weight, bias, running_mean, running_var, momentum, eps, residual,
                                           activation, param, act_weight);
    }();
    const auto kept = saved_for_activation(activation, bias, output, residual, act_weight);
    ctx->save_for_backward({input, value_or_undefined(weight), kept[0], kept[1], kept[2], kept[3], mean, invstd});
    ctx->mark_non_differentiable({mean, invstd});
    const OptTensor x = input;
    save_context(ctx, ns, activation, param,
                 target_edges<7>({&x, &weight, &bias, &running_mean, &running_var, &residual, &act_weight},
                                 {0, 1, 2, 5, 6}));
    return {output, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    return gradients(ctx, grad_outputs[0], saved, saved[6], saved[7], /*training=*/true, kArgs, {0, 1, 2, 7, 10});
  }
};

struct EvalNode : torch::autograd::Function<EvalNode> {
  static constexpr size_t kArgs = 11;

  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const Tensor& running_mean, const Tensor& running_var,
                               double eps, const OptTensor& residual, c10::string_view activation, double param,
                               const OptTensor& act_weight, const std::string& ns) {
    Tensor output = [&] {
      const at::AutoDispatchBelowAutograd below_autograd;
      return ops_of(ns).forward_eval.call(input, weight, bias, running_mean, running_var, eps, residual, activation,
                                          param, act_weight);
    }();
    const auto kept = saved_for_activation(activation, bias, output, residual, act_weight);
    ctx->save_for_backward(
        {input, value_or_undefined(weight), kept[0], kept[1], kept[2], kept[3], running_mean, running_var});
    ctx->saved_data["eps"] = eps;
    const OptTensor x = input, rm = running_mean, rv = running_var;
    save_context(ctx, ns, activation, param,
                 target_edges<7>({&x, &weight, &bias, &rm, &rv, &residual, &act_weight}, {0, 1, 2, 5, 6}));
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    // The running statistics in the statistics' dtype, invstd = 1 / sqrt(var + eps): fusedbn/_derivatives.py's
    // running_statistics, the same ops.
    const auto acc = at::toOpMathType(saved[0].scalar_type());
    const Tensor mean = saved[6].to(acc);
    const Tensor invstd = saved[7].to(acc).add(ctx->saved_data["eps"].toDouble()).rsqrt_();
    return gradients(ctx, grad_outputs[0], saved, mean, invstd, /*training=*/false, kArgs, {0, 1, 2, 6, 9});
  }
};

// --- Python entry points (METH_FASTCALL), arguments as fusedbn/_functions.py's Functions take them, after
// the namespace of the ops. The kernels run without the GIL, as torch's own ops do.

struct WithoutGil {
  PyThreadState* state = PyEval_SaveThread();
  ~WithoutGil() { PyEval_RestoreThread(state); }
};

const Tensor& tensor_arg(PyObject* obj, const char* name) {
  if (!THPVariable_Check(obj)) throw torch::TypeError(c10::str("fusedbn: ", name, " must be a Tensor"));
  return THPVariable_Unpack(obj);
}

OptTensor optional_tensor_arg(PyObject* obj, const char* name) {
  return obj == Py_None ? OptTensor() : OptTensor(tensor_arg(obj, name));
}

double double_arg(PyObject* obj) {
  const double value = PyFloat_AsDouble(obj);
  if (value == -1.0 && PyErr_Occurred()) throw python_error();
  return value;
}

std::string string_arg(PyObject* obj) {
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(obj, &size);
  if (data == nullptr) throw python_error();
  return std::string(data, static_cast<size_t>(size));
}

// An activation spec (name, parameter).
std::pair<std::string, double> activation_arg(PyObject* obj) {
  if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != 2) throw torch::TypeError("fusedbn: act must be a (name, param) pair");
  return {string_arg(PyTuple_GET_ITEM(obj, 0)), double_arg(PyTuple_GET_ITEM(obj, 1))};
}

void check_nargs(Py_ssize_t nargs, Py_ssize_t expected, const char* name) {
  if (nargs != expected) throw torch::TypeError(c10::str("fusedbn._C.", name, " takes ", expected, " arguments (", nargs, " given)"));
}

// The arguments both entry points take: the namespace, input, weight and bias first; the residual, the
// activation spec and PReLU's weight last.
struct SharedArgs {
  std::string ns;
  const Tensor& input;
  OptTensor weight, bias, residual;
  std::string activation;
  double param;
  OptTensor act_weight;

  SharedArgs(PyObject* const* args, Py_ssize_t nargs)
      : ns(string_arg(args[0])),
        input(tensor_arg(args[1], "input")),
        weight(optional_tensor_arg(args[2], "weight")),
        bias(optional_tensor_arg(args[3], "bias")),
        residual(optional_tensor_arg(args[nargs - 3], "residual")),
        act_weight(optional_tensor_arg(args[nargs - 1], "act_weight")) {
    std::tie(activation, param) = activation_arg(args[nargs - 2]);
  }

  // Whether autograd records a node: grad mode on and a differentiable argument that requires grad.
  bool records_node() const {
    return at::GradMode::is_enabled() && (input.requires_grad() || requires_grad(weight) || requires_grad(bias) ||
                                          requires_grad(residual) || requires_grad(act_weight));
  }
};

// batch_norm_training(ns, input, weight, bias, running_mean, running_var, momentum, eps, residual, act,
// act_weight) -> (output, mean, invstd)
PyObject* batch_norm_training(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs(nargs, 11, "batch_norm_training");
  const SharedArgs a(args, nargs);
  const OptTensor running_mean = optional_tensor_arg(args[4], "running_mean");
  const OptTensor running_var = optional_tensor_arg(args[5], "running_var");
  const double momentum = double_arg(args[6]), eps = double_arg(args[7]);
  Tensor output, mean, invstd;
  {
    const WithoutGil no_gil;
    if (a.records_node()) {
      const variable_list outputs =
          TrainingNode::apply(a.input, a.weight, a.bias, running_mean, running_var, momentum, eps, a.residual,
                              c10::string_view(a.activation), a.param, a.act_weight, a.ns);
      output = outputs[0], mean = outputs[1], invstd = outputs[2];
    } else {
      const at::AutoDispatchBelowAutograd below_autograd;
      std::tie(output, mean, invstd) =
          ops_of(a.ns).forward_train.call(a.input, a.weight, a.bias, running_mean, running_var, momentum, eps,
                                          a.residual, a.activation, a.param, a.act_weight);
    }
  }
  PyObject* result = PyTuple_New(3);
  if (result == nullptr) throw python_error();
  PyTuple_SET_ITEM(result, 0, THPVariable_Wrap(std::move(output)));  // steals the new references
  PyTuple_SET_ITEM(result, 1, THPVariable_Wrap(std::move(mean)));
  PyTuple_SET_ITEM(result, 2, THPVariable_Wrap(std::move(invstd)));
  return result;
  END_HANDLE_TH_ERRORS
}

// batch_norm_eval(ns, input, weight, bias, running_mean, running_var, eps, residual, act, act_weight) -> output
PyObject* batch_norm_eval(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs(nargs, 10, "batch_norm_eval");
  const SharedArgs a(args, nargs);
  const Tensor& running_mean = tensor_arg(args[4], "running_mean");
  const Tensor& running_var = tensor_arg(args[5], "running_var");
  const double eps = double_arg(args[6]);
  Tensor output;
  {
    const WithoutGil no_gil;
    if (a.records_node()) {
      output = EvalNode::apply(a.input, a.weight, a.bias, running_mean, running_var, eps, a.residual,
                               c10::string_view(a.activation), a.param, a.act_weight, a.ns)[0];
    } else {
      const at::AutoDispatchBelowAutograd below_autograd;
      output = ops_of(a.ns).forward_eval.call(a.input, a.weight, a.bias, running_mean, running_var, eps, a.residual,
                                              a.activation, a.param, a.act_weight);
    }
  }
  return THPVariable_Wrap(std::move(output));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"batch_norm_training", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&batch_norm_training)),
     METH_FASTCALL, "The training forward with plain eager autograd (csrc/autograd.cpp)."},
    {"batch_norm_eval", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&batch_norm_eval)), METH_FASTCALL,
     "The eval forward with plain eager autograd (csrc/autograd.cpp)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* python_methods() { return methods; }

}  // namespace fusedbn::autograd
