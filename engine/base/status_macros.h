// Status propagation: RETURN_IF_ERROR(expr) returns a non-OK absl::Status from the enclosing
// function; ASSIGN_OR_RETURN(lhs, expr) unwraps an absl::StatusOr into `lhs` or returns its
// status. For functions returning absl::Status or absl::StatusOr. Macros only; no state.
#pragma once

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define RETURN_IF_ERROR(expr)                                                                      \
  do {                                                                                             \
    if (::absl::Status moeserve_status_ = (expr); !moeserve_status_.ok()) return moeserve_status_; \
  } while (false)

#define MOESERVE_STATUS_CONCAT_INNER(a, b) a##b
#define MOESERVE_STATUS_CONCAT(a, b) MOESERVE_STATUS_CONCAT_INNER(a, b)
#define MOESERVE_ASSIGN_OR_RETURN_IMPL(statusor, lhs, expr) \
  auto statusor = (expr);                                   \
  if (!statusor.ok()) return std::move(statusor).status();  \
  lhs = std::move(statusor).value()

#define ASSIGN_OR_RETURN(lhs, expr) \
  MOESERVE_ASSIGN_OR_RETURN_IMPL(MOESERVE_STATUS_CONCAT(moeserve_statusor_, __LINE__), lhs, expr)
