// Dynamic mask attention, decode, pass 1 of 2 (flash-decoding): one query per head
// against the cached K / V and the cached per-key bias m, the key axis split in blocks.
//
// Must match: cheems_mlx.dma.dynamic_mask + clip + scaled_dot_product_attention for one
// query row (the ops path of DynamicMaskAttention.__call__ with l == 1), given the key
// selection of cheems_mlx.dma.key_selection: key j is kept for mask row (b, hm) iff
//   valid[b, j] and (m_j > thr or (m_j == thr and j < jlim))
// and then scores q.k * scale + T(min(m_j, hi)) (the ops path's float32 mask cast to the
// activation dtype); unkept keys score scale * q.k + min_value, whose exp is exactly 0 next
// to any kept key, so they are skipped (no K / V load). jlim < 0 marks a row with no kept
// key at all: the ops path then adds the same min_value to every key, which absorbs q.k and
// gives a UNIFORM row over all T keys; the kernel reproduces that with score 0 for every key.
//
// Grid (32 * NSG * S, Hkv, B) threads, threadgroup (32 * NSG, 1, 1): one threadgroup per
// (key block of BLOCK keys, kv head g, batch b), S = ceil(T / BLOCK). Simdgroup w takes the
// keys start + w, start + w + NSG, ...; each of its 32 lanes owns head-dim elements
// d = lane + 32 i of the REP query heads g * REP + r sharing kv head g (GQA: K and V are
// loaded once for all of them) and keeps an online softmax (max, sum, weighted V) per head;
// q.k is a simd_sum. The NSG simdgroups are merged through threadgroup memory and the block
// writes an unnormalised partial (o, max, sum) per (b, h, block); dma_decode_combine.metal
// merges the blocks.
//
// Inputs: q (B, H, 1, P), k / v (B, Hkv, T, P) and bias (B, Hm, T) may be strided views
// (the cache's [..., :T, :] slices: no copy); valid (Bv, 1, T) bool, Bv in {1, B};
// sel_thr (B, Hm, 1) float32, sel_jlim (B, Hm, 1) int32; params [scale, hi].
// Outputs: part_o (B, H, S, P) float32, part_ml (B, H, S, 2) float32 (max, sum).
// Cost per step: reads the kept keys' K and V once per kv head (2 T_kept P Hkv elements)
// plus T biases and valid flags per mask head; 4 T_kept P H FLOPs.

// #include "dma_common.metal"

// ---- kernel body ----
constexpr int PL = (P + 31) / 32;            // head-dim elements per lane
constexpr int MH = MASK_PER_HEAD ? REP : 1;  // mask rows per kv head
threadgroup float tg_o[NSG * REP * P];
threadgroup float tg_m[NSG * REP];
threadgroup float tg_l[NSG * REP];

const int lane = int(thread_index_in_simdgroup);
const int w = int(simdgroup_index_in_threadgroup);
const int tid = int(thread_position_in_threadgroup.x);
const int split = int(threadgroup_position_in_grid.x);
const int g = int(threadgroup_position_in_grid.y);
const int b = int(threadgroup_position_in_grid.z);
const int H = int(q_shape[1]);
const int Hm = int(bias_shape[1]);
const int Tk = int(k_shape[2]);
const int S = (Tk + BLOCK - 1) / BLOCK;
const float scale = params[0];
const float hi = params[1];

// this lane's slice of the REP queries (pre-scaled) and of their outputs
float qr[REP][PL];
float o[REP][PL];
float mrun[REP];
float lrun[REP];
for (int r = 0; r < REP; ++r) {
  const int64_t qbase = int64_t(b) * q_strides[0] + int64_t(g * REP + r) * q_strides[1];
  for (int i = 0; i < PL; ++i) {
    const int d = lane + 32 * i;
    qr[r][i] = d < P ? scale * static_cast<float>(q[qbase + int64_t(d) * q_strides[3]]) : 0.0f;
    o[r][i] = 0.0f;
  }
  mrun[r] = DMA_NONE;
  lrun[r] = 0.0f;
}

