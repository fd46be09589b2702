// Early-return helpers for absl::Status / absl::StatusOr, used across modules.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define QKV_CONCAT_INNER(a, b) a##b
#define QKV_CONCAT(a, b) QKV_CONCAT_INNER(a, b)

// Returns from the enclosing function when `expr` yields a non-OK status.
#define QKV_RETURN_IF_ERROR(expr)                   \
  do {                                              \
    ::absl::Status qkv_status_ = (expr);            \
    if (!qkv_status_.ok()) return qkv_status_;      \
  } while (0)

// `lhs = value of expr`, or return its error status.
#define QKV_ASSIGN_OR_RETURN(lhs, expr) \
  QKV_ASSIGN_OR_RETURN_IMPL(QKV_CONCAT(qkv_statusor_, __LINE__), lhs, expr)
#define QKV_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return tmp.status();             \
  lhs = std::move(tmp).value()
