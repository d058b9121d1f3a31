// The CUDA block kernels' bodies (forward, backward with reductions, deterministic backward and
// dQ) run on the CPU under emulation (emu_runtime.h), against a float64 reference computed from the
// same bf16/fp16-rounded inputs. Covers both dtypes, every head-dim bucket (32 .. 256, and padded
// head dims), GQA and MQA, lengths 1, 7, 97 and more than one tile or stage per CTA with tails on
// both sides, every mask kind of tests/test_block_kernel.py (causal, windows, packed sequences
// with pad rows), strided (head-major) inputs, the fused merge over several key blocks (including
// a block nobody sees), += accumulation of the gradients, and a deterministic backward that uses
// no reduction and gives the same bits when run again. The case list is checked to cover every
// head-dim bucket and, at d = 64, 128 and 256, each dtype with causal, sliding-window and packed
// (pad rows) masks. The Hopper kernels (sm90_fwd_kernel.cuh, sm90_bwd_kernel.cuh: TMA, mbarriers,
// wgmma, emulated by emu_sm90.h) run the "sm90a" cases: the forward at d = 64, 128 and 256, then
// the backward as block_attn_cuda.cu runs it in both modes (at d = 64 and 128 the Hopper dK/dV
// kernel with dQ fused and added by TMA reductions, and in the deterministic mode the dK/dV and
// dQ kernels, sm90_dq_kernel.cuh, with no reduction; at d = 256 the mma.sync kernels); checked to
// cover each dtype with causal, sliding-window and packed masks. The "smem99" cases launch as on a
// GPU that allows 99 KiB of shared memory per block (compute capability 8.6, 8.9): the kSmallSmem
// kernels where the usual ones do not fit (block_attn_cuda.h smem_variant), at d = 64, 96, 128 and
// 256; checked to cover each dtype with causal, sliding-window and packed masks at d = 64, 128 and
// 256.
// Built for the sm_90 code paths (stmatrix, vector reductions), and with RA_EMU_SM80 for the sm_80
// ones; csrc/cuda/emu/mutants.py checks that injected bugs make it fail.
// Exit status 0 when every case passes. Usage:
//   test_cuda_emu [case-name-substring ...]   the table's cases whose names contain any of them (all
//                                             without)
//   test_cuda_emu --random COUNT [--seed S] [--max-cost C] [case-name-substring ...]
//                                             COUNT cases drawn from the space the table samples
//                                             (random_case), seeded with S (default kDefaultSeed,
//                                             printed), each of cost at most C (case_cost,
//                                             default kDefaultMaxCost); of these, those whose
//                                             names contain any substring (all without)
//   test_cuda_emu --case NAME [--case NAME ...]   the cases of these names (as printed), table or
//                                             drawn: a failing drawn case runs again by its name
#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

#include "cuda/block_attn_cuda.h"
#include "cuda/bwd_kernel.cuh"
#include "cuda/dq_kernel.cuh"
#include "cuda/fwd_kernel.cuh"
#include "cuda/sm90_bwd_kernel.cuh"
#include "cuda/sm90_dq_kernel.cuh"
#include "cuda/sm90_fwd_kernel.cuh"
#include "cuda/static_switch.h"

using namespace ring_attn;
using namespace ring_attn::cuda;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

struct Case {
  std::string name;
  bool bf16;
  int B, Sq, Sk, H, Hkv, D;
  std::string mask;
  bool head_major;   // q, k, v, dout stored as (batch, heads, seq, headdim)
  int fwd_splits;    // key blocks merged one after another by block_fwd
  double scale;
  bool sm90a;        // the Hopper kernels (sm90_*_kernel.cuh)
  bool smem99;       // launched as on a GPU that allows 99 KiB of shared memory per block
};

// The shared memory per block a smem99 case's launches may use.
constexpr int kSmem99Bytes = 99 * 1024;

// A (batch, seq, heads, headdim) operand: 16-bit storage and its exact float values.
struct Operand {
  int B, S, H, D;
  Strides st;
  std::vector<uint16_t> bits;
  std::vector<float> vals;
  int64_t at(int b, int s, int h, int d) const { return b * st.batch + s * st.row + h * st.head + d; }
};

// gap: that many rows of NaN after each (batch, head) sequence (head-major) or each batch's
// sequence (sequence-major), which no kernel may let into a result.
Operand make_operand(std::mt19937_64& rng, bool bf16, int B, int S, int H, int D, bool head_major,
                     int gap = 0) {
  Operand o{B, S, H, D, {}, {}, {}};
  const int64_t rows = S + gap;
  o.st = head_major ? Strides{int64_t(H) * rows * D, D, rows * D}
                    : Strides{rows * H * D, int64_t(H) * D, D};
  const size_t n = size_t(B) * rows * H * D;
  const uint16_t nan_bits = 0x7fff;  // NaN in bf16 and fp16
  o.bits.assign(n, nan_bits);
  o.vals.assign(n, std::numeric_limits<float>::quiet_NaN());
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int b = 0; b < B; ++b) {
    for (int s = 0; s < S; ++s) {
      for (int h = 0; h < H; ++h) {
        for (int d = 0; d < D; ++d) {
          const float x = nd(rng);
          const int64_t i = o.at(b, s, h, d);
          o.bits[i] = bf16 ? emu::float_to_bf16(x) : emu::float_to_fp16(x);
          o.vals[i] = bf16 ? emu::bf16_to_float(o.bits[i]) : emu::fp16_to_float(o.bits[i]);
        }
      }
    }
  }
  return o;
}

// The mask, q/k positions and (packed) q_seg of a named mask case; the first ones as in
// tests/test_block_kernel.py.
MaskSpec mask_positions(const std::string& mask, int sq, int sk, std::vector<int32_t>& qp,
                        std::vector<int32_t>& kp, std::vector<int32_t>& qseg,
                        std::mt19937_64& rng) {
  MaskSpec m;
  m.causal = true;
  qp.resize(sq);
  kp.resize(sk);
  qseg.clear();
  for (int i = 0; i < sq; ++i) qp[i] = i;
  for (int j = 0; j < sk; ++j) kp[j] = j;
  if (mask == "none") {
    m.causal = false;
  } else if (mask == "full") {
    for (auto& x : qp) x += sk;
  } else if (mask == "diagonal") {
  } else if (mask == "partial") {
    for (auto& x : qp) x = 2 * x + 1;
    for (auto& x : kp) x = 3 * x;
  } else if (mask == "skipped") {
    for (auto& x : kp) x += sq;
  } else if (mask == "masked_rows") {
    for (auto& x : kp) x += (sq + 1) / 2;
  } else if (mask == "random") {
    std::vector<int32_t> perm(sq + sk);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    std::copy(perm.begin(), perm.begin() + sq, qp.begin());
    std::copy(perm.begin() + sq, perm.end(), kp.begin());
  } else if (mask == "window") {  // sliding window, causal
    m.window_left = 20;
  } else if (mask == "window2") {  // two-sided window, not causal
    m.causal = false;
    m.window_left = 15;
    m.window_right = 7;
  } else if (mask == "packed") {  // sequences [0, 30), [30, 55), [55, ...); the last 3 rows pad
    const int bounds[] = {0, 30, 55, std::max(sq, sk)};
    qseg.resize(2 * sq);
    for (int i = 0; i < sq; ++i) {
      int s = 0;
      while (i >= bounds[s + 1]) ++s;
      qseg[2 * i] = bounds[s];
      qseg[2 * i + 1] = bounds[s + 1] - 1;
      if (i >= sq - 3) {
        qseg[2 * i] = 1;
        qseg[2 * i + 1] = 0;
      }
    }
  } else {
    std::fprintf(stderr, "unknown mask %s\n", mask.c_str());
    std::exit(2);
  }
  return m;
}

