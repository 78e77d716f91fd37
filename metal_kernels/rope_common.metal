// Shared by ssd_step.metal and ssd_scan.metal (each opens with `// #include "rope_common.metal"`):
// the rotate-half RoPE of cheems_mlx.rope.RotaryEmbedding, one element at a time.

// rotate-half RoPE of one element: own = v[n], partner = v[n +- N/2], angle of frequency n mod N/2
inline float rope_rotate(float own, float partner, float cos_t, float sin_t, bool first_half) {
  // first half:  v[i] cos - v[i + N/2] sin;   second half: v[i + N/2] cos + v[i] sin
  return first_half ? own * cos_t - partner * sin_t : own * cos_t + partner * sin_t;
}
