// Shared by dma_decode.metal and dma_prefill.metal (each opens with
// `// #include "dma_common.metal"`): how the ops path treats one key once
// cheems_mlx.dma.key_selection has chosen the kept keys (threshold thr, tie limit jlim).

// "no kept key yet": a finite stand-in for -inf (Metal may compile with fast math, where
// infinities are not guaranteed); every real score is far above it
#define DMA_NONE (-3.0e38f)

template <typename T>
inline float dma_addend(float m, float hi) {
  // the ops path's mask value for a kept key: clip to the dtype's range, cast to T
  return static_cast<float>(static_cast<T>(metal::min(m, hi)));
}

inline bool dma_kept(bool valid, float m, float thr, int jlim, int j) {
  return valid && (m > thr || (m == thr && j < jlim));
}
