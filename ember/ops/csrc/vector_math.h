// glibc's vector expf (libmvec), which math.h declares only under -ffast-math: lets `omp simd` loops over
// expf vectorise (linked with -lmvec).
#pragma once
#include <math.h>
#if defined(__x86_64__) && defined(__GLIBC__)
__attribute__((__simd__("notinbranch"))) extern float expf(float);
#endif