// the key selection of each mask row this kv head reads
float thr[MH];
int jlim[MH];
int64_t bbase[MH];
for (int u = 0; u < MH; ++u) {
  const int hm = MASK_PER_HEAD ? g * REP + u : g;
  thr[u] = sel_thr[b * Hm + hm];
  jlim[u] = sel_jlim[b * Hm + hm];
  bbase[u] = int64_t(b) * bias_strides[0] + int64_t(hm) * bias_strides[1];
}
const int64_t vrow = valid_shape[0] > 1 ? int64_t(b) * Tk : 0;
const int64_t kbase = int64_t(b) * k_strides[0] + int64_t(g) * k_strides[1];
const int64_t vbase = int64_t(b) * v_strides[0] + int64_t(g) * v_strides[1];

const int start = split * BLOCK;
const int end = metal::min(start + BLOCK, Tk);
for (int j = start + w; j < end; j += NSG) {
  const bool vj = valid[vrow + j];
  bool kept[MH];
  float add[MH];
  bool any = false;
  for (int u = 0; u < MH; ++u) {
    const float m = bias[bbase[u] + int64_t(j) * bias_strides[2]];
    const bool empty = jlim[u] < 0;
    kept[u] = empty || dma_kept(vj, m, thr[u], jlim[u], j);
    add[u] = empty ? 0.0f : dma_addend<T>(m, hi);
    any = any || kept[u];
  }
  if (!any) {
    continue;  // same j and flags on every lane: the simdgroup skips this key's K and V
  }
  float kk[PL];
  float vv[PL];
  for (int i = 0; i < PL; ++i) {
    const int d = lane + 32 * i;
    kk[i] = d < P ? static_cast<float>(k[kbase + int64_t(j) * k_strides[2] + int64_t(d) * k_strides[3]]) : 0.0f;
    vv[i] = d < P ? static_cast<float>(v[vbase + int64_t(j) * v_strides[2] + int64_t(d) * v_strides[3]]) : 0.0f;
  }
  for (int r = 0; r < REP; ++r) {
    const int u = MASK_PER_HEAD ? r : 0;
    float dot = 0.0f;
    for (int i = 0; i < PL; ++i) {
      dot += qr[r][i] * kk[i];
    }
    dot = simd_sum(dot);
    if (!kept[u]) {
      continue;
    }
    const float s = jlim[u] < 0 ? 0.0f : dot + add[u];  // finite
    const float mnew = metal::max(mrun[r], s);
    const float corr = metal::exp(mrun[r] - mnew);  // 0 while mrun is -inf
    const float p = metal::exp(s - mnew);
    lrun[r] = lrun[r] * corr + p;
    for (int i = 0; i < PL; ++i) {
      o[r][i] = o[r][i] * corr + p * vv[i];
    }
    mrun[r] = mnew;
  }
}

// merge the NSG simdgroups of this block
for (int r = 0; r < REP; ++r) {
  for (int i = 0; i < PL; ++i) {
    const int d = lane + 32 * i;
    if (d < P) {
      tg_o[(w * REP + r) * P + d] = o[r][i];
    }
  }
  if (lane == 0) {
    tg_m[w * REP + r] = mrun[r];
    tg_l[w * REP + r] = lrun[r];
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int idx = tid; idx < REP * P; idx += NSG * 32) {
  const int r = idx / P;
  const int d = idx % P;
  float M = DMA_NONE;
  for (int ww = 0; ww < NSG; ++ww) {
    M = metal::max(M, tg_m[ww * REP + r]);
  }
  float Lsum = 0.0f;
  float O = 0.0f;
  for (int ww = 0; ww < NSG; ++ww) {
    const float mw = tg_m[ww * REP + r];
    const float e = metal::exp(mw - M);  // an empty simdgroup (mw = DMA_NONE) has l = o = 0
    Lsum += tg_l[ww * REP + r] * e;
    O += tg_o[(ww * REP + r) * P + d] * e;
  }
  const int64_t row = (int64_t(b) * H + g * REP + r) * S + split;
  part_o[row * P + d] = O;
  if (d == 0) {
    part_ml[row * 2] = M;  // -inf: no kept key in this block
    part_ml[row * 2 + 1] = Lsum;
  }
}
