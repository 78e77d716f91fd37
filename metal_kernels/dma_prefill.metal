// Dynamic mask attention, prefill: tiled attention with online softmax, the per-key bias
// added to the scores, and whole key tiles skipped when the mask keeps no key of the tile
// for any query row of the threadgroup (the flash-dmattn idea: cost follows the kept keys).
//
// Must match: cheems_mlx.dma.dynamic_mask + clip + scaled_dot_product_attention (the ops
// path of DynamicMaskAttention.__call__), given the key selection of
// cheems_mlx.dma.key_selection: key j is kept for query row i of mask head hm iff
//   valid[b, i, j] and (m_j > thr[i] or (m_j == thr[i] and j < jlim[i]))
// and scores q.k * scale + T(min(m_j, hi)) (the ops path's float32 mask cast to the
// activation dtype). An unkept key scores q.k * scale + min_value, whose exp is exactly 0
// next to any kept key, so it is left out. A row with NO kept key (padding-only rows, or a
// ratio rule masking every causal key of an early row) gets min_value on every key in the
// ops path, which absorbs q.k: a UNIFORM row over all T keys, future ones included. The
// kernel finds such rows first (a scan of the mask, no K / V loads) and gives them score 0
// on every key, so their tiles are never skipped.
//
// Grid (32 * NSG, ceil(L / BQ), B * Hkv) threads, threadgroup (32 * NSG, 1, 1),
// NSG = REP * BQ: one threadgroup per (query tile of BQ queries, kv head g, batch b); its
// simdgroup w owns one row (query head g * REP + w / BQ, query i = tile * BQ + w % BQ), so a
// K / V tile is loaded once for REP * BQ rows (GQA aware). Key tiles of 32 keys: lane j of a
// row scores key j of the tile (q.k from threadgroup memory), online softmax over the row
// with simd_max / simd_sum; then lane owns head-dim elements d = lane + 32 i of the output.
// K and V tiles share one threadgroup buffer (flags, barrier, K, barrier, scores, barrier, V,
// barrier, P.V; the next tile's flag barrier closes it) so P <= 128 fits in float32
// (32 * 129 * 4 bytes).
//
// Inputs: q (B, H, L, P), k / v (B, Hkv, T, P), bias (B, Hm, T): strided views allowed;
// valid (Bv, Lv, T) bool, Bv in {1, B}, Lv in {1, L}; sel_thr (B, Hm, Lt) float32,
// sel_jlim (B, Hm, Lt) int32, Lt in {1, L}; params [scale, hi].
// Output: out (B, L, H, P) in T (the layout o_proj reads).
// Cost: mask scan 2 L T (valid + bias reads) per mask row; per active tile 32 P K and V
// loads per threadgroup and 4 * 32 P FLOPs per row; skipped tiles cost only the mask scan.

// #include "dma_common.metal"

// ---- kernel body ----
constexpr int PL = (P + 31) / 32;  // head-dim elements per lane
constexpr int NSG = REP * BQ;      // rows (simdgroups) per threadgroup
constexpr int KS = P + 1;          // padded row stride of the K / V tile
threadgroup float qs[NSG * P];
threadgroup float kv[32 * KS];
threadgroup float ps[NSG * 32];
threadgroup int flags[2 * NSG];

const int lane = int(thread_index_in_simdgroup);
const int w = int(simdgroup_index_in_threadgroup);
const int tid = int(thread_position_in_threadgroup.x);
const int qtile = int(threadgroup_position_in_grid.y);
const int H = int(q_shape[1]);
const int L = int(q_shape[2]);
const int Hkv = int(k_shape[1]);
const int Tk = int(k_shape[2]);
const int Hm = int(bias_shape[1]);
const int b = int(threadgroup_position_in_grid.z) / Hkv;
const int g = int(threadgroup_position_in_grid.z) % Hkv;
const float scale = params[0];
const float hi = params[1];

const int h = g * REP + w / BQ;
const int hm = MASK_PER_HEAD ? h : g;
const int i = qtile * BQ + w % BQ;
const bool row_ok = i < L;
const int ic = row_ok ? i : L - 1;  // rows past L read row L - 1 and write nothing

const int Lt = int(sel_thr_shape[2]);
const int64_t sel = (int64_t(b) * Hm + hm) * Lt + (Lt > 1 ? ic : 0);
const float thr = sel_thr[sel];
const int jlim = sel_jlim[sel];
const int64_t vrow = (valid_shape[0] > 1 ? int64_t(b) * valid_shape[1] * Tk : 0) +
                     (valid_shape[1] > 1 ? int64_t(ic) * Tk : 0);
