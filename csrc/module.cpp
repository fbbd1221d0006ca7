// The importable module `fedlease._C`. Importing it loads the shared library, which registers the
// `torch.ops.fedlease.*` operators (see moe_lora.cpp); it also reports how it was built.

#include <ATen/Parallel.h>
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fedlease compiled CPU kernels (registers torch.ops.fedlease.moe_lora_fwd/bwd)";
  m.def("parallel_info", []() { return at::get_parallel_info(); },
        "ATen's parallel backend and thread settings as compiled into this extension");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
#ifdef FEDLEASE_WITH_CUDA
  m.attr("cuda") = true;  // routing_cuda.cu was compiled in: the ops also take CUDA tensors
#else
  m.attr("cuda") = false;
#endif
}
