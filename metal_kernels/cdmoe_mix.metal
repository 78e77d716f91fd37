// CDMoE expert mixing: gather the selected rank-1 experts, dot, silu, routing weight and
// weighted sum, in one launch with no (b, l, M, d) intermediate in device memory.
// Must match the expert term of cheems_mlx.cdmoe.CDMoE.__call__ (M = He * k experts a token):
//     out[j] = sum_m silu(x . down_embed[idx_m]) * w_m * up_embed[idx_m, j]
//
// grid (32*NSG, tokens, 1), threadgroup (32*NSG, 1, 1): one threadgroup per token.
//   1. simdgroup sg computes the coefficients of experts m = sg, sg + NSG, ...: lanes stride
//      over d (coalesced row reads), simd_sum, lane 0 writes silu(dot) * w_m to threadgroup
//      memory (M floats);
//   2. after a barrier, thread tid owns output columns j = tid, tid + 32*NSG, ...:
//      out[j] = sum_m coef[m] * up[idx_m, j] (coalesced row reads), float32 accumulation.
// Inputs:  x (tokens, D) T     weights (tokens, M) f32     indices (tokens, M) uint32
//          down, up (E, D) TE
// Outputs: out (tokens, D) T
// Per token: reads 2*M*D*sizeof(TE) (the gathers dominate) + D*sizeof(T); writes D*sizeof(T);
// 4*M*D FLOPs.

// ---- kernel body ----
  constexpr uint NT = 32 * NSG;
  const uint tok = thread_position_in_grid.y;
  const uint tid = thread_position_in_threadgroup.x;
  const uint lane = thread_index_in_simdgroup;
  const uint sg = simdgroup_index_in_threadgroup;

  threadgroup float coef[M];

  // 1. coefficients silu(x . down[idx_m]) * w_m
  for (uint m = sg; m < M; m += NSG) {
    const size_t base = size_t(indices[size_t(tok) * M + m]) * D;
    float acc = 0.0f;
    for (uint j = lane; j < D; j += 32) {
      acc += static_cast<float>(x[size_t(tok) * D + j]) * static_cast<float>(down[base + j]);
    }
    acc = simd_sum(acc);
    if (lane == 0) {
      coef[m] = acc / (1.0f + metal::exp(-acc)) * weights[size_t(tok) * M + m];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // 2. weighted sum of the up rows
  for (uint j = tid; j < D; j += NT) {
    float acc = 0.0f;
    for (uint m = 0; m < M; ++m) {
      acc += coef[m] * static_cast<float>(up[size_t(indices[size_t(tok) * M + m]) * D + j]);
    }
    out[size_t(tok) * D + j] = static_cast<T>(acc);
  }