// Visibility written out independently of core/mask.h.
bool ref_visible(const MaskSpec& m, const std::vector<int32_t>& qseg, int i, int64_t q, int64_t k) {
  if (!qseg.empty() && (k < qseg[2 * i] || k > qseg[2 * i + 1])) return false;
  if (m.causal && k > q) return false;
  if (m.window_left >= 0 && k < q - m.window_left) return false;
  if (m.window_right >= 0 && k > q + m.window_right) return false;
  return true;
}

struct Reference {
  std::vector<double> out, lse, dq, dk, dv;  // out/dq (B,Sq,H,D), lse (B,H,Sq), dk/dv (B,Sk,Hkv,D)
};

Reference reference(const Case& c, const Operand& q, const Operand& k, const Operand& v,
                    const Operand& dout, const MaskSpec& mask, const std::vector<int32_t>& qp,
                    const std::vector<int32_t>& kp, const std::vector<int32_t>& qseg) {
  const int B = c.B, Sq = c.Sq, Sk = c.Sk, H = c.H, D = c.D, Hkv = c.Hkv, G = H / Hkv;
  Reference r;
  r.out.assign(size_t(B) * Sq * H * D, 0.0);
  r.lse.assign(size_t(B) * H * Sq, -kInf);
  r.dq.assign(size_t(B) * Sq * H * D, 0.0);
  r.dk.assign(size_t(B) * Sk * Hkv * D, 0.0);
  r.dv.assign(size_t(B) * Sk * Hkv * D, 0.0);
  std::vector<double> s(Sk), p(Sk);
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      const int hk = h / G;
      for (int i = 0; i < Sq; ++i) {
        double m = -kInf;
        for (int j = 0; j < Sk; ++j) {
          double dot = 0;
          for (int d = 0; d < D; ++d) dot += double(q.vals[q.at(b, i, h, d)]) * k.vals[k.at(b, j, hk, d)];
          s[j] = ref_visible(mask, qseg, i, qp[i], kp[j]) ? c.scale * dot : -kInf;
          m = std::max(m, s[j]);
        }
        if (m == -kInf) continue;  // out 0, lse -inf, no gradient
        double l = 0;
        for (int j = 0; j < Sk; ++j) l += std::exp(s[j] - m);
        const double lse = m + std::log(l);
        r.lse[(size_t(b) * H + h) * Sq + i] = lse;
        double* o = &r.out[((size_t(b) * Sq + i) * H + h) * D];
        for (int j = 0; j < Sk; ++j) {
          p[j] = std::exp(s[j] - lse);
          for (int d = 0; d < D; ++d) o[d] += p[j] * v.vals[v.at(b, j, hk, d)];
        }
        double delta = 0;
        for (int d = 0; d < D; ++d) delta += double(dout.vals[dout.at(b, i, h, d)]) * o[d];
        for (int j = 0; j < Sk; ++j) {
          if (p[j] == 0) continue;
          double dp = 0;
          for (int d = 0; d < D; ++d) dp += double(dout.vals[dout.at(b, i, h, d)]) * v.vals[v.at(b, j, hk, d)];
          const double ds = p[j] * (dp - delta);
          for (int d = 0; d < D; ++d) {
            r.dq[((size_t(b) * Sq + i) * H + h) * D + d] += c.scale * ds * k.vals[k.at(b, j, hk, d)];
            r.dk[((size_t(b) * Sk + j) * Hkv + hk) * D + d] += c.scale * ds * q.vals[q.at(b, i, h, d)];
            r.dv[((size_t(b) * Sk + j) * Hkv + hk) * D + d] += p[j] * dout.vals[dout.at(b, i, h, d)];
          }
        }
      }
    }
  }
  return r;
}

// The kernels block_attn_cuda.cu picks on a device that allows `allowed` bytes of shared memory per
// block (0: any): the usual ones or their kSmallSmem variant (smem_variant). Exits where neither
// fits (the bindings raise before such a launch).
bool small_smem_launch(int headdim, bool backward, bool deterministic, int allowed) {
  if (allowed == 0) return false;
  const SmemVariant variant = smem_variant(headdim, backward, deterministic, allowed);
  if (variant == SmemVariant::kNone) {
    std::fprintf(stderr, "no kernels fit %d bytes of shared memory at d%d\n", allowed, headdim);
    std::exit(2);
  }
  return variant == SmemVariant::kSmall;
}

// The forward as launch_template.cuh's run_fwd launches it: Traits and its grid.
template <typename Traits>
void launch_fwd(const FwdArgs& a) {
  const BlockShape& s = a.p.shape;
  emu::launch(cdiv(s.seqlen_q, Traits::kBlockM), s.nheads, s.batch, Traits::kNThreads,
              Traits::kSmemBytes, [&](char* smem) { block_fwd_body<Traits>(a, smem); });
}

// The forward as block_attn_cuda.cu dispatches it on a device allowing `allowed` bytes per block.
void run_fwd(const FwdArgs& a, int allowed = 0) {
  const BlockShape& s = a.p.shape;
  if (s.batch == 0 || s.seqlen_q == 0 || s.seqlen_k == 0) return;
  const bool small = small_smem_launch(s.headdim, false, false, allowed);
  DTYPE_SWITCH(a.p.dtype, kBF16, [&] {
    HEADDIM_SWITCH(s.headdim, kD, [&] {
      constexpr int kSmallBucket = small_smem_bucket(kD, false);
      if constexpr (kSmallBucket > 0) {
        if (small) return launch_fwd<FwdTraits<kBF16, kSmallBucket, true>>(a);
      }
      launch_fwd<FwdTraits<kBF16, kD>>(a);
    });
  });
}

// The tensor map of a (batch, seq, heads, headdim) operand as the Hopper launchers build it
// (sm90_fwd_geometry.h), in boxes of 64 columns x box_rows rows; exits on a layout they do not
// read.
emu::TensorMap sm90_map(const void* base, const Strides& st, int batch, int seqlen, int heads,
                        int headdim, int box_rows) {
  if (!sm90::operand_fits(st, batch, seqlen, heads, headdim)) {
    std::fprintf(stderr, "operand layout the Hopper kernels do not read\n");
    std::exit(2);
  }
  const sm90::OperandMatrix m = sm90::operand_matrix(st, batch, seqlen, heads);
  return emu::make_tensor_map_2d(base, 2, m.cols, m.rows, m.cols * 2, 64, box_rows,
                                 emu::TmaSwizzle::k128B);
}

// The tensor map of the fp32 accumulator dq_acc as the Hopper backward's launcher builds it
// (sm90_fwd_geometry.h accumulator_tensor); exits on a layout it does not map.
emu::TensorMap sm90_accumulator_map(void* base, const Strides& st, int batch, int seqlen,
                                    int heads, int headdim, int box_rows, int box_blocks) {
  if (!sm90::accumulator_mappable(base, st)) {
    std::fprintf(stderr, "accumulator layout the Hopper backward does not map\n");
    std::exit(2);
  }
  const sm90::AccumulatorTensor a =
      sm90::accumulator_tensor(st, batch, seqlen, heads, headdim, box_rows, box_blocks);
  return emu::make_tensor_map(base, 4, 5, a.dims, a.outer_strides, a.box, emu::TmaSwizzle::k128B);
}

// The Hopper forward as block_attn_cuda.cu launches it. Head dims 64, 128 and 256.
void run_fwd_sm90(const FwdArgs& a) {
  const BlockShape& s = a.p.shape;
  if (s.batch == 0 || s.seqlen_q == 0 || s.seqlen_k == 0) return;
  const BlockFwdParams& p = a.p;
  DTYPE_SWITCH(p.dtype, kBF16, [&] {
    auto launch = [&]<int kD>() {
      using Traits = sm90::FwdTraits<kBF16, kD>;
      const sm90::FwdMaps maps{
          sm90_map(p.q, p.q_strides, s.batch, s.seqlen_q, s.nheads, kD, Traits::kBlockM),
          sm90_map(p.k, p.k_strides, s.batch, s.seqlen_k, s.nheads_kv, kD, Traits::kBlockN),
          sm90_map(p.v, p.v_strides, s.batch, s.seqlen_k, s.nheads_kv, kD, Traits::kBlockN)};
      emu::launch(cdiv(s.seqlen_q, Traits::kBlockM), s.nheads, s.batch, Traits::kNThreads,
                  Traits::kSmemBytes,
                  [&](char* smem) { sm90::block_fwd_body<Traits>(a, maps, smem); });
    };
    if (s.headdim == 64) {
      launch.template operator()<64>();
    } else if (s.headdim == 128) {
      launch.template operator()<128>();
    } else if (s.headdim == 256) {
      launch.template operator()<256>();
    } else {
      std::fprintf(stderr, "the Hopper forward has head dims 64, 128 and 256\n");
      std::exit(2);
    }
  });
}

