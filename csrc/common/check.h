// QMAMBA_CHECK(cond, parts...): qmamba's argument check, TORCH_CHECK's behaviour (a c10::Error, RuntimeError in
// Python, naming what to fix) with the message assembled here, part by part, into one string handed to TORCH_CHECK as
// a plain C string. Why not TORCH_CHECK(cond, parts...) itself: on the device machines' torch 2.11 + CUDA 13 build,
// any extension (a plain C++ one built by cpp_extension too, measured 2026-12-06 on an H100) segfaults when a
// TORCH_CHECK message has a non-string part (c10::str's ostream path): a bad argument crashed the process instead of
// raising. Messages of plain strings go through; so does this. Pure C++ (no CUDA): tests/test_csrc_checks.py builds it
// on the CPU.
//
// Parts: C strings, std::string, integers, bool, floating point, at::IntArrayRef (sizes(), strides(): "[2, 3]"),
// at::ScalarType ("Char", as torch names it) and c10::Device ("cuda:0").
#pragma once

#include <cstdio>
#include <string>
#include <type_traits>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

namespace qmamba {
namespace check_detail {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
template <typename I, std::enable_if_t<std::is_integral_v<I> && !std::is_same_v<I, bool> &&
                                           !std::is_same_v<I, char>, int> = 0>
inline void append(std::string& s, I v) {
  s += std::to_string(v);
}
inline void append(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  s += buf;
}
inline void append(std::string& s, float v) { append(s, static_cast<double>(v)); }
inline void append(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string s;
  (append(s, parts), ...);
  return s;
}

}  // namespace check_detail
}  // namespace qmamba

#define QMAMBA_CHECK(cond, ...)                                                              \
  do {                                                                                       \
    if (C10_UNLIKELY(!(cond))) {                                                             \
      const std::string qmamba_check_message_ = ::qmamba::check_detail::message(__VA_ARGS__); \
      TORCH_CHECK(false, qmamba_check_message_.c_str());                                     \
    }                                                                                        \
  } while (0)
