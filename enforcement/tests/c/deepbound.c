/* A library that an application opens with RTLD_DEEPBIND: its own references (cuMemAlloc_v2,
 * dlsym) bind to its dependencies (libcuda, libc) before the global scope, where the preloaded
 * library is. deep_fill allocates MIB chunks until refused, frees them, and returns how many it
 * got: reaching the driver by linking (use_dlsym 0) or by dlopen + dlsym (1). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
extern CUresult cuMemAlloc_v2(CUdeviceptr *, size_t);
extern CUresult cuMemFree_v2(CUdeviceptr);

static CUdeviceptr held[100000];

int deep_fill(size_t mib, int use_dlsym) {
  CUresult (*alloc)(CUdeviceptr *, size_t) = cuMemAlloc_v2;
  CUresult (*release)(CUdeviceptr) = cuMemFree_v2;
  if (use_dlsym) {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) return -1;
    alloc = (CUresult (*)(CUdeviceptr *, size_t))dlsym(lib, "cuMemAlloc_v2");
    release = (CUresult (*)(CUdeviceptr))dlsym(lib, "cuMemFree_v2");
    if (!alloc || !release) return -1;
  }
  int n = 0;
  while (n < 100000 && alloc(&held[n], mib << 20) == 0) n++;
  for (int i = 0; i < n; i++) release(held[i]);
  return n;
}