// The Hopper backward as block_attn_cuda.cu launches it (sm90_bwd.cu run_bwd): the dK/dV kernel
// (sm90_bwd_kernel.cuh) with dQ fused, or in the deterministic mode the dK/dV kernel, then the dQ
// kernel (sm90_dq_kernel.cuh). Head dims 64 and 128.
void run_bwd_sm90(const BlockBwdParams& p) {
  const BlockShape& s = p.shape;
  if (s.batch == 0 || s.seqlen_q == 0 || s.seqlen_k == 0) return;
  DTYPE_SWITCH(p.dtype, kBF16, [&] {
    auto launch = [&]<int kD>() {
      auto dkdv = [&]<bool kFusedDq>() {
        using Traits = sm90::DkdvTraits<kBF16, kD, kFusedDq>;
        const sm90::DkdvMaps maps{
            sm90_map(p.k, p.k_strides, s.batch, s.seqlen_k, s.nheads_kv, kD, Traits::kBlockN),
            sm90_map(p.v, p.v_strides, s.batch, s.seqlen_k, s.nheads_kv, kD, Traits::kBlockN),
            sm90_map(p.q, p.q_strides, s.batch, s.seqlen_q, s.nheads, kD, Traits::kBlockM),
            sm90_map(p.dout, p.dout_strides, s.batch, s.seqlen_q, s.nheads, kD,
                     Traits::kBlockM),
            kFusedDq ? sm90_accumulator_map(p.dq_acc, p.dq_strides, s.batch, s.seqlen_q,
                                            s.nheads, kD, Traits::kDqBoxRows, Traits::kDqBoxBlocks)
                     : emu::TensorMap{}};
        emu::launch(cdiv(s.seqlen_k, Traits::kBlockN), s.nheads_kv, s.batch, Traits::kNThreads,
                    Traits::kSmemBytes,
                    [&](char* smem) { sm90::block_dkdv_body<Traits>(p, maps, smem); });
        return maps;
      };
      if (!p.deterministic) {
        dkdv.template operator()<true>();
        return;
      }
      const sm90::DkdvMaps maps = dkdv.template operator()<false>();
      using DqKernelTraits = sm90::DqTraits<kBF16, kD>;
      const sm90::DqMaps dq_maps{
          sm90_map(p.q, p.q_strides, s.batch, s.seqlen_q, s.nheads, kD, DqKernelTraits::kBlockM),
          sm90_map(p.dout, p.dout_strides, s.batch, s.seqlen_q, s.nheads, kD,
                   DqKernelTraits::kBlockM),
          maps.k, maps.v};
      emu::launch(cdiv(s.seqlen_q, DqKernelTraits::kBlockM), s.nheads, s.batch,
                  DqKernelTraits::kNThreads, DqKernelTraits::kSmemBytes,
                  [&](char* smem) { sm90::block_dq_body<DqKernelTraits>(p, dq_maps, smem); });
    };
    if (s.headdim == 64) {
      launch.template operator()<64>();
    } else if (s.headdim == 128) {
      launch.template operator()<128>();
    } else {
      std::fprintf(stderr, "the Hopper backward has head dims 64 and 128\n");
      std::exit(2);
    }
  });
}

// The grids of launch_template.cuh's run_bwd, for the traits of (kBF16, kD, kSmall).
template <bool kBF16, int kD, bool kSmall>
void launch_bwd(const BlockBwdParams& p) {
  const BlockShape& s = p.shape;
  using Traits = BwdTraits<kBF16, kD, kSmall>;
  emu::launch(cdiv(s.seqlen_k, Traits::kBlockN), p.deterministic ? s.nheads_kv : s.nheads, s.batch,
              Traits::kNThreads, Traits::kSmemBytes, [&](char* smem) {
                if (p.deterministic) {
                  block_bwd_body<Traits, true>(p, smem);
                } else {
                  block_bwd_body<Traits, false>(p, smem);
                }
              });
  if (!p.deterministic) return;
  using DqKernelTraits = DqTraits<kBF16, kD, kSmall>;
  emu::launch(cdiv(s.seqlen_q, DqKernelTraits::kBlockM), s.nheads, s.batch,
              DqKernelTraits::kNThreads, DqKernelTraits::kSmemBytes,
              [&](char* smem) { block_dq_body<DqKernelTraits>(p, smem); });
}

// The backward as block_attn_cuda.cu dispatches it on a device allowing `allowed` bytes per block.
void run_bwd(const BlockBwdParams& p, int allowed = 0) {
  const BlockShape& s = p.shape;
  if (s.batch == 0 || s.seqlen_q == 0 || s.seqlen_k == 0) return;
  const bool small = small_smem_launch(s.headdim, true, p.deterministic, allowed);
  DTYPE_SWITCH(p.dtype, kBF16, [&] {
    HEADDIM_SWITCH(s.headdim, kD, [&] {
      constexpr int kSmallBucket = small_smem_bucket(kD, true);
      if constexpr (kSmallBucket > 0) {
        if (small) return launch_bwd<kBF16, kSmallBucket, true>(p);
      }
      launch_bwd<kBF16, kD, false>(p);
    });
  });
}

// max |got - want| / max(1, max |want|) over finite want; inf entries must match exactly.
double max_err(const std::vector<float>& got, const std::vector<double>& want, bool* ok) {
  double scale = 1, err = 0;
  for (double w : want) {
    if (std::isfinite(w)) scale = std::max(scale, std::abs(w));
  }
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::isnan(got[i])) {
      *ok = false;
      return kInf;
    }
    if (!std::isfinite(want[i])) {
      if (double(got[i]) != want[i]) *ok = false;
      continue;
    }
    err = std::max(err, std::abs(double(got[i]) - want[i]));
  }
  return err / scale;
}

// The emulated device's shared memory per block for one case (emu::max_dynamic_smem), any again
// once the case ends.
struct EmulatedSmemLimit {
  explicit EmulatedSmemLimit(size_t bytes) { emu::max_dynamic_smem = bytes; }
  ~EmulatedSmemLimit() { emu::max_dynamic_smem = 0; }
};

