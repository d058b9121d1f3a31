// How the global sequence of S = world * local_len tokens maps to ranks.
//   contiguous: rank r holds [r*L, (r+1)*L)
//   zigzag    : 2*world equal chunks of C = L/2; rank r holds chunk r then chunk 2*world-1-r
//   striped   : rank r holds r, r+world, r+2*world, ...
//   packed    : as contiguous for one sequence; packed sequences are not split one by one but as
//               one stream (see below), so short sequences stay on one rank
// In every layout a rank's positions increase along its local sequence.
#pragma once

#include <cstdint>
#include <string>

#include "mask.h"

namespace ring_attn {

enum class Layout : int { kContiguous = 0, kZigzag = 1, kStriped = 2, kPacked = 3 };

// Parses "contiguous" | "zigzag" | "striped" | "packed"; false for anything else.
bool parse_layout(const std::string& name, Layout* out);
const char* layout_name(Layout layout);

// Global position of local token i on `rank`.
RA_HD int64_t layout_position(Layout layout, int rank, int world, int64_t local_len, int64_t i) {
  switch (layout) {
    case Layout::kZigzag: {
      const int64_t chunk = local_len / 2;
      return i < chunk ? rank * chunk + i : (2 * world - 1 - rank) * chunk + (i - chunk);
    }
    case Layout::kStriped:
      return rank + i * world;
    case Layout::kContiguous:
    case Layout::kPacked:
    default:
      return rank * local_len + i;
  }
}

// Fills out[0:local_len) with the positions of `rank`'s tokens.
void fill_positions(Layout layout, int rank, int world, int64_t local_len, int32_t* out);

// Empty string when `local_len` is valid for the layout, else the reason.
std::string check_local_len(Layout layout, int64_t local_len);

// Packed variable-length sequences. Sequence i has n_i = cu_seqlens[i+1] - cu_seqlens[i] tokens,
// padded to P_i, the next multiple of layout_parts (world, or 2*world for zigzag). Each rank holds
// P_i / world tokens of every sequence, in order, split inside the sequence by the layout. A
// token's position is its offset in the padded packed stream: sequence i occupies
// [S_i, S_i + P_i) with S_i = sum of P_j for j < i, its real tokens [S_i, S_i + n_i).
// The packed layout instead splits the packed stream itself: N = cu_seqlens[num_seqs] tokens
// padded at the end to world * L, L = ceil(N / world); rank r holds positions [r*L, (r+1)*L), a
// token's position is its index in the packed batch, sequence i is [cu_seqlens[i],
// cu_seqlens[i+1]) and the pads are [N, world * L).
int64_t layout_parts(Layout layout, int world);
int64_t varlen_local_len(Layout layout, int world, const int32_t* cu_seqlens, int64_t num_seqs);

// Fills rank's positions (local_len) and, per token, its sequence's real tokens as an inclusive
// (lo, hi) range of positions: seg[2*i], seg[2*i+1]; a pad token gets the empty range (1, 0).
void fill_varlen_positions(Layout layout, int rank, int world, const int32_t* cu_seqlens,
                           int64_t num_seqs, int32_t* pos, int32_t* seg);

}  // namespace ring_attn
