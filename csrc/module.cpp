// The importable module `fedlease._C`. Importing it loads the shared library, which registers the
// `torch.ops.fedlease.*` operators (see moe_lora.cpp); it also reports how it was built.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <pybind11/stl.h>

#include <array>

#include "dropout.h"
#include "philox.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fedlease compiled CPU kernels (registers torch.ops.fedlease.moe_lora_fwd/bwd)";
  m.def(
      "philox4x32",
      [](uint64_t seed, uint64_t counter) {
        std::array<uint32_t, 4> w;
        fedlease::philox::words(seed, counter, w.data());
        return w;
      },
      "the four Philox4x32-10 words of `counter` (high half in word 1) under the 64-bit `seed`");
  m.def(
      "philox_value",
      [](uint64_t seed, uint64_t index) { return fedlease::philox::value_of(seed, index); },
      "the 16-bit value element `index` of a tensor draws for its dropout mask under `seed`");
  m.def("philox_block", &fedlease::philox_block,
        "the 64 words of Philox block `block` (elements 64*block..) from implementation `isa`: "
        "generic, avx2 or avx512");
  m.def("philox_isa", &fedlease::philox_isa, "the Philox implementation this CPU runs");
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
