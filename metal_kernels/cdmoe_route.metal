// CDMoE product-key routing: per (token, retrieval head) row, top-KK of the sub-key scores
// s_x and of s_y, the candidate sums s_x[i] + s_y[j], the final top-TOPK, softmax (and the
// norm_topk_prob renormalisation), in one launch.
// Must match cheems_mlx.cdmoe.CDMoE.route (product_key_topk + softmax) as SETS of
// (expert index, weight) per row (the ops path's argpartition order is unspecified).
//
// grid (32, rows, 1), threadgroup (32, R, 1): one simdgroup per row (rows = b*l*He).
//   sub-key top-KK: lane owns scores lane, lane + 32, ... < K in registers; KK rounds of a
//     SIMD arg-max (simd_max, then simd_min of the index among lanes holding the max), the
//     winner is removed; lane 0 keeps the winners, in descending order, in threadgroup memory
//     (per simdgroup, read by its lanes after a simdgroup_barrier).
//   candidates: with both lists sorted, candidate (i, j) is beaten by the (i+1)(j+1)-1 others
//     of its rectangle, so only pairs with (i+1)(j+1) <= TOPK can be in the top-TOPK (the
//     ops path scores all KK*KK); `pairs` (NPAIR,) lists them as i*KK + j; lane owns pairs
//     lane, lane + 32, ...; TOPK SIMD arg-max rounds pick the final experts i_x*K + i_y.
//   softmax over the TOPK winners: lane owns winners lane, lane + 32, ...; simd_sum.
// Inputs:  sx, sy (rows, K) T     pairs (NPAIR) int32
// Outputs: weights (rows, TOPK) f32     indices (rows, TOPK) uint32, in descending score order
// Cost per row: (KK * 2 * K/32 + TOPK * NPAIR/32) compares per lane plus 2*(KK + TOPK) SIMD
// reductions; reads 2*K*sizeof(T), writes 8*TOPK bytes.

// ---- kernel body ----
  constexpr uint KPL = (K + 31) / 32;      // sub-key scores per lane
  constexpr uint CPL = (NPAIR + 31) / 32;  // candidates per lane
  constexpr uint OPL = (TOPK + 31) / 32;   // winners per lane
  const uint lane = thread_index_in_simdgroup;
  const uint sgi = thread_position_in_threadgroup.y;  // simdgroup of this row in the threadgroup
  const uint row = thread_position_in_grid.y;

  threadgroup float top_v[R * 2 * KK];  // [simdgroup][x or y][rank]: sub-key score
  threadgroup uint top_i[R * 2 * KK];   // [simdgroup][x or y][rank]: sub-key index

  // 1. top-KK of s_x and of s_y, in descending order
  for (uint half_ = 0; half_ < 2; ++half_) {
    float v[KPL];
    for (uint j = 0; j < KPL; ++j) {
      const uint i = lane + 32 * j;
      v[j] = -INFINITY;
      if (i < K) {
        v[j] = static_cast<float>(half_ == 0 ? sx[size_t(row) * K + i] : sy[size_t(row) * K + i]);
      }
    }
    for (uint r = 0; r < KK; ++r) {
      float best = -INFINITY;
      uint best_i = 0xFFFFFFFFu;
      for (uint j = 0; j < KPL; ++j) {
        const uint i = lane + 32 * j;
        if (i < K && (v[j] > best || best_i == 0xFFFFFFFFu)) {
          best = v[j];
          best_i = i;
        }
      }
      const float m = simd_max(best);
      const uint w = simd_min(best == m ? best_i : 0xFFFFFFFFu);
      for (uint j = 0; j < KPL; ++j) {
        if (lane + 32 * j == w) {
          v[j] = -INFINITY;
        }
      }
      if (lane == 0) {
        top_v[(sgi * 2 + half_) * KK + r] = m;
        top_i[(sgi * 2 + half_) * KK + r] = w;
      }
    }
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);

  // 2. candidate sums of the pairs that can reach the top-TOPK
  float cv[CPL];
  uint ce[CPL];
  for (uint j = 0; j < CPL; ++j) {
    const uint c = lane + 32 * j;
    cv[j] = -INFINITY;
    ce[j] = 0xFFFFFFFFu;
    if (c < NPAIR) {
      const uint code = static_cast<uint>(pairs[c]);
      const uint ix = code / KK, iy = code % KK;
      cv[j] = top_v[(sgi * 2) * KK + ix] + top_v[(sgi * 2 + 1) * KK + iy];
      ce[j] = top_i[(sgi * 2) * KK + ix] * K + top_i[(sgi * 2 + 1) * KK + iy];
    }
  }

  // 3. final top-TOPK (expert indices are distinct, so the index breaks ties)
  float wv[OPL];
  uint wi[OPL];
  float top = 0.0f;
  for (uint r = 0; r < TOPK; ++r) {
    float best = -INFINITY;
    uint best_e = 0xFFFFFFFFu;
    for (uint j = 0; j < CPL; ++j) {
      if (ce[j] != 0xFFFFFFFFu && (cv[j] > best || (cv[j] == best && ce[j] < best_e))) {
        best = cv[j];
        best_e = ce[j];
      }
    }
    const float m = simd_max(best);
    const uint w = simd_min(best == m ? best_e : 0xFFFFFFFFu);
    for (uint j = 0; j < CPL; ++j) {
      if (ce[j] == w) {
        ce[j] = 0xFFFFFFFFu;
        cv[j] = -INFINITY;
      }
    }
    if (r == 0) {
      top = m;
    }
    for (uint j = 0; j < OPL; ++j) {
      if (lane + 32 * j == r) {
        wv[j] = m;
        wi[j] = w;
      }
    }
  }

  // 4. softmax over the winners (float32), optional renormalisation
  float e[OPL];
  float total = 0.0f;
  for (uint j = 0; j < OPL; ++j) {
    e[j] = lane + 32 * j < TOPK ? metal::exp(wv[j] - top) : 0.0f;
    total += e[j];
  }
  total = simd_sum(total);
  float norm = 0.0f;
  for (uint j = 0; j < OPL; ++j) {
    e[j] = e[j] / total;
    norm += e[j];
  }
  if (NORM) {
    norm = simd_sum(norm);
  }
  for (uint j = 0; j < OPL; ++j) {
    const uint r = lane + 32 * j;
    if (r < TOPK) {
      weights[size_t(row) * TOPK + r] = NORM ? e[j] / norm : e[j];
      indices[size_t(row) * TOPK + r] = wi[j];
    }
  }
