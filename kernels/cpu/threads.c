/* How many threads an OpenMP parallel region of this library gets when it asks for `threads`: the count itself
 * where the library was built with OpenMP, 1 where the compiler had none (build.py drops -fopenmp then and the
 * pragmas are ignored). kernels/cpu openmp_threads asks once, so neither the start-up log nor the callers claim
 * threads the loops do not have. */

#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

int64_t openmp_team_size(int64_t threads) {
    int64_t n = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads((int)(threads < 1 ? 1 : threads))
    {
#pragma omp single
        n = omp_get_num_threads();
    }
#else
    (void)threads;
#endif
    return n;
}
