// SSD chunked scan for prefill, RoPE on B and C fused in.
// Must match cheems_mlx.ssd.ssd_chunked_scan on rope(B), rope(C) (StateSpaceDuality, l > 1):
// y (b, l, H, P) and the final state (b, H, P, N) float32, from an initial state; masked
// positions neither decay nor write. The result does not depend on the chunk size, so the
// kernel's chunk Q (template) is chosen to fit threadgroup memory, not the model's.
//
// grid (32*NSG, P/PB, batch*H), threadgroup (32*NSG, 1, 1): one threadgroup per
// (batch, head, block of PB state rows p0..p0+PB), walking the chunks of Q tokens in order.
//   state: the PB x N block of S stays in registers the whole sequence (float32):
//     simdgroup sg owns rows p0 + sg + NSG*r (r < PB/NSG), lane owns columns lane + 32*k.
//   per chunk (3 threadgroup barriers), all in threadgroup memory, nothing per chunk in device memory:
//     1. load rope(B), rope(C) (Q x N, float32), dt*x for the block (Q x PB, 0 where masked or
//        past the end); simdgroup 0 builds acum = inclusive cumsum of dt*A (0 where masked)
//        with simd_prefix_inclusive_sum;
//     2. G[t, s] = (C_t . B_s) exp(acum_t - acum_s) for s <= t (the decay exp(segsum(dt*A))
//        is computed on the fly here and exists only inside G, Q x Q floats); edec[s] =
//        exp(acum_last - acum_s);
//     3. y[t, p] = exp(acum_t) (C_t . S[p, :]) + sum_{s<=t} G[t, s] (dt x)[s, p]: one simd_sum
//        per (t, p), lane 0 writes y;
//     4. S[p, n] = exp(acum_last) S[p, n] + sum_s edec[s] (dt x)[s, p] B_s[n], in registers.
//   Rows of B/C/dt*x tiles are padded by one float against bank conflicts.
// Inputs:  X (b, l, H, P) T     dt (b, l, H) f32     A (H) f32     B, C (b, l, H, N) T (before RoPE)
//          cs (b, l, N) f32 = [cos | sin] per position (ROPE only)     mask (b, l) bool
//          state_in (b, H, P, N) f32
// Outputs: y (b, l, H, P) T     state_out (b, H, P, N) f32
// Expected cost per token and head (s = sizeof(T), R = P/PB blocks re-reading B and C):
//   device bytes: read P*s (x) + R*2N*s (B, C; the R re-reads mostly hit cache) + 8 (dt, mask)
//     + R*N*4 (cos/sin, shared by heads), write P*s (y); the state is read and written once
//     per sequence (2*P*N*4), intermediates (decay, G, chunk states) never leave the chip.
//   FLOPs: R*(Q+1)*N (G, lower triangle) + 2*P*(N + Q/2) (y) + 2*P*N (state), R*(Q/2 + 2) exps;
//     e.g. P = N = 128, Q = 16, PB = 32 (R = 4): ~76 kFLOP (the one-step recurrence: 4*P*N =
//     65 kFLOP; the chunked form buys parallel, barrier-amortised work per chunk, not fewer FLOPs).

// #include "rope_common.metal"

