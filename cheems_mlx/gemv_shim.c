/* cblas_sgemm in front of a CBLAS library: matrix-vector products go to its cblas_sgemv.
 *
 * MLX's CPU backend runs every float32 matmul through cblas_sgemm, also the one-row products
 * of a decode step (x @ W.T with x: 1 x K). OpenBLAS before 0.3.27 runs those through its
 * packed GEMM, which reads W at about half the speed its sgemv does (measured here: a
 * 32768 x 512 float32 head 7.5 ms -> 3.9 ms). cheems_mlx/blas.py builds this file with the
 * system C compiler, loads it globally ahead of the BLAS and calls cheems_gemv_init with the
 * BLAS's path; every other CBLAS symbol MLX uses resolves to that BLAS.
 *
 * Row-major products go to sgemv when
 * - M == 1 or N == 1 (and K > 0): one sgemv;
 * - 2 <= M <= ROWS_MAX_M and B has at most ROWS_MAX_B elements: one sgemv a row. These are
 *   a decode step's attention over its cache (the query heads of a KV head: M = 2 for the
 *   default GQA) and the weight products of a short verification of drafted tokens; OpenBLAS's
 *   GEMM packs B for them and takes 1.3-2.5x as long (measured here: M = 2 against a
 *   768 x 128 cache 44 -> 23 us, against a 1024 x 512 weight 239 -> 95 us; from M = 8 on
 *   the GEMM wins).
 * An sgemv of fewer than PARALLEL_MIN multiply-adds (a 128 MB float32 matrix) runs on one
 * thread (OpenBLAS, through openblas_set_num_threads; other BLAS libraries keep their own
 * choice): after each parallel call OpenBLAS's other threads spin on sched_yield for ~0.1 s,
 * on the cores MLX's own two threads (the one building the graph, the one running it) need.
 * Measured here, decoding on 2 cores: the default model 15-25% faster on one thread, the
 * 55M Doge (a 64 MB head) the same either way; prefill's GEMMs keep every thread.
 * Everything else goes to the BLAS's own sgemm on all its threads.
 * With beta == 0 the output is zeroed first: MLX hands uninitialized memory, and a BLAS may
 * scale it by 0 (NaN * 0 is NaN) instead of overwriting it.
 */
#include <dlfcn.h>

enum { RowMajor = 101, NoTrans = 111, Trans = 112 };
enum { ROWS_MAX_M = 4 };
static const long ROWS_MAX_B = 1L << 22, PARALLEL_MIN = 1L << 25;
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float, float *, int);
typedef void (*threads_fn)(int);
typedef int (*get_threads_fn)(void);

static sgemm_fn blas_sgemm;
static sgemv_fn blas_sgemv;
static threads_fn blas_set_threads; /* openblas_set_num_threads, where the BLAS has it */
static int max_threads, threads_now;
static long routed;

static void use_threads(int n) {
  if (blas_set_threads && max_threads > 1 && n != threads_now) {
    blas_set_threads(n);
    threads_now = n;
  }
}

int cheems_gemv_init(const char *path) {
  void *lib = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
  if (!lib) return 1;
  blas_sgemm = (sgemm_fn)dlsym(lib, "cblas_sgemm");
  blas_sgemv = (sgemv_fn)dlsym(lib, "cblas_sgemv");
  blas_set_threads = (threads_fn)dlsym(lib, "openblas_set_num_threads");
  get_threads_fn get_threads = (get_threads_fn)dlsym(lib, "openblas_get_num_threads");
  max_threads = threads_now = get_threads ? get_threads() : 0;
  return !(blas_sgemm && blas_sgemv);
}

long cheems_gemv_routed(void) { return routed; }

/* C (M x N) = alpha op(A) op(B) + beta C, row i as one sgemv of row i of op(A) */
static void by_rows(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, const float *B,
                    int ldb, float beta, float *C, int ldc) {
  int incx = ta == NoTrans ? 1 : lda;
  for (int i = 0; i < M; i++) {
    const float *x = A + (ta == NoTrans ? (long)i * lda : i);
    float *c = C + (long)i * ldc;
    if (beta == 0.0f)
      for (int j = 0; j < N; j++) c[j] = 0.0f;
    if (tb == NoTrans) /* B: K x N */
      blas_sgemv(RowMajor, Trans, K, N, alpha, B, ldb, x, incx, beta, c, 1);
    else /* B stored N x K */
      blas_sgemv(RowMajor, NoTrans, N, K, alpha, B, ldb, x, incx, beta, c, 1);
  }
}

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
  long work = (long)M * N * K;
  /* the strides sgemv accepts; anything else stays with sgemm */
  int rows_ok = order == RowMajor && K > 0 && (ta == NoTrans || lda >= 1) && ldb >= (tb == NoTrans ? N : K)
                && ldb >= 1;
  if (rows_ok && (M == 1 || (M <= ROWS_MAX_M && (long)N * K <= ROWS_MAX_B && ldc >= N && lda >= (ta == NoTrans ? K : M)))) {
    routed++;
    use_threads(work < PARALLEL_MIN ? 1 : max_threads);
    by_rows(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  if (order == RowMajor && K > 0 && N == 1 && (tb == NoTrans ? ldb >= 1 : 1) && lda >= (ta == NoTrans ? K : M)
      && lda >= 1 && ldc >= 1) { /* C (M x 1, row stride ldc) = op(A) x; x = column 0 of op(B) */
    routed++;
    use_threads(work < PARALLEL_MIN ? 1 : max_threads);
    if (beta == 0.0f)
      for (int i = 0; i < M; i++) C[(long)i * ldc] = 0.0f;
    int incx = tb == NoTrans ? ldb : 1;
    if (ta == NoTrans) /* A: M x K */
      blas_sgemv(RowMajor, NoTrans, M, K, alpha, A, lda, B, incx, beta, C, ldc);
    else /* A stored K x M */
      blas_sgemv(RowMajor, Trans, K, M, alpha, A, lda, B, incx, beta, C, ldc);
    return;
  }
  use_threads(max_threads);
  blas_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