bool run_case(const Case& c) {
  std::mt19937_64 rng(std::hash<std::string>{}(c.name));
  const EmulatedSmemLimit smem_limit(c.smem99 ? kSmem99Bytes : 0);
  const int B = c.B, Sq = c.Sq, Sk = c.Sk, H = c.H, Hkv = c.Hkv, D = c.D;
  // The Hopper kernels' TMA boxes reach past a sequence into the rows that follow it: NaN there.
  const int gap = c.sm90a ? 5 : 0;
  Operand q = make_operand(rng, c.bf16, B, Sq, H, D, c.head_major, gap);
  Operand k = make_operand(rng, c.bf16, B, Sk, Hkv, D, c.head_major, gap);
  Operand v = make_operand(rng, c.bf16, B, Sk, Hkv, D, c.head_major, gap);
  Operand dout = make_operand(rng, c.bf16, B, Sq, H, D, c.head_major, gap);
  std::vector<int32_t> qp, kp, qseg;
  const MaskSpec mask = mask_positions(c.mask, Sq, Sk, qp, kp, qseg, rng);
  const Reference ref = reference(c, q, k, v, dout, mask, qp, kp, qseg);
  const int32_t* q_seg = qseg.empty() ? nullptr : qseg.data();

  // Forward over c.fwd_splits key blocks into one running state; an invisible block (positions
  // beyond every query, for causal masks) is merged first and last and must change nothing.
  std::vector<float> out(size_t(B) * Sq * H * D, 0.f);
  std::vector<float> lse(size_t(B) * H * Sq, -std::numeric_limits<float>::infinity());
  const Strides out_st{int64_t(Sq) * H * D, int64_t(H) * D, D};
  auto fwd_block = [&](int lo, int hi, const int32_t* kpos, bool merge = true) {
    FwdArgs a{};
    BlockFwdParams& p = a.p;
    p.shape = BlockShape{B, Sq, hi - lo, H, Hkv, D};
    p.dtype = c.bf16 ? DType::kBFloat16 : DType::kFloat16;
    p.q = q.bits.data();
    p.k = k.bits.data() + lo * k.st.row;
    p.v = v.bits.data() + lo * v.st.row;
    p.q_strides = q.st;
    p.k_strides = k.st;
    p.v_strides = v.st;
    p.q_pos = qp.data();
    p.k_pos = kpos;
    p.q_seg = q_seg;
    p.mask = mask;
    p.softmax_scale = c.scale;
    p.out_acc = out.data();
    p.out_strides = out_st;
    p.lse = lse.data();
    p.lse_batch_stride = int64_t(H) * Sq;
    p.lse_head_stride = Sq;
    a.merge = merge;
    if (c.sm90a) {
      run_fwd_sm90(a);
    } else {
      run_fwd(a, c.smem99 ? kSmem99Bytes : 0);
    }
  };
  std::vector<int32_t> far_kp(Sk, std::numeric_limits<int32_t>::max() / 2);
  if (mask.causal) fwd_block(0, Sk, far_kp.data());
  for (int s = 0; s < c.fwd_splits; ++s) {
    const int lo = int(int64_t(Sk) * s / c.fwd_splits), hi = int(int64_t(Sk) * (s + 1) / c.fwd_splits);
    fwd_block(lo, hi, kp.data() + lo);
  }
  if (mask.causal) fwd_block(0, Sk, far_kp.data());

  bool ok = true;
  if (c.fwd_splits == 1) {
    // merge = false ignores whatever state is there: the same result as from the empty state.
    const std::vector<float> out1 = out, lse1 = lse;
    std::normal_distribution<float> junk(0.f, 1.f);
    for (auto& x : out) x = junk(rng);
    for (auto& x : lse) x = junk(rng);
    fwd_block(0, Sk, kp.data(), /*merge=*/false);
    for (size_t i = 0; i < out.size(); ++i) ok = ok && out[i] == out1[i];
    for (size_t i = 0; i < lse.size(); ++i) ok = ok && lse[i] == lse1[i];
    out = out1;
    lse = lse1;
  }
  const double e_out = max_err(out, ref.out, &ok);
  const double e_lse = max_err(lse, ref.lse, &ok);
  // Rows that saw nothing: exactly out 0 and lse -inf (checked by max_err for lse; out here).
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < Sq; ++i)
        if (std::isinf(ref.lse[(size_t(b) * H + h) * Sq + i]))
          for (int d = 0; d < D; ++d)
            if (out[((size_t(b) * Sq + i) * H + h) * D + d] != 0.f) ok = false;

  const double tol_out = c.bf16 ? 2e-2 : 4e-3, tol_lse = 1e-3;

  // Backward with the kernel's own out and lse, into accumulators that already hold values.
  std::vector<float> delta(size_t(B) * H * Sq, 0.f);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < Sq; ++i) {
        double s = 0;
        for (int d = 0; d < D; ++d)
          s += double(dout.vals[dout.at(b, i, h, d)]) * out[((size_t(b) * Sq + i) * H + h) * D + d];
        delta[(size_t(b) * H + h) * Sq + i] = float(s);
      }
  std::normal_distribution<float> nd(0.f, 1.f);
  auto init = [&](size_t n) {
    std::vector<float> x(n);
    for (auto& e : x) e = nd(rng);
    return x;
  };
  const std::vector<float> dq0 = init(size_t(B) * Sq * H * D), dk0 = init(size_t(B) * Sk * Hkv * D),
                           dv0 = init(size_t(B) * Sk * Hkv * D);
  std::vector<float> dq, dk, dv;
  BlockBwdParams p{};
  p.shape = BlockShape{B, Sq, Sk, H, Hkv, D};
  p.dtype = c.bf16 ? DType::kBFloat16 : DType::kFloat16;
  p.q = q.bits.data();
  p.k = k.bits.data();
  p.v = v.bits.data();
  p.dout = dout.bits.data();
  p.q_strides = q.st;
  p.k_strides = k.st;
  p.v_strides = v.st;
  p.dout_strides = dout.st;
  p.q_pos = qp.data();
  p.k_pos = kp.data();
  p.q_seg = q_seg;
  p.mask = mask;
  p.softmax_scale = c.scale;
  p.lse = lse.data();
  p.delta = delta.data();
  p.row_stat_batch_stride = int64_t(H) * Sq;
  p.row_stat_head_stride = Sq;
  p.dq_strides = out_st;
  p.dk_strides = Strides{int64_t(Sk) * Hkv * D, int64_t(Hkv) * D, D};
  p.dv_strides = p.dk_strides;
  // Both backward modes; the deterministic one must not use a single reduction, and run again
  // from the same accumulators it must give the same bits. The Hopper backward (d = 64 and 128;
  // at d = 256 the dispatch runs mma.sync) adds dQ by TMA reductions in the other mode.
  const bool hopper_bwd = c.sm90a && D != 256;
  const bool dq_nonzero =
      std::any_of(ref.dq.begin(), ref.dq.end(), [](double v) { return v != 0.0; });
  double e_dq = 0, e_dk = 0, e_dv = 0;
  for (bool deterministic : {false, true}) {
    dq = dq0, dk = dk0, dv = dv0;
    p.dq_acc = dq.data();
    p.dk_acc = dk.data();
    p.dv_acc = dv.data();
    p.deterministic = deterministic;
    const int64_t atomics_before = emu::atomic_adds.load();
    const auto bwd = [&](const BlockBwdParams& params) {
      if (hopper_bwd) {
        run_bwd_sm90(params);
      } else {
        run_bwd(params, c.smem99 ? kSmem99Bytes : 0);
      }
    };
    bwd(p);
    if (deterministic && emu::atomic_adds.load() != atomics_before) {
      std::printf("%s deterministic backward used %lld atomics\n", hopper_bwd ? "Hopper" : "the",
                  static_cast<long long>(emu::atomic_adds.load() - atomics_before));
      ok = false;
    }
    if (hopper_bwd && !deterministic && dq_nonzero && emu::atomic_adds.load() == atomics_before) {
      std::printf("Hopper backward: dQ added without a TMA reduction\n");
      ok = false;
    }
    if (deterministic) {
      std::vector<float> dq2 = dq0, dk2 = dk0, dv2 = dv0;
      BlockBwdParams again = p;
      again.dq_acc = dq2.data();
      again.dk_acc = dk2.data();
      again.dv_acc = dv2.data();
      bwd(again);
      if (dq2 != dq || dk2 != dk || dv2 != dv) {
        std::printf("deterministic backward: a second run gave other bits\n");
        ok = false;
      }
    }
    for (size_t i = 0; i < dq.size(); ++i) dq[i] -= dq0[i];
    for (size_t i = 0; i < dk.size(); ++i) dk[i] -= dk0[i];
    for (size_t i = 0; i < dv.size(); ++i) dv[i] -= dv0[i];
    e_dq = std::max(e_dq, max_err(dq, ref.dq, &ok));
    e_dk = std::max(e_dk, max_err(dk, ref.dk, &ok));
    e_dv = std::max(e_dv, max_err(dv, ref.dv, &ok));
  }

  // P and dS are rounded to 16 bits before their GEMMs (as in FlashAttention): relative errors of
  // a few 2^-8 (bf16) or 2^-11 (fp16); a wrong index or mask gives O(0.1..1).
  const double tol_grad = c.bf16 ? 4e-2 : 8e-3;
  ok = ok && e_out <= tol_out && e_lse <= tol_lse && e_dq <= tol_grad && e_dk <= tol_grad &&
       e_dv <= tol_grad;
  std::printf("%-4s %-44s out %.1e lse %.1e dq %.1e dk %.1e dv %.1e\n", ok ? "ok" : "FAIL",
              c.name.c_str(), e_out, e_lse, e_dq, e_dk, e_dv);
  return ok;
}

