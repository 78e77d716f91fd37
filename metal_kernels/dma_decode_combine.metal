// Dynamic mask attention, decode, pass 2 of 2: merges the per-block partial softmax
// states written by dma_decode.metal into the attention output.
//
// Must match: the ops path of DynamicMaskAttention.__call__ for l == 1 (with pass 1).
// out[b, h] = sum_s o_s exp(m_s - M) / sum_s l_s exp(m_s - M), M = max_s m_s.
//
// Grid (32, H, B) threads, threadgroup (32, 1, 1): one simdgroup per (query head h,
// batch b); lane owns head-dim elements d = lane + 32 i and loops over the S blocks.
// Inputs: part_o (B, H, S, P) float32, part_ml (B, H, S, 2) float32 (max, sum).
// Output: out (B, 1, H, P) in the activation dtype T (the layout o_proj reads).
// Cost: reads S (P + 2) floats per (b, h); negligible next to pass 1.

// ---- kernel body ----
constexpr int PL = (P + 31) / 32;
const int lane = int(thread_position_in_threadgroup.x);
const int h = int(threadgroup_position_in_grid.y);
const int b = int(threadgroup_position_in_grid.z);
const int H = int(part_o_shape[1]);
const int S = int(part_o_shape[2]);
const int64_t row = (int64_t(b) * H + h) * S;

float M = part_ml[row * 2];
for (int s = 1; s < S; ++s) {
  M = metal::max(M, part_ml[(row + s) * 2]);
}
float Lsum = 0.0f;
float O[PL];
for (int i = 0; i < PL; ++i) {
  O[i] = 0.0f;
}
for (int s = 0; s < S; ++s) {
  const float e = metal::exp(part_ml[(row + s) * 2] - M);  // a block with no kept key has l = o = 0
  Lsum += part_ml[(row + s) * 2 + 1] * e;
  for (int i = 0; i < PL; ++i) {
    const int d = lane + 32 * i;
    if (d < P) {
      O[i] += part_o[(row + s) * P + d] * e;
    }
  }
}
for (int i = 0; i < PL; ++i) {
  const int d = lane + 32 * i;
  if (d < P) {
    out[(int64_t(b) * H + h) * P + d] = static_cast<T>(O[i] / Lsum);
  }
}