// ---- kernel body ----
  constexpr uint NT = 32 * NSG;         // threads
  constexpr uint HALF = N / 2;
  constexpr uint NK = (N + 31) / 32;    // state columns per lane
  constexpr uint RPS = PB / NSG;        // state rows per simdgroup
  constexpr uint NS = N + 1;            // padded row stride of Bs, Cs
  constexpr uint XS = PB + 1;           // padded row stride of Xs
  const uint tid = thread_position_in_threadgroup.x;
  const uint lane = thread_index_in_simdgroup;
  const uint sg = simdgroup_index_in_threadgroup;
  const uint L = X_shape[1];
  const uint H = X_shape[2];
  const uint bh = thread_position_in_grid.z;  // batch * H + head
  const uint batch = bh / H;
  const uint head = bh % H;
  const uint p0 = thread_position_in_grid.y * PB;
  const float a = A[head];

  threadgroup float acum[Q];     // inclusive cumsum of dt*A inside the chunk
  threadgroup float edec[Q];     // exp(acum[Q-1] - acum[s]): decay from s to the chunk end
  threadgroup float Bs[Q * NS];  // rope(B_s), float32
  threadgroup float Cs[Q * NS];  // rope(C_t), float32
  threadgroup float Xs[Q * XS];  // dt_s * x[s, p0 + pl]
  threadgroup float G[Q * Q];    // (C_t . B_s) exp(acum_t - acum_s), s <= t; 0 above

  float S[RPS][NK];
  for (uint r = 0; r < RPS; ++r) {
    const size_t row = (size_t(bh) * P + p0 + sg + NSG * r) * N;
    for (uint k = 0; k < NK; ++k) {
      const uint n = lane + 32 * k;
      S[r][k] = n < N ? state_in[row + n] : 0.0f;
    }
  }

  for (uint c0 = 0; c0 < L; c0 += Q) {
    // 1. load the chunk
    for (uint e = tid; e < Q * N; e += NT) {
      const uint s = e / N, n = e % N, t = c0 + s;
      float bv = 0.0f, cv = 0.0f;
      if (t < L) {
        const size_t base = ((size_t(batch) * L + t) * H + head) * N;
        bv = static_cast<float>(B[base + n]);
        cv = static_cast<float>(C[base + n]);
        if (ROPE) {
          const bool first = n < HALF;
          const uint i = first ? n : n - HALF;
          const uint partner = first ? n + HALF : n - HALF;
          const size_t cb = (size_t(batch) * L + t) * N;
          const float cos_t = cs[cb + i], sin_t = cs[cb + HALF + i];
          bv = rope_rotate(bv, static_cast<float>(B[base + partner]), cos_t, sin_t, first);
          cv = rope_rotate(cv, static_cast<float>(C[base + partner]), cos_t, sin_t, first);
        }
      }
      Bs[s * NS + n] = bv;
      Cs[s * NS + n] = cv;
    }
    for (uint e = tid; e < Q * PB; e += NT) {
      const uint s = e / PB, pl = e % PB, t = c0 + s;
      float v = 0.0f;
      if (t < L && mask[size_t(batch) * L + t]) {
        const size_t bt = (size_t(batch) * L + t) * H + head;
        v = dt[bt] * static_cast<float>(X[bt * P + p0 + pl]);
      }
      Xs[s * XS + pl] = v;
    }
    if (sg == 0) {
      float carry = 0.0f;
      for (uint s0 = 0; s0 < Q; s0 += 32) {
        const uint s = s0 + lane, t = c0 + s;
        float v = 0.0f;
        if (s < Q && t < L && mask[size_t(batch) * L + t]) {
          v = dt[(size_t(batch) * L + t) * H + head] * a;
        }
        const float incl = simd_prefix_inclusive_sum(v) + carry;
        if (s < Q) {
          acum[s] = incl;
        }
        carry = simd_broadcast(incl, 31);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // 2. intra-chunk matrix G (decay on the fly) and decay to the chunk end
    const float alast = acum[Q - 1];
    for (uint e = tid; e < Q * Q; e += NT) {
      const uint t = e / Q, s = e % Q;
      float g = 0.0f;
      if (s <= t) {
        for (uint n = 0; n < N; ++n) {
          g += Cs[t * NS + n] * Bs[s * NS + n];
        }
        g *= metal::exp(acum[t] - acum[s]);
      }
      G[e] = g;
    }
    for (uint s = tid; s < Q; s += NT) {
      edec[s] = metal::exp(alast - acum[s]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // 3. outputs of the chunk: inter-chunk term from the state in registers + intra-chunk term
    const uint valid = min(uint(Q), L - c0);
    for (uint t = 0; t < valid; ++t) {
      const float et = metal::exp(acum[t]);
      for (uint r = 0; r < RPS; ++r) {
        const uint pl = sg + NSG * r;
        float part = 0.0f;
        for (uint k = 0; k < NK; ++k) {
          const uint n = lane + 32 * k;
          if (n < N) {
            part += Cs[t * NS + n] * S[r][k];
          }
        }
        part *= et;
        for (uint s = lane; s <= t; s += 32) {
          part += G[t * Q + s] * Xs[s * XS + pl];
        }
        part = simd_sum(part);
        if (lane == 0) {
          y[((size_t(batch) * L + c0 + t) * H + head) * P + p0 + pl] = static_cast<T>(part);
        }
      }
    }

    // 4. state at the chunk end
    const float echunk = metal::exp(alast);
    for (uint r = 0; r < RPS; ++r) {
      const uint pl = sg + NSG * r;
      for (uint k = 0; k < NK; ++k) {
        S[r][k] *= echunk;
      }
      for (uint s = 0; s < valid; ++s) {
        const float w = edec[s] * Xs[s * XS + pl];  // the same for the whole simdgroup
        for (uint k = 0; k < NK; ++k) {
          const uint n = lane + 32 * k;
          if (n < N) {
            S[r][k] += w * Bs[s * NS + n];
          }
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // tiles are overwritten by the next chunk
  }

  for (uint r = 0; r < RPS; ++r) {
    const size_t row = (size_t(bh) * P + p0 + sg + NSG * r) * N;
    for (uint k = 0; k < NK; ++k) {
      const uint n = lane + 32 * k;
      if (n < N) {
        state_out[row + n] = S[r][k];
      }
    }
  }