// A NaN in one element of query row kRow (batch 0, head 0), causal, GQA: that row's out, lse and
// dq are NaN, as in the softmax (not an empty row's 0 and -inf, which would drop it from the
// gradients), in both backward modes; every other row's (the K/V group's other head included)
// stay finite.
bool run_nan_case(const std::string& name, bool sm90a) {
  constexpr int B = 1, S = 97, H = 2, Hkv = 1, D = 64, kRow = 5;
  std::mt19937_64 rng(std::hash<std::string>{}(name));
  const int gap = sm90a ? 5 : 0;
  Operand q = make_operand(rng, true, B, S, H, D, false, gap);
  Operand k = make_operand(rng, true, B, S, Hkv, D, false, gap);
  Operand v = make_operand(rng, true, B, S, Hkv, D, false, gap);
  Operand dout = make_operand(rng, true, B, S, H, D, false, gap);
  q.bits[q.at(0, kRow, 0, 3)] = 0x7fff;  // NaN in bf16
  std::vector<int32_t> pos(S);
  std::iota(pos.begin(), pos.end(), 0);
  MaskSpec mask;
  mask.causal = true;
  const Strides acc_st{int64_t(S) * H * D, int64_t(H) * D, D};
  std::vector<float> out(size_t(B) * S * H * D, 0.f);
  std::vector<float> lse(size_t(B) * H * S, -std::numeric_limits<float>::infinity());
  FwdArgs a{};
  a.p.shape = BlockShape{B, S, S, H, Hkv, D};
  a.p.dtype = DType::kBFloat16;
  a.p.q = q.bits.data();
  a.p.k = k.bits.data();
  a.p.v = v.bits.data();
  a.p.q_strides = q.st;
  a.p.k_strides = k.st;
  a.p.v_strides = v.st;
  a.p.q_pos = pos.data();
  a.p.k_pos = pos.data();
  a.p.mask = mask;
  a.p.softmax_scale = 1.0 / std::sqrt(D);
  a.p.out_acc = out.data();
  a.p.out_strides = acc_st;
  a.p.lse = lse.data();
  a.p.lse_batch_stride = int64_t(H) * S;
  a.p.lse_head_stride = S;
  a.merge = true;
  if (sm90a) {
    run_fwd_sm90(a);
  } else {
    run_fwd(a);
  }
  auto row_has_nan = [&](const std::vector<float>& x, int i, int h) {
    for (int d = 0; d < D; ++d)
      if (std::isnan(x[(size_t(i) * H + h) * D + d])) return true;
    return false;
  };
  bool ok = true;
  std::vector<float> delta(size_t(B) * H * S);
  for (int h = 0; h < H; ++h) {
    for (int i = 0; i < S; ++i) {
      const bool nan_row = h == 0 && i == kRow;
      ok = ok && std::isnan(lse[size_t(h) * S + i]) == nan_row && row_has_nan(out, i, h) == nan_row;
      float sum = 0.f;
      for (int d = 0; d < D; ++d)
        sum += dout.vals[dout.at(0, i, h, d)] * out[(size_t(i) * H + h) * D + d];
      delta[size_t(h) * S + i] = sum;
    }
  }
  BlockBwdParams p{};
  static_cast<BlockParams&>(p) = a.p;
  p.dout = dout.bits.data();
  p.dout_strides = dout.st;
  p.lse = lse.data();
  p.delta = delta.data();
  p.row_stat_batch_stride = a.p.lse_batch_stride;
  p.row_stat_head_stride = a.p.lse_head_stride;
  p.dq_strides = acc_st;
  p.dk_strides = Strides{int64_t(S) * Hkv * D, int64_t(Hkv) * D, D};
  p.dv_strides = p.dk_strides;
  for (bool deterministic : {false, true}) {
    std::vector<float> dq(out.size(), 0.f), dk(size_t(B) * S * Hkv * D, 0.f), dv(dk.size(), 0.f);
    p.dq_acc = dq.data();
    p.dk_acc = dk.data();
    p.dv_acc = dv.data();
    p.deterministic = deterministic;
    if (sm90a) {
      run_bwd_sm90(p);
    } else {
      run_bwd(p);
    }
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < S; ++i) ok = ok && row_has_nan(dq, i, h) == (h == 0 && i == kRow);
  }
  std::printf("%-4s %s\n", ok ? "ok" : "FAIL", name.c_str());
  return ok;
}

// The compiled head-dim bucket of a head dim (static_switch.h) and the kind of a named mask.
int headdim_bucket(int d) {
  int bucket = 0;
  HEADDIM_SWITCH(d, kD, [&] { bucket = kD; });
  return bucket;
}

std::string mask_kind(const std::string& mask) {
  if (mask == "window" || mask == "window2") return "window";
  if (mask == "packed") return "packed";
  return mask == "none" ? "none" : "causal";
}

// --random's default seed and cost bound (case_cost).
constexpr uint64_t kDefaultSeed = 1;
constexpr double kDefaultMaxCost = 16;

// This program's name and the case running now, which a signal that ends the process names
// (async-signal-safe: fixed buffers and write).
char g_program[64] = "test_cuda_emu";
char g_running[256];

