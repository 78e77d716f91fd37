// SSD decode step: one token, all heads, RoPE on B and C fused in.
// Must match cheems_mlx.ssd.ssd_step applied to rope(B), rope(C) (StateSpaceDuality, l == 1):
//     S = exp(dt*A) S + (dt x) B^T        y = S C        (a masked row keeps S: dA = 1, dt x = 0)
//
// grid (32, P, batch*H), threadgroup (32, TY, 1) with TY | P.
//   threadgroup: TY rows p of the state of one (batch, head); it first rotates B_t and C_t of
//     that head (rotate-half RoPE from the row's cos/sin) into threadgroup memory, float32.
//   simdgroup: one state row p; lane owns columns n = lane, lane + 32, ... < N of that row,
//     updates them in registers (state float32 whatever T), and the row's y is a simd_sum.
// Inputs:  X (b, H, P) T      dt (b, H) f32 (softplus-ed)      A (H) f32
//          B, C (b, H, N) T, before RoPE     cs (b, N) f32 = [cos | sin] of the row's position
//          (ROPE only; cs[i], cs[N/2 + i] for frequency i)     mask (b) bool
//          state_in (b, H, P, N) f32
// Outputs: y (b, H, P) T      state_out (b, H, P, N) f32
// Per token and head: reads P*N*4 (state) + (P + 2N) sizeof(T) + N*4 (cos/sin, shared by the
// heads), writes P*N*4 + P sizeof(T); 4*P*N FLOPs: 0.5 FLOP per state byte moved, memory bound
// on the state (P = N = 128: 128 KiB moved per head and token).

// #include "rope_common.metal"

// ---- kernel body ----
  constexpr uint HALF = N / 2;
  constexpr uint NK = (N + 31) / 32;  // state columns per lane
  const uint H = X_shape[1];
  const uint bh = thread_position_in_grid.z;  // batch * H + head
  const uint batch = bh / H;
  const uint head = bh % H;
  const uint p = thread_position_in_grid.y;
  const uint lane = thread_position_in_threadgroup.x;
  const uint tid = thread_position_in_threadgroup.y * 32 + lane;

  threadgroup float Bs[N];
  threadgroup float Cs[N];

  // 1. rope(B_t), rope(C_t) of this head into threadgroup memory
  for (uint n = tid; n < N; n += 32 * TY) {
    float bv = static_cast<float>(B[bh * N + n]);
    float cv = static_cast<float>(C[bh * N + n]);
    if (ROPE) {
      const bool first = n < HALF;
      const uint i = first ? n : n - HALF;  // frequency index
      const uint partner = first ? n + HALF : n - HALF;
      const float cos_t = cs[batch * N + i];
      const float sin_t = cs[batch * N + HALF + i];
      bv = rope_rotate(bv, static_cast<float>(B[bh * N + partner]), cos_t, sin_t, first);
      cv = rope_rotate(cv, static_cast<float>(C[bh * N + partner]), cos_t, sin_t, first);
    }
    Bs[n] = bv;
    Cs[n] = cv;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // 2. S[p, :] = dA S[p, :] + (dt x_p) B ;  y_p = S[p, :] . C
  const bool on = mask[batch];
  const float dt_ = dt[bh];
  const float dA = on ? metal::exp(dt_ * A[head]) : 1.0f;
  const float dtx = on ? dt_ * static_cast<float>(X[bh * P + p]) : 0.0f;
  const size_t row = (size_t(bh) * P + p) * N;
  float acc = 0.0f;
  for (uint k = 0; k < NK; ++k) {
    const uint n = lane + 32 * k;
    if (n < N) {
      const float s = dA * state_in[row + n] + dtx * Bs[n];
      state_out[row + n] = s;
      acc += s * Cs[n];
    }
  }
  acc = simd_sum(acc);
  if (lane == 0) {
    y[bh * P + p] = static_cast<T>(acc);
  }
