// The instruction set this library was compiled for (isa.h's choice, from the compiler's macros): "avx512_vnni",
// "avx512", "avx2_vnni", "avx2" or "portable".
#include "isa.h"

const char* ember_isa(void) { return ISA_NAME; }