void report_case_and_die(int sig) {
  if (g_running[0] != '\0') {
    static const char kPrefix[] = "\ncase stopped by a signal: ";
    ssize_t rc = write(STDERR_FILENO, kPrefix, sizeof kPrefix - 1);
    rc = write(STDERR_FILENO, g_program, std::strlen(g_program));
    rc = write(STDERR_FILENO, " --case \"", 9);
    rc = write(STDERR_FILENO, g_running, std::strlen(g_running));
    rc = write(STDERR_FILENO, "\"\n", 2);
    (void)rc;
  }
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

// Every mask name of mask_positions.
const char* const kMaskNames[] = {"none",        "full",   "diagonal", "partial", "skipped",
                                  "masked_rows", "random", "window",   "window2", "packed"};

// A case and its name: "[sm90a |smem99 ]bf16|fp16 bB sqSq skSk hH/Hkv dD mask[ head-major]
// [ splitN][ scale X]" (scale NaN: the default 1/sqrt(D), not named). The name seeds the case's
// data (run_case), so a name is the whole case: parse_case reads one back.
Case make_case(bool bf16, int B, int Sq, int Sk, int H, int Hkv, int D, const std::string& mask,
               bool head_major, int splits, double scale, bool sm90a, bool smem99 = false) {
  const bool default_scale = std::isnan(scale);
  Case c{"", bf16, B, Sq, Sk, H, Hkv, D, mask, head_major, splits,
         default_scale ? 1.0 / std::sqrt(D) : scale, sm90a, smem99};
  c.name = std::string(sm90a ? "sm90a " : smem99 ? "smem99 " : "") + (bf16 ? "bf16" : "fp16") +
           " b" + std::to_string(B) +
           " sq" + std::to_string(Sq) + " sk" + std::to_string(Sk) + " h" + std::to_string(H) + "/" +
           std::to_string(Hkv) + " d" + std::to_string(D) + " " + mask +
           (head_major ? " head-major" : "") + (splits > 1 ? " split" + std::to_string(splits) : "") +
           (default_scale ? "" : " scale " + std::to_string(scale));
  return c;
}

// The case a name of make_case describes; false (with a message) for anything else, or for a case
// the kernels do not run (head dims, heads, the Hopper kernels' head dims).
bool parse_case(const std::string& name, Case* out) {
  std::vector<std::string> tok;
  for (size_t i = 0; i < name.size();) {
    const size_t j = std::min(name.find(' ', i), name.size());
    if (j > i) tok.push_back(name.substr(i, j - i));
    i = j + 1;
  }
  size_t t = 0;
  auto next = [&]() -> const std::string& {
    static const std::string none;
    return t < tok.size() ? tok[t++] : none;
  };
  auto number = [](const std::string& s, const char* prefix, int* v) {
    const size_t n = std::strlen(prefix);
    if (s.compare(0, n, prefix) != 0 || s.size() == n) return false;
    char* end = nullptr;
    const long x = std::strtol(s.c_str() + n, &end, 10);
    if (*end != '\0' || x < 0 || x > 1 << 20) return false;
    *v = int(x);
    return true;
  };
  auto bad = [&](const char* why) {
    std::fprintf(stderr, "case \"%s\": %s\n", name.c_str(), why);
    return false;
  };
  const bool sm90a = t < tok.size() && tok[t] == "sm90a";
  if (sm90a) ++t;
  const bool smem99 = !sm90a && t < tok.size() && tok[t] == "smem99";
  if (smem99) ++t;
  const std::string dtype = next();
  if (dtype != "bf16" && dtype != "fp16") return bad("no dtype (bf16 or fp16)");
  int B = 0, Sq = 0, Sk = 0, H = 0, Hkv = 0, D = 0, splits = 1;
  if (!number(next(), "b", &B) || !number(next(), "sq", &Sq) || !number(next(), "sk", &Sk)) {
    return bad("no bB sqN skN");
  }
  const std::string heads = next();
  const size_t slash = heads.find('/');
  if (slash == std::string::npos || !number(heads.substr(0, slash), "h", &H) ||
      !number("h" + heads.substr(slash + 1), "h", &Hkv)) {
    return bad("no hH/Hkv");
  }
  if (!number(next(), "d", &D)) return bad("no dD");
  const std::string mask = next();
  if (std::find(std::begin(kMaskNames), std::end(kMaskNames), mask) == std::end(kMaskNames)) {
    return bad("unknown mask");
  }
  bool head_major = false;
  double scale = std::numeric_limits<double>::quiet_NaN();
  if (t < tok.size() && tok[t] == "head-major") head_major = true, ++t;
  if (t < tok.size() && tok[t].compare(0, 5, "split") == 0) {
    if (!number(next(), "split", &splits) || splits < 2) return bad("bad splitN");
  }
  if (t < tok.size() && tok[t] == "scale") {
    ++t;
    const std::string& x = next();
    char* end = nullptr;
    scale = std::strtod(x.c_str(), &end);
    if (x.empty() || *end != '\0' || !std::isfinite(scale)) return bad("bad scale");
  }
  if (t != tok.size()) return bad("unexpected words at the end");
  if (B < 1 || Sq < 1 || Sk < 1 || H < 1 || Hkv < 1 || H % Hkv != 0 || splits > Sk) {
    return bad("sizes out of range (Hkv must divide H, splits at most Sk)");
  }
  if (D < 8 || D > 256 || D % 8 != 0) return bad("head dims are multiples of 8 up to 256");
  if (sm90a && D != 64 && D != 128 && D != 256) return bad("sm90a head dims are 64, 128 and 256");
  *out = make_case(dtype == "bf16", B, Sq, Sk, H, Hkv, D, mask, head_major, splits, scale, sm90a,
                   smem99);
  if (out->name != name) return bad("not the canonical name (extra spaces? scale digits?)");
  return true;
}

// The emulator's work for a case, in 64 x 64 x 64 tile products (query and key lengths in tiles of
// 64, the head dim as its bucket) plus one per tile of each (a CTA's fixed work: its threads, the
// barriers of its prologue and epilogue), for each (batch, head); a third of that for the Hopper
// kernels (one wgmma per warpgroup where the mma.sync kernels run many warp collectives). What
// --random caps: a unit is about 0.2-0.4 s of CPU time.
double case_cost(const Case& c) {
  const double tq = (c.Sq + 63) / 64, tk = (c.Sk + 63) / 64;
  const double cost = double(c.B) * c.H * (tq * tk * headdim_bucket(c.D) / 64 + tq + tk);
  return c.sm90a ? cost / 3 : cost;
}

// A case drawn from the space the table samples: both dtypes, the Hopper kernels or not (or the
// launches of a 99 KiB GPU), batch 1-2,
// lengths 1..~300 biased to the tiles' boundaries (the Hopper ones longer: their key tiles are
// up to 256 long), GQA and MQA, every head-dim bucket and padded head dims (the Hopper kernels'
// 64, 128 and 256), every mask, head-major strides, merges over 1-3 key blocks, the default scale
// or one in [-0.5, 0.5] (0 and negative ones included, in steps of 0.001 so the name holds it
// exactly). Drawn again until its cost is at most max_cost. The sm_80 build (RA_EMU_SM80: kSm90
// false) draws no Hopper cases, which are built for sm_90a only.
Case random_case(std::mt19937_64& rng, double max_cost) {
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  auto chance = [&](double p) { return std::bernoulli_distribution(p)(rng); };
  auto pick = [&](std::initializer_list<int> xs) { return xs.begin()[uniform(0, int(xs.size()) - 1)]; };
  for (int tries = 0;; ++tries) {
    if (tries == 100000) {
      std::fprintf(stderr, "no case costs at most %g (case_cost)\n", max_cost);
      std::exit(2);
    }
    const bool sm90a = kSm90 && chance(0.4);
    const bool bf16 = chance(0.5);
    const int B = chance(0.8) ? 1 : 2;
    auto length = [&] {
      if (chance(0.5)) {
        return sm90a && chance(0.3)
                   ? pick({383, 384, 385, 511, 512, 513})
                   : pick({1, 2, 31, 32, 33, 63, 64, 65, 95, 96, 97, 127, 128, 129, 191, 192, 193,
                           255, 256, 257});
      }
      return uniform(1, 300);
    };
    const int Sq = length(), Sk = length();
    const int H = pick({1, 1, 2, 2, 3, 4, 4, 6, 8});
    std::vector<int> divisors;
    for (int g = 1; g <= H; ++g)
      if (H % g == 0) divisors.push_back(g);
    const int Hkv = divisors[uniform(0, int(divisors.size()) - 1)];
    const int D = sm90a ? pick({64, 128, 256})
                        : chance(0.6) ? pick({32, 64, 96, 128, 256}) : 8 * uniform(1, 32);
    const std::string mask = kMaskNames[uniform(0, int(std::size(kMaskNames)) - 1)];
    const bool head_major = chance(0.25);
    const int splits = std::min(Sk, chance(0.6) ? 1 : uniform(2, 3));
    const double scale = chance(0.7)   ? std::numeric_limits<double>::quiet_NaN()
                         : chance(0.1) ? 0.0
                                       : uniform(-500, 500) / 1000.0;
    const bool smem99 = !sm90a && chance(0.25);
    const Case c =
        make_case(bf16, B, Sq, Sk, H, Hkv, D, mask, head_major, splits, scale, sm90a, smem99);
    if (case_cost(c) <= max_cost) return c;
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> filters, named;
  long random_count = -1;
  uint64_t seed = kDefaultSeed;
  double max_cost = kDefaultMaxCost;
  const char* slash = std::strrchr(argv[0], '/');
  std::snprintf(g_program, sizeof g_program, "%s", slash ? slash + 1 : argv[0]);
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg != "--random" && arg != "--seed" && arg != "--max-cost" && arg != "--case") {
      filters.push_back(arg);
      continue;
    }
    if (i + 1 == argc) {
      std::fprintf(stderr, "%s needs a value\n", arg.c_str());
      return 2;
    }
    const char* value = argv[++i];
    char* end = nullptr;
    if (arg == "--case") {
      named.push_back(value);
      continue;
    } else if (arg == "--random") {
      random_count = std::strtol(value, &end, 10);
    } else if (arg == "--seed") {
      seed = std::strtoull(value, &end, 10);
    } else {
      max_cost = std::strtod(value, &end);
    }
    if (*end != '\0' || random_count < -1 || !(max_cost > 0)) {
      std::fprintf(stderr, "bad value %s for %s\n", value, arg.c_str());
      return 2;
    }
  }
  std::vector<Case> cases;
  auto add = [&](bool bf16, int B, int Sq, int Sk, int H, int Hkv, int D, const char* mask,
                 bool head_major = false, int splits = 1,
                 double scale = std::numeric_limits<double>::quiet_NaN(), bool sm90a = false,
                 bool smem99 = false) {
    cases.push_back(
        make_case(bf16, B, Sq, Sk, H, Hkv, D, mask, head_major, splits, scale, sm90a, smem99));
  };
  // Every mask kind, tails on both sides (70 = 64 + 6 query rows, 100 keys), GQA.
  for (const char* mask : {"none", "full", "diagonal", "partial", "skipped", "masked_rows", "random"}) {
    add(true, 1, 70, 100, 2, 1, 64, mask);
  }
  add(false, 1, 70, 100, 2, 1, 64, "partial");
  // Head-dim buckets 32, 96, 128, 256 and padded head dims (40 -> 64, 200 -> 256), both dtypes.
  add(true, 1, 33, 65, 2, 2, 32, "diagonal");
  add(false, 1, 65, 33, 2, 2, 96, "random");
  add(false, 2, 40, 72, 2, 1, 128, "masked_rows");
  add(true, 1, 17, 130, 3, 1, 128, "partial");
  add(true, 1, 50, 40, 2, 2, 40, "none");
  add(true, 1, 70, 100, 2, 1, 256, "partial");
  add(false, 1, 97, 97, 2, 2, 256, "window");
  add(true, 1, 40, 70, 2, 1, 200, "packed");
  // Lengths 1, 7, 97 at d = 128, several tiles and stages per CTA (200 query rows: 4 backward
  // stages; 300 keys: 3 tiles of 128), GQA and MQA.
  add(true, 1, 7, 97, 4, 2, 128, "diagonal");
  add(false, 1, 97, 7, 4, 1, 128, "none");
  add(true, 1, 1, 97, 2, 2, 128, "window2");
  add(false, 1, 200, 300, 4, 2, 128, "diagonal");
  add(true, 1, 200, 300, 2, 1, 64, "window");
  add(true, 1, 150, 97, 2, 1, 128, "packed");
  // Sliding windows (one- and two-sided) and packed sequences with pad rows.
  add(true, 1, 130, 130, 2, 1, 64, "window");
  add(false, 1, 70, 100, 2, 2, 32, "window2");
  add(true, 1, 70, 100, 2, 1, 64, "packed");
  add(false, 1, 100, 70, 2, 2, 128, "packed", false, 2);
  add(false, 1, 70, 100, 2, 1, 64, "window");
  add(false, 1, 70, 100, 2, 2, 64, "packed");
  add(false, 1, 97, 130, 2, 1, 128, "window2");
  add(true, 1, 70, 100, 2, 2, 256, "window2");
  add(false, 1, 70, 100, 2, 1, 256, "packed");
  // Single rows/keys, head-major strides, a merge over three key blocks and MQA.
  add(true, 1, 1, 1, 1, 1, 64, "none");
  add(true, 1, 1, 129, 2, 1, 64, "diagonal");
  add(true, 2, 45, 90, 4, 2, 64, "random", /*head_major=*/true);
  add(true, 1, 96, 150, 2, 1, 64, "partial", false, /*splits=*/3, 0.3);
  add(false, 1, 64, 64, 4, 1, 128, "diagonal", false, 2);
  add(false, 1, 70, 90, 2, 1, 256, "diagonal", false, 2);
  // Scales that the forward cannot fold into its exponential (max(c s) != c max(s) for c <= 0).
  add(true, 1, 70, 100, 2, 1, 64, "partial", false, 2, -0.2);
  add(false, 1, 33, 65, 2, 2, 32, "none", false, 1, 0.0);

  // The Hopper kernels (both dtypes; the forward at d = 64, 128 and 256, the backward at 64 and
  // 128): lengths 1, 7, 97; several query tiles (128 rows forward, 64 backward) and key tiles
  // (forward: 256 keys at d = 64, 128 at d = 128, 64 at d = 256; backward: 128) with tails, so that
  // each of the two stages is reused (backward: by the query heads of a GQA group in turn too); GQA
  // and MQA; causal, windows, packed sequences with pad rows, all keys invisible; head-major
  // strides; merges over several key blocks; a scale that cannot be folded into the exponential.
  // Rows of NaN follow every sequence (make_operand's gap). A case table like the one above: one
  // line a case, so the two lists share their shape.
  auto add_sm90a = [&](bool bf16, int B, int Sq, int Sk, int H, int Hkv, int D, const char* mask,
                       bool head_major = false, int splits = 1,
                       double scale = std::numeric_limits<double>::quiet_NaN()) {
    add(bf16, B, Sq, Sk, H, Hkv, D, mask, head_major, splits, scale, /*sm90a=*/true);
  };
  add_sm90a(true, 1, 1, 97, 2, 2, 128, "window2");
  add_sm90a(false, 1, 1, 1, 1, 1, 64, "none");
  add_sm90a(false, 1, 7, 97, 4, 2, 64, "diagonal");
  add_sm90a(true, 1, 97, 7, 4, 1, 128, "none");
  add_sm90a(false, 1, 200, 600, 4, 2, 128, "diagonal");
  add_sm90a(true, 1, 200, 300, 2, 1, 64, "window");
  add_sm90a(false, 1, 200, 300, 2, 2, 64, "window");
  add_sm90a(true, 1, 150, 97, 2, 1, 128, "packed");
  add_sm90a(false, 1, 70, 100, 2, 2, 64, "packed");
  add_sm90a(true, 1, 70, 100, 2, 1, 64, "packed");
  add_sm90a(false, 1, 150, 130, 2, 1, 128, "packed");
  add_sm90a(false, 1, 97, 300, 2, 1, 128, "window2");
  add_sm90a(true, 1, 130, 260, 2, 1, 128, "window");
  add_sm90a(true, 1, 70, 260, 2, 1, 128, "masked_rows");
  add_sm90a(true, 1, 70, 100, 2, 1, 64, "skipped");
  add_sm90a(true, 2, 45, 290, 4, 2, 64, "random", /*head_major=*/true);
  add_sm90a(false, 2, 100, 200, 2, 1, 128, "window");
  add_sm90a(true, 1, 96, 400, 2, 1, 64, "partial", false, /*splits=*/3, 0.3);
  add_sm90a(false, 1, 64, 300, 4, 1, 128, "diagonal", false, 2);
  add_sm90a(true, 1, 70, 260, 2, 1, 128, "partial", false, 2, -0.2);
  add_sm90a(true, 1, 130, 600, 2, 1, 64, "none");
  // A row of negative lse (a negative scale, few keys seen) and a tail key tile, fp16: the keys
  // beyond Sk must add nothing to dQ (exp(-lse) there overflows dS in 16 bits).
  add_sm90a(false, 1, 63, 36, 2, 1, 128, "random", true, 1, -0.44);
  // d = 256 (key tiles of 64): three key tiles with a tail, two query tiles, GQA and MQA, a merge.
  add_sm90a(true, 1, 70, 150, 4, 2, 256, "diagonal");
  add_sm90a(false, 1, 97, 130, 2, 1, 256, "diagonal", false, 2);
  add_sm90a(true, 1, 33, 200, 2, 1, 256, "window");
  add_sm90a(false, 1, 45, 100, 4, 2, 256, "window2");
  add_sm90a(true, 1, 60, 90, 2, 1, 256, "packed");
  add_sm90a(false, 1, 150, 97, 2, 1, 256, "packed");

  // The launches of a GPU that allows 99 KiB of shared memory per block: the kSmallSmem forward
  // (64-row query tiles) at d = 128 and 256 (there with 16-key tiles), the kSmallSmem backward (64
  // keys per CTA, Q single buffered, dQ from registers; the deterministic dQ kernel with 32-key
  // tiles) at d = 64 and 128, at d = 256 with 4 warps, 32 keys per CTA and 32-row query stages
  // (the dQ kernel: 2 warps, 16-key tiles), and at d = 96 and padded head dims up to 128 the
  // backward of d = 128's; lengths 1, 7, 97 and several tiles with tails, GQA and MQA, every mask
  // kind, head-major strides, merges, a scale that cannot be folded into the exponential.
  auto add_smem99 = [&](bool bf16, int B, int Sq, int Sk, int H, int Hkv, int D, const char* mask,
                        bool head_major = false, int splits = 1,
                        double scale = std::numeric_limits<double>::quiet_NaN()) {
    add(bf16, B, Sq, Sk, H, Hkv, D, mask, head_major, splits, scale, false, /*smem99=*/true);
  };
  add_smem99(true, 1, 200, 300, 4, 2, 128, "diagonal");
  add_smem99(false, 1, 97, 130, 2, 1, 128, "window");
  add_smem99(true, 1, 150, 97, 2, 1, 128, "packed");
  add_smem99(false, 1, 7, 97, 4, 1, 128, "diagonal", true, 2);
  add_smem99(true, 1, 1, 97, 2, 2, 128, "window2");
  add_smem99(false, 1, 100, 70, 2, 2, 128, "packed");
  add_smem99(true, 1, 70, 100, 2, 1, 128, "partial", false, 2, -0.2);
  add_smem99(false, 2, 40, 72, 2, 1, 128, "masked_rows");
  add_smem99(true, 1, 130, 130, 2, 1, 64, "window");
  add_smem99(false, 1, 97, 7, 4, 2, 64, "diagonal");
  add_smem99(true, 1, 70, 100, 2, 1, 64, "packed");
  add_smem99(false, 1, 70, 100, 2, 2, 64, "packed");
  add_smem99(true, 1, 200, 150, 2, 1, 64, "diagonal");
  add_smem99(false, 1, 70, 100, 2, 1, 64, "window");
  add_smem99(true, 2, 45, 90, 4, 2, 64, "random", true);
  add_smem99(false, 1, 65, 33, 2, 2, 96, "random");
  add_smem99(true, 1, 70, 100, 2, 1, 72, "skipped");
  add_smem99(false, 1, 97, 97, 2, 1, 112, "none", false, 3);
  add_smem99(true, 1, 97, 130, 4, 2, 256, "diagonal");
  add_smem99(false, 1, 70, 100, 2, 1, 256, "diagonal", true, 2);
  add_smem99(true, 1, 7, 97, 2, 2, 256, "window");
  add_smem99(false, 1, 97, 40, 2, 1, 256, "window2");
  add_smem99(true, 1, 100, 70, 2, 1, 256, "packed");
  add_smem99(false, 2, 45, 90, 4, 2, 256, "packed");
  add_smem99(true, 1, 33, 65, 2, 1, 256, "partial", false, 2, -0.2);
  add_smem99(false, 1, 40, 50, 2, 1, 200, "masked_rows");

  // The list covers every head-dim bucket, and at d = 64, 128 and 256 each dtype with a causal
  // mask, a sliding window and packed sequences with pad rows (every case runs the forward, both
  // backward modes and the deterministic dQ kernel).
  int missing = 0;
  auto covered = [&](auto&& pred) {
    return std::any_of(cases.begin(), cases.end(), [&](const Case& c) { return !c.sm90a && pred(c); });
  };
  for (int bucket : {32, 64, 96, 128, 256}) {
    if (!covered([&](const Case& c) { return headdim_bucket(c.D) == bucket; })) {
      std::printf("coverage: no case in the d%d bucket\n", bucket);
      ++missing;
    }
  }
  // Each dtype with a causal mask, a sliding window and packed sequences with pad rows, at each
  // head-dim bucket of `buckets`, among the cases of a family ("": the mma.sync kernels).
  auto require_masks = [&](const char* family, std::initializer_list<int> buckets, auto&& in_family) {
    for (int bucket : buckets) {
      for (bool bf16 : {true, false}) {
        for (const char* kind : {"causal", "window", "packed"}) {
          if (!std::any_of(cases.begin(), cases.end(), [&](const Case& c) {
                return in_family(c) && headdim_bucket(c.D) == bucket && c.bf16 == bf16 &&
                       mask_kind(c.mask) == kind;
              })) {
            std::printf("coverage: no %s%s case at d%d %s\n", family, kind, bucket,
                        bf16 ? "bf16" : "fp16");
            ++missing;
          }
        }
      }
    }
  };
  require_masks("", {64, 128, 256}, [](const Case& c) { return !c.sm90a; });
  // The smem99 cases at d = 64, 128 and 256; the Hopper kernels' at d = 64, 128 and 256 (the
  // backward's at d = 64 and 128).
  require_masks("smem99 ", {64, 128, 256}, [](const Case& c) { return c.smem99; });
  require_masks("sm90a ", {64, 128, 256}, [](const Case& c) { return c.sm90a; });

  // The named cases, or the drawn ones, in place of the table.
  const bool table = random_count < 0 && named.empty();
  if (!table) {
    cases.clear();
    for (const std::string& name : named) {
      Case c;
      if (!parse_case(name, &c)) return 2;
      cases.push_back(c);
    }
  }
  if (random_count >= 0) {
    std::printf("%ld random cases, seed %llu, cost at most %g (%s --random %ld --seed %llu)\n",
                random_count, static_cast<unsigned long long>(seed), max_cost, g_program,
                random_count, static_cast<unsigned long long>(seed));
    std::mt19937_64 rng(seed);
    for (long i = 0; i < random_count; ++i) cases.push_back(random_case(rng, max_cost));
  }

  // A case that stops the emulator (an abort on a violation, a crash) names itself.
  std::signal(SIGABRT, report_case_and_die);
  std::signal(SIGSEGV, report_case_and_die);
  std::signal(SIGBUS, report_case_and_die);
  std::signal(SIGFPE, report_case_and_die);
  int failed = 0, run = 0;
  std::vector<std::string> failures;
  for (const Case& c : cases) {
    if (!filters.empty() && std::none_of(filters.begin(), filters.end(), [&](const std::string& f) {
          return c.name.find(f) != std::string::npos;
        })) {
      continue;
    }
    ++run;
    std::snprintf(g_running, sizeof g_running, "%s", c.name.c_str());
    if (!run_case(c)) {
      ++failed;
      failures.push_back(c.name);
    }
    std::fflush(stdout);
  }
  g_running[0] = '\0';
  for (const std::string& name : failures) {
    std::printf("failed: %s --case \"%s\"\n", g_program, name.c_str());
  }
  if (!table) {
    std::printf("%d of %d cases passed\n", run - failed, run);
    return failed ? 1 : 0;
  }
  for (bool sm90a : {false, true}) {
    const std::string name = std::string(sm90a ? "sm90a " : "") + "bf16 nan in a query row";
    if (!filters.empty() && std::none_of(filters.begin(), filters.end(), [&](const std::string& f) {
          return name.find(f) != std::string::npos;
        })) {
      continue;
    }
    ++run;
    failed += !run_nan_case(name, sm90a);
  }
  std::printf("%d of %d cases passed\n", run - failed, run);
  return failed || missing ? 1 : 0;
}
