// The log-sum-exp merge of attention partial results, in the two forms the kernels use.
//
// Normalised form (between ring steps): (o, lse) per query row, o = softmax(s) @ v.
//   lse' = max(lse_a, lse_b) + log1p(exp(min(lse_a, lse_b) - max(lse_a, lse_b)))
//   o'   = exp(lse_a - lse') * o_a + exp(lse_b - lse') * o_b
// Online form (inside a kernel, tile by tile): (acc, m, l) with o = acc / l, lse = m + log(l).
// A row that has seen nothing visible has lse = -inf, o = 0 (m = -inf, l = 0, acc = 0); no formula
// here ever evaluates -inf - -inf.
#pragma once

#include <cmath>
#include <limits>

#include "macros.h"

namespace ring_attn {

template <typename T>
RA_HD T neg_inf() { return -std::numeric_limits<T>::infinity(); }

// log(exp(a) + exp(b)), exact for -inf inputs.
template <typename T>
RA_HD T merge_lse(T a, T b) {
  const T hi = a > b ? a : b;
  const T lo = a > b ? b : a;
  if (hi == neg_inf<T>()) return hi;
  return hi + std::log1p(std::exp(lo - hi));
}

// Weights (w_a, w_b) of two normalised partial outputs in their merge: o' = w_a * o_a + w_b * o_b.
template <typename T>
RA_HD void merge_weights(T lse_a, T lse_b, T* w_a, T* w_b) {
  const T lse = merge_lse(lse_a, lse_b);
  *w_a = lse_a == neg_inf<T>() ? T(0) : std::exp(lse_a - lse);
  *w_b = lse_b == neg_inf<T>() ? T(0) : std::exp(lse_b - lse);
}

// Online softmax state of one query row.
template <typename T>
struct OnlineRow {
  T m;  // running max of visible scores (-inf: nothing visible yet)
  T l;  // running sum of exp(s - m)

  // Start from a normalised (o, lse): acc = o, m = lse, l = 1 (or l = 0 when lse = -inf).
  RA_HD static OnlineRow from_lse(T lse) {
    return OnlineRow{lse, lse == neg_inf<T>() ? T(0) : T(1)};
  }

  // Takes a new tile whose visible scores have max `tile_max`. Returns the factor that the
  // accumulator and l must be multiplied by: acc = acc * exp(m - m'); 1 when nothing changes.
  RA_HD T rescale_for(T tile_max) {
    if (tile_max <= m) return T(1);
    const T factor = m == neg_inf<T>() ? T(0) : std::exp(m - tile_max);
    m = tile_max;
    l *= factor;
    return factor;
  }

  // lse = m + log(l); -inf when nothing was visible.
  RA_HD T lse() const { return l > T(0) ? m + std::log(l) : neg_inf<T>(); }
  // 1 / l, or 0 when nothing was visible (so o = acc * inv_l = 0).
  RA_HD T inv_l() const { return l > T(0) ? T(1) / l : T(0); }
};

}  // namespace ring_attn
