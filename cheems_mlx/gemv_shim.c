/* cblas_sgemm in front of a CBLAS library: matrix-vector products go to its cblas_sgemv.
 *
 * MLX's CPU backend runs every float32 matmul through cblas_sgemm, also the one-row products
 * of a decode step (x @ W.T with x: 1 x K). OpenBLAS before 0.3.27 runs those through its
 * packed GEMM, which reads W at about half the speed its sgemv does (measured here: a
 * 32768 x 512 float32 head 7.5 ms -> 3.9 ms). cheems_mlx/blas.py builds this file with the
 * system C compiler, loads it globally ahead of the BLAS and calls cheems_gemv_init with the
 * BLAS's path; every other CBLAS symbol MLX uses resolves to that BLAS. Row-major products
 * with M == 1 or N == 1 (and K > 0) go to sgemv, everything else to the BLAS's own sgemm.
 * With beta == 0 the output is zeroed first: MLX hands uninitialized memory, and a BLAS may
 * scale it by 0 (NaN * 0 is NaN) instead of overwriting it.
 */
#include <dlfcn.h>

enum { RowMajor = 101, NoTrans = 111, Trans = 112 };
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float, float *, int);

static sgemm_fn blas_sgemm;
static sgemv_fn blas_sgemv;
static long routed;

int cheems_gemv_init(const char *path) {
  void *lib = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
  if (!lib) return 1;
  blas_sgemm = (sgemm_fn)dlsym(lib, "cblas_sgemm");
  blas_sgemv = (sgemv_fn)dlsym(lib, "cblas_sgemv");
  return !(blas_sgemm && blas_sgemv);
}

long cheems_gemv_routed(void) { return routed; }

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
  int as_gemv = order == RowMajor && K > 0 && (M == 1 || N == 1);
  if (as_gemv && M == 1) /* the strides sgemv accepts; anything else stays with sgemm */
    as_gemv = (ta == NoTrans || lda >= 1) && ldb >= (tb == NoTrans ? N : K) && ldb >= 1;
  else if (as_gemv)
    as_gemv = (tb == NoTrans ? ldb >= 1 : 1) && lda >= (ta == NoTrans ? K : M) && lda >= 1 && ldc >= 1;
  if (as_gemv) {
    routed++;
    if (M == 1) { /* C (1 x N) = x op(B); x = row 0 of op(A) */
      if (beta == 0.0f)
        for (int j = 0; j < N; j++) C[j] = 0.0f;
      int incx = ta == NoTrans ? 1 : lda;
      if (tb == NoTrans) /* B: K x N */
        blas_sgemv(RowMajor, Trans, K, N, alpha, B, ldb, A, incx, beta, C, 1);
      else /* B stored N x K */
        blas_sgemv(RowMajor, NoTrans, N, K, alpha, B, ldb, A, incx, beta, C, 1);
    } else { /* C (M x 1, row stride ldc) = op(A) x; x = column 0 of op(B) */
      if (beta == 0.0f)
        for (int i = 0; i < M; i++) C[(long)i * ldc] = 0.0f;
      int incx = tb == NoTrans ? ldb : 1;
      if (ta == NoTrans) /* A: M x K */
        blas_sgemv(RowMajor, NoTrans, M, K, alpha, A, lda, B, incx, beta, C, ldc);
      else /* A stored K x M */
        blas_sgemv(RowMajor, Trans, K, M, alpha, A, lda, B, incx, beta, C, ldc);
    }
    return;
  }
  blas_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
