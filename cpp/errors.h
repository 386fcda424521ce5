// Exceptions thrown by the kernels. bindings.cpp maps them to Python:
//   CorruptStream  -> eoq.CorruptStreamError (a ValueError): the bytes are not a valid stream
//   InvalidInput   -> ValueError: the caller passed something the kernel does not accept
// Kernels throw only from the calling thread (parallel loops record failures and
// the caller throws after the loop), so the first error reported is deterministic.
#pragma once
#include <stdexcept>
#include <string>

namespace eoq {

struct CorruptStream : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct InvalidInput : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

}  // namespace eoq