const int64_t bbase = int64_t(b) * bias_strides[0] + int64_t(hm) * bias_strides[1];
const int64_t kbase = int64_t(b) * k_strides[0] + int64_t(g) * k_strides[1];
const int64_t vbase = int64_t(b) * v_strides[0] + int64_t(g) * v_strides[1];

// this row's query, pre-scaled (each simdgroup reads only its own row)
const int64_t qbase = int64_t(b) * q_strides[0] + int64_t(h) * q_strides[1] + int64_t(ic) * q_strides[2];
for (int d = lane; d < P; d += 32) {
  qs[w * P + d] = scale * static_cast<float>(q[qbase + int64_t(d) * q_strides[3]]);
}

// does this row keep any key? (mask only, no K / V)
bool row_any = false;
if (row_ok) {
  for (int j = lane; j < Tk; j += 32) {
    row_any = row_any || dma_kept(valid[vrow + j], bias[bbase + int64_t(j) * bias_strides[2]], thr, jlim, j);
  }
}
const bool empty = row_ok && simd_max(row_any ? 1 : 0) == 0;  // uniform row over all keys

float o[PL];
for (int ii = 0; ii < PL; ++ii) {
  o[ii] = 0.0f;
}
float mrun = DMA_NONE;
float lrun = 0.0f;
const int ntiles = (Tk + 31) / 32;
for (int t = 0; t < ntiles; ++t) {
  const int j = t * 32 + lane;
  bool kept = false;
  float add = 0.0f;
  if (row_ok && j < Tk) {
    const float m = bias[bbase + int64_t(j) * bias_strides[2]];
    kept = empty || dma_kept(valid[vrow + j], m, thr, jlim, j);
    add = empty ? 0.0f : dma_addend<T>(m, hi);
  }
  // skip the tile when no row of the threadgroup keeps any of its keys; flags are double
  // buffered by tile parity (tile t + 2 writes only after every thread passed tile t + 1's
  // barrier, hence read tile t's flags)
  const int tile_any = simd_max(kept ? 1 : 0);
  if (lane == 0) {
    flags[(t & 1) * NSG + w] = tile_any;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  bool active = false;
  for (int ww = 0; ww < NSG; ++ww) {
    active = active || flags[(t & 1) * NSG + ww] != 0;
  }
  if (!active) {
    continue;  // the same decision on every thread of the threadgroup
  }

  for (int idx = tid; idx < 32 * P; idx += NSG * 32) {
    const int jj = idx / P;
    const int d = idx % P;
    const int key = t * 32 + jj;
    const int64_t at = kbase + int64_t(key) * k_strides[2] + int64_t(d) * k_strides[3];
    kv[jj * KS + d] = key < Tk ? static_cast<float>(k[at]) : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float s = 0.0f;
  for (int d = 0; d < P; ++d) {
    s += qs[w * P + d] * kv[lane * KS + d];
  }
  s = empty ? 0.0f : s + add;
  const float mtile = simd_max(kept ? s : DMA_NONE);
  const float mnew = metal::max(mrun, mtile);
  const float corr = metal::exp(mrun - mnew);  // 0 after DMA_NONE; 1 while no key was kept
  const float p = kept ? metal::exp(s - mnew) : 0.0f;
  lrun = lrun * corr + simd_sum(p);
  mrun = mnew;
  ps[w * 32 + lane] = p;
  threadgroup_barrier(mem_flags::mem_threadgroup);  // every row is done reading the K tile

  for (int idx = tid; idx < 32 * P; idx += NSG * 32) {
    const int jj = idx / P;
    const int d = idx % P;
    const int key = t * 32 + jj;
    const int64_t at = vbase + int64_t(key) * v_strides[2] + int64_t(d) * v_strides[3];
    kv[jj * KS + d] = key < Tk ? static_cast<float>(v[at]) : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int ii = 0; ii < PL; ++ii) {
    const int d = lane + 32 * ii;
    if (d < P) {
      float acc = o[ii] * corr;
      for (int jj = 0; jj < 32; ++jj) {
        acc += ps[w * 32 + jj] * kv[jj * KS + d];
      }
      o[ii] = acc;
    }
  }
  // no barrier closes the tile: the next tile's flag barrier comes before any write of kv or
  // ps (a skipped tile writes neither), so every row is done reading this V tile by then
}

if (row_ok) {
  for (int ii = 0; ii < PL; ++ii) {
    const int d = lane + 32 * ii;
    if (d < P) {
      out[((int64_t(b) * L + i) * H + h) * P + d] = static_cast<T>(o[ii] / lrun);
    }
  }
}
