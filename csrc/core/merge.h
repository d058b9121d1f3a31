// The log-sum-exp merge of attention partial results, in the online form the kernels use: per
// query row (acc, m, l) with o = acc / l and lse = m + log(l), tile by tile. Between ring steps the
// state is normalised (o, lse) and the next kernel resumes from it (OnlineRow::from_lse), so that
//   lse' = log(exp(lse_a) + exp(lse_b)),  o' = exp(lse_a - lse') * o_a + exp(lse_b - lse') * o_b
// holds across blocks without a separate merge pass. A row that has seen nothing visible has
// lse = -inf, o = 0 (m = -inf, l = 0, acc = 0); nothing here ever evaluates -inf - -inf. A NaN
// score (NaN or infinite inputs) makes l NaN, and with it o and lse, as in the softmax.
#pragma once

#include <cmath>
#include <limits>

#include "macros.h"

namespace ring_attn {

template <typename T>
RA_HD T neg_inf() { return -std::numeric_limits<T>::infinity(); }

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

  // lse = m + log(l); -inf when nothing was visible; NaN when a score was (l = NaN).
  RA_HD T lse() const { return l == T(0) ? neg_inf<T>() : m + std::log(l); }
  // 1 / l, or 0 when nothing was visible (so o = acc * inv_l = 0); NaN when a score was.
  RA_HD T inv_l() const { return l == T(0) ? T(0) : T(1) / l; }
};

}  // namespace ring_attn
