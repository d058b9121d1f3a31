#include "layout.h"

namespace ring_attn {

bool parse_layout(const std::string& name, Layout* out) {
  if (name == "contiguous") { *out = Layout::kContiguous; return true; }
  if (name == "zigzag") { *out = Layout::kZigzag; return true; }
  if (name == "striped") { *out = Layout::kStriped; return true; }
  return false;
}

const char* layout_name(Layout layout) {
  switch (layout) {
    case Layout::kZigzag: return "zigzag";
    case Layout::kStriped: return "striped";
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

}  // namespace ring_attn
