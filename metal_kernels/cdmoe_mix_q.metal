// CDMoE expert mixing reading MLX affine group-quantized expert tables directly
// (nn.QuantizedEmbedding, mode "affine": value = scale * q + bias per group of GS columns).
// Must match the expert term of cheems_mlx.cdmoe.CDMoE.__call__ on the quantized module
// (which dequantizes the gathered rows with mx.dequantize):
//     out[j] = sum_m silu(x . down[idx_m]) * w_m * up[idx_m, j]
//
// Layout: a row of D values is a little-endian bit stream of D*BITS bits stored in D*BITS/32
// uint32 words (element j occupies bits j*BITS .. j*BITS + BITS - 1; true for every width
// MLX packs, 2/3/4/5/6/8), scales and biases (E, D/GS) TS.
// grid (32*NSG, tokens, 1), threadgroup (32*NSG, 1, 1): one threadgroup per token, as in
// cdmoe_mix.metal:
//   1. simdgroup per expert m: lanes stride over columns (neighbouring lanes read the same
//      words), dequantize, dot with x, simd_sum; lane 0 writes silu(dot) * w_m (threadgroup);
//   2. after a barrier, thread tid owns columns j = tid, tid + 32*NSG, ...: dequantize up and
//      accumulate in float32.
// Inputs:  x (tokens, D) T     weights (tokens, M) f32     indices (tokens, M) uint32
//          down_q, up_q (E, D*BITS/32) uint32     down_s, down_b, up_s, up_b (E, D/GS) TS
// Outputs: out (tokens, D) T
// Per token: reads 2*M*(D*BITS/8 + 2*(D/GS)*sizeof(TS)) bytes of expert tables + D*sizeof(T),
// writes D*sizeof(T); 4*M*D FLOPs plus the unpacking.

// The BITS-bit code of element j of a packed row (words: the row's first uint32).
template <int BITS, typename WordPtr>
inline uint unpack_code(WordPtr words, uint j) {
  const uint bit = j * BITS;
  const uint word = bit >> 5;
  const uint shift = bit & 31;
  uint v = words[word] >> shift;
  if (shift + BITS > 32) {
    v |= words[word + 1] << (32 - shift);
  }
  return v & ((1u << BITS) - 1u);
}

// ---- kernel body ----
  constexpr uint NT = 32 * NSG;
  constexpr uint WPR = D * BITS / 32;  // uint32 words per row
  constexpr uint NG = D / GS;          // groups per row
  const uint tok = thread_position_in_grid.y;
  const uint tid = thread_position_in_threadgroup.x;
  const uint lane = thread_index_in_simdgroup;
  const uint sg = simdgroup_index_in_threadgroup;

  threadgroup float coef[M];

  // 1. coefficients silu(x . dequant(down[idx_m])) * w_m
  for (uint m = sg; m < M; m += NSG) {
    const size_t e = size_t(indices[size_t(tok) * M + m]);
    float acc = 0.0f;
    for (uint j = lane; j < D; j += 32) {
      const uint q = unpack_code<BITS>(down_q + e * WPR, j);
      const float v = static_cast<float>(down_s[e * NG + j / GS]) * float(q)
          + static_cast<float>(down_b[e * NG + j / GS]);
      acc += static_cast<float>(x[size_t(tok) * D + j]) * v;
    }
    acc = simd_sum(acc);
    if (lane == 0) {
      coef[m] = acc / (1.0f + metal::exp(-acc)) * weights[size_t(tok) * M + m];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // 2. weighted sum of the dequantized up rows
  for (uint j = tid; j < D; j += NT) {
    float acc = 0.0f;
    for (uint m = 0; m < M; ++m) {
      const size_t e = size_t(indices[size_t(tok) * M + m]);
      const uint q = unpack_code<BITS>(up_q + e * WPR, j);
      const float v = static_cast<float>(up_s[e * NG + j / GS]) * float(q)
          + static_cast<float>(up_b[e * NG + j / GS]);
      acc += coef[m] * v;
    }
    out[size_t(tok) * D + j] = static_cast<T>(acc);
  }
