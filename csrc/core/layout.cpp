#include "layout.h"

namespace ring_attn {

bool parse_layout(const std::string& name, Layout* out) {
  if (name == "contiguous") { *out = Layout::kContiguous; return true; }
  if (name == "zigzag") { *out = Layout::kZigzag; return true; }
  if (name == "striped") { *out = Layout::kStriped; return true; }
  if (name == "packed") { *out = Layout::kPacked; return true; }
  return false;
}

const char* layout_name(Layout layout) {
  switch (layout) {
    case Layout::kZigzag: return "zigzag";
    case Layout::kStriped: return "striped";
    case Layout::kPacked: return "packed";
    case Layout::kContiguous: default: return "contiguous";
  }
}

void fill_positions(Layout layout, int rank, int world, int64_t local_len, int32_t* out) {
  for (int64_t i = 0; i < local_len; ++i) {
    out[i] = static_cast<int32_t>(layout_position(layout, rank, world, local_len, i));
  }
}

std::string check_local_len(Layout layout, int64_t local_len) {
  if (layout == Layout::kZigzag && local_len % 2 != 0) {
    return "layout 'zigzag' needs an even local sequence length (two chunks per rank), got " +
           std::to_string(local_len);
  }
  return {};
}

int64_t layout_parts(Layout layout, int world) {
  return layout == Layout::kZigzag ? 2 * static_cast<int64_t>(world) : world;
}

static int64_t padded_len(int64_t len, int64_t parts) { return (len + parts - 1) / parts * parts; }

int64_t varlen_local_len(Layout layout, int world, const int32_t* cu_seqlens, int64_t num_seqs) {
  if (layout == Layout::kPacked) return padded_len(cu_seqlens[num_seqs], world) / world;
  const int64_t parts = layout_parts(layout, world);
  int64_t total = 0;
  for (int64_t i = 0; i < num_seqs; ++i) total += padded_len(cu_seqlens[i + 1] - cu_seqlens[i], parts);
  return total / world;
}

// The packed layout: rank's slice of the packed stream, each token's sequence found by walking
// the boundaries (both increase along the slice).
static void fill_packed_positions(int rank, int world, const int32_t* cu_seqlens, int64_t num_seqs,
                                  int32_t* pos, int32_t* seg) {
  const int64_t total = cu_seqlens[num_seqs];
  const int64_t local = padded_len(total, world) / world;
  int64_t seq = 0;
  for (int64_t j = 0; j < local; ++j) {
    const int64_t p = rank * local + j;
    pos[j] = static_cast<int32_t>(p);
    while (seq < num_seqs && cu_seqlens[seq + 1] <= p) ++seq;  // sequence seq holds p, if p < total
    const bool pad = p >= total;
    seg[2 * j] = pad ? 1 : cu_seqlens[seq];
    seg[2 * j + 1] = pad ? 0 : cu_seqlens[seq + 1] - 1;
  }
}

void fill_varlen_positions(Layout layout, int rank, int world, const int32_t* cu_seqlens,
                           int64_t num_seqs, int32_t* pos, int32_t* seg) {
  if (layout == Layout::kPacked) {
    fill_packed_positions(rank, world, cu_seqlens, num_seqs, pos, seg);
    return;
  }
  const int64_t parts = layout_parts(layout, world);
  int64_t start = 0;  // S_i
  int64_t out = 0;
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t len = cu_seqlens[i + 1] - cu_seqlens[i];
    const int64_t padded = padded_len(len, parts);
    const int64_t local = padded / world;
    for (int64_t j = 0; j < local; ++j, ++out) {
      const int64_t offset = layout_position(layout, rank, world, local, j);  // inside the sequence
      pos[out] = static_cast<int32_t>(start + offset);
      const bool pad = offset >= len;
      seg[2 * out] = pad ? 1 : static_cast<int32_t>(start);
      seg[2 * out + 1] = pad ? 0 : static_cast<int32_t>(start + len - 1);
    }
    start += padded;
  }
}

}  // namespace ring_attn
