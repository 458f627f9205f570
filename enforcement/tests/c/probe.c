/* A CUDA application for the tests: it reaches the driver one of three ways and reports what
 * it sees, one "key=value" line per fact.
 *
 *   probe PATH COMMAND [ARGS]
 *   PATH: direct (linked against libcuda), dlsym (dlopen + dlsym), procaddr (cuGetProcAddress
 *         with base names, as CUDA 12 runtimes do)
 *   fill MIB               allocate MIB chunks until refused; report count, error, meminfo
 *   refill MIB             fill, free everything, fill again
 *   try MIB                one allocation
 *   hold MIB               allocate, print held=1, then sleep until killed
 *   apis MIB               each allocation API once (and its free)
 *   legacy MIB             the CUDA 2.x entry points (cuMemAlloc, ... resolved by base name, or
 *                          by cuGetProcAddress with version 2000): fill with MIB chunks, then
 *                          each other allocation API once (and its free)
 *   vmm MIB                cuMemCreate MIB, map it, release the handle while mapped, try a
 *                          cuMemAlloc of MIB, unmap, try again; then the same with a retained
 *                          reference (cuMemRetainAllocationHandle)
 *   deepbind MIB HOW       dlopen libdeepbound.so with RTLD_DEEPBIND and let it fill the device
 *                          with MIB chunks, reaching the driver by linking (HOW = linked) or by
 *                          dlsym (HOW = dlsym); report how many it got
 *   forkdie MIB HOW        after a cuMemGetInfo (the library is in use), fork a child that
 *                          allocates MIB and dies without freeing (HOW = exit: _exit; kill:
 *                          SIGKILL); then the parent reports what is free and allocates MIB
 *   meminfo                cuMemGetInfo and cuDeviceTotalMem
 *   nvml                   NVML's memory info for device 0 (v1 and v2)
 *   launch SECONDS GRID    launch GRID-block kernels in a loop; report the busy share
 *   graphs SECONDS         launch a graph (STUB_GRAPH_NS of work) in a loop; report the busy
 *                          share
 *   threads N MIB          8 threads each hold MIB until all tried once, then N
 *                          alloc+free pairs of MIB each; then meminfo
 *   bench N                ns per alloc+free pair and per launch
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <signal.h>
#include <sys/wait.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef struct { unsigned kind, handle_types, loc_type; int loc_id; void *win32; unsigned long long flags; } Prop;
typedef struct { size_t w, h; unsigned fmt, ch; } ArrayDesc;
typedef struct { size_t w, h, d; unsigned fmt, ch, flags; } Array3DDesc;
typedef struct { unsigned grid[3], block[3], shmem; void *stream; void *attrs; unsigned nattrs; } LaunchConfig;

extern CUresult cuInit(unsigned);
extern CUresult cuCtxCreate_v2(void **, unsigned, int);
extern CUresult cuMemAlloc_v2(CUdeviceptr *, size_t);
extern CUresult cuMemFree_v2(CUdeviceptr);
extern CUresult cuMemGetInfo_v2(size_t *, size_t *);
extern CUresult cuDeviceTotalMem_v2(size_t *, int);
extern CUresult cuMemAllocPitch_v2(CUdeviceptr *, size_t *, size_t, size_t, unsigned);
extern CUresult cuMemAllocManaged(CUdeviceptr *, size_t, unsigned);
extern CUresult cuMemAllocAsync(CUdeviceptr *, size_t, void *);
extern CUresult cuMemFreeAsync(CUdeviceptr, void *);
extern CUresult cuMemAllocFromPoolAsync(CUdeviceptr *, size_t, void *, void *);
extern CUresult cuMemCreate(unsigned long long *, size_t, const Prop *, unsigned long long);
extern CUresult cuMemRelease(unsigned long long);
extern CUresult cuArrayCreate_v2(void **, const ArrayDesc *);
extern CUresult cuArray3DCreate_v2(void **, const Array3DDesc *);
extern CUresult cuArrayDestroy(void *);
extern CUresult cuLaunchKernel(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *, void **, void **);
extern CUresult cuLaunchKernelEx(const LaunchConfig *, void *, void **, void **);
extern CUresult cuCtxSynchronize(void);
extern CUresult cuGraphLaunch(void *, void *);
extern CUresult cuMipmappedArrayCreate(void **, const Array3DDesc *, unsigned);
extern CUresult cuMipmappedArrayDestroy(void *);
typedef struct { unsigned w, h, fmt, ch; } ArrayDescV1;
typedef struct { unsigned w, h, d, fmt, ch, flags; } Array3DDescV1;
extern CUresult cuMemAlloc(unsigned *, unsigned);
extern CUresult cuMemAllocPitch(unsigned *, unsigned *, unsigned, unsigned, unsigned);
extern CUresult cuMemFree(unsigned);
extern CUresult cuArrayCreate(void **, const ArrayDescV1 *);
extern CUresult cuArray3DCreate(void **, const Array3DDescV1 *);
extern CUresult cuMemGetInfo(unsigned *, unsigned *);
extern CUresult cuDeviceTotalMem(unsigned *, int);
extern CUresult cuMemAddressReserve(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
extern CUresult cuMemMap(CUdeviceptr, size_t, size_t, unsigned long long, unsigned long long);
extern CUresult cuMemUnmap(CUdeviceptr, size_t);
extern CUresult cuMemRetainAllocationHandle(unsigned long long *, void *);
extern size_t stub_used_bytes(int);
extern unsigned long long stub_now_ns(void);
extern unsigned long long stub_busy_ns(int, unsigned long long, unsigned long long);

static struct {
  CUresult (*init)(unsigned);
  CUresult (*ctx_create)(void **, unsigned, int);
  CUresult (*alloc)(CUdeviceptr *, size_t);
  CUresult (*free)(CUdeviceptr);
  CUresult (*meminfo)(size_t *, size_t *);
  CUresult (*totalmem)(size_t *, int);
  CUresult (*pitch)(CUdeviceptr *, size_t *, size_t, size_t, unsigned);
  CUresult (*managed)(CUdeviceptr *, size_t, unsigned);
  CUresult (*alloc_async)(CUdeviceptr *, size_t, void *);
  CUresult (*free_async)(CUdeviceptr, void *);
  CUresult (*alloc_pool)(CUdeviceptr *, size_t, void *, void *);
  CUresult (*create)(unsigned long long *, size_t, const Prop *, unsigned long long);
  CUresult (*release)(unsigned long long);
  CUresult (*array)(void **, const ArrayDesc *);
  CUresult (*array3d)(void **, const Array3DDesc *);
  CUresult (*array_destroy)(void *);
  CUresult (*launch)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *, void **, void **);
  CUresult (*launch_ex)(const LaunchConfig *, void *, void **, void **);
  CUresult (*sync)(void);
  CUresult (*graph)(void *, void *);
  CUresult (*mipmap)(void **, const Array3DDesc *, unsigned);
  CUresult (*mipmap_destroy)(void *);
  CUresult (*reserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
  CUresult (*map)(CUdeviceptr, size_t, size_t, unsigned long long, unsigned long long);
  CUresult (*unmap)(CUdeviceptr, size_t);
  CUresult (*retain)(unsigned long long *, void *);
} cu;

/* The legacy entry points, resolved only by the legacy command. */
static struct {
  CUresult (*alloc)(unsigned *, unsigned);
  CUresult (*pitch)(unsigned *, unsigned *, unsigned, unsigned, unsigned);
  CUresult (*free)(unsigned);
  CUresult (*array)(void **, const ArrayDescV1 *);
  CUresult (*array3d)(void **, const Array3DDescV1 *);
  CUresult (*meminfo)(unsigned *, unsigned *);
  CUresult (*totalmem)(unsigned *, int);
} v1;

static void *resolve(const char *path, void *lib, CUresult (*gpa)(const char *, void **, int, unsigned long long, int *),
                     const char *versioned, const char *base) {
  void *fn = NULL;
  if (strcmp(path, "dlsym") == 0) fn = dlsym(lib, versioned);
  if (strcmp(path, "procaddr") == 0) {
    int status = -1;
    int version = strcmp(versioned, base) == 0 && getenv("PROBE_CUDA_VERSION") ? atoi(getenv("PROBE_CUDA_VERSION")) : 12040;
    if (gpa(base, &fn, version, 0, &status) != 0) fn = NULL;
  }
  if (!fn) { fprintf(stderr, "probe: cannot resolve %s\n", versioned); exit(3); }
  return fn;
}

static void load(const char *path) {
  if (strcmp(path, "direct") == 0) {
    cu.init = cuInit; cu.ctx_create = cuCtxCreate_v2; cu.alloc = cuMemAlloc_v2; cu.free = cuMemFree_v2;
    cu.meminfo = cuMemGetInfo_v2; cu.totalmem = cuDeviceTotalMem_v2; cu.pitch = cuMemAllocPitch_v2;
    cu.managed = cuMemAllocManaged; cu.alloc_async = cuMemAllocAsync; cu.free_async = cuMemFreeAsync;
    cu.alloc_pool = cuMemAllocFromPoolAsync; cu.create = cuMemCreate; cu.release = cuMemRelease;
    cu.array = cuArrayCreate_v2; cu.array3d = cuArray3DCreate_v2; cu.array_destroy = cuArrayDestroy;
    cu.launch = cuLaunchKernel; cu.launch_ex = cuLaunchKernelEx; cu.sync = cuCtxSynchronize;
    cu.graph = cuGraphLaunch;
    cu.mipmap = cuMipmappedArrayCreate; cu.mipmap_destroy = cuMipmappedArrayDestroy;
    cu.reserve = cuMemAddressReserve; cu.map = cuMemMap; cu.unmap = cuMemUnmap;
    cu.retain = cuMemRetainAllocationHandle;
    v1.alloc = cuMemAlloc; v1.pitch = cuMemAllocPitch; v1.free = cuMemFree; v1.array = cuArrayCreate;
    v1.array3d = cuArray3DCreate; v1.meminfo = cuMemGetInfo; v1.totalmem = cuDeviceTotalMem;
    return;
  }
  void *lib = dlopen("libcuda.so.1", RTLD_NOW);
  if (!lib) { fprintf(stderr, "probe: %s\n", dlerror()); exit(3); }
  CUresult (*gpa)(const char *, void **, int, unsigned long long, int *) = dlsym(lib, "cuGetProcAddress_v2");
  if (!gpa) { fprintf(stderr, "probe: no cuGetProcAddress_v2\n"); exit(3); }
#define R(field, v, b) cu.field = resolve(path, lib, gpa, v, b)
  R(init, "cuInit", "cuInit"); R(ctx_create, "cuCtxCreate_v2", "cuCtxCreate");
  R(alloc, "cuMemAlloc_v2", "cuMemAlloc"); R(free, "cuMemFree_v2", "cuMemFree");
  R(meminfo, "cuMemGetInfo_v2", "cuMemGetInfo"); R(totalmem, "cuDeviceTotalMem_v2", "cuDeviceTotalMem");
  R(pitch, "cuMemAllocPitch_v2", "cuMemAllocPitch"); R(managed, "cuMemAllocManaged", "cuMemAllocManaged");
  R(alloc_async, "cuMemAllocAsync", "cuMemAllocAsync"); R(free_async, "cuMemFreeAsync", "cuMemFreeAsync");
  R(alloc_pool, "cuMemAllocFromPoolAsync", "cuMemAllocFromPoolAsync"); R(create, "cuMemCreate", "cuMemCreate");
  R(release, "cuMemRelease", "cuMemRelease"); R(array, "cuArrayCreate_v2", "cuArrayCreate");
  R(array3d, "cuArray3DCreate_v2", "cuArray3DCreate"); R(array_destroy, "cuArrayDestroy", "cuArrayDestroy");
  R(launch, "cuLaunchKernel", "cuLaunchKernel"); R(launch_ex, "cuLaunchKernelEx", "cuLaunchKernelEx");
  R(sync, "cuCtxSynchronize", "cuCtxSynchronize"); R(graph, "cuGraphLaunch", "cuGraphLaunch");
  R(mipmap, "cuMipmappedArrayCreate", "cuMipmappedArrayCreate");
  R(mipmap_destroy, "cuMipmappedArrayDestroy", "cuMipmappedArrayDestroy");
  R(reserve, "cuMemAddressReserve", "cuMemAddressReserve"); R(map, "cuMemMap", "cuMemMap");
  R(unmap, "cuMemUnmap", "cuMemUnmap"); R(retain, "cuMemRetainAllocationHandle", "cuMemRetainAllocationHandle");
#undef R
  /* The base names with an old version: what a CUDA 2.x-era caller gets. */
  setenv("PROBE_CUDA_VERSION", "2000", 0);
#define V(field, name) v1.field = resolve(path, lib, gpa, name, name)
  V(alloc, "cuMemAlloc"); V(pitch, "cuMemAllocPitch"); V(free, "cuMemFree"); V(array, "cuArrayCreate");
  V(array3d, "cuArray3DCreate"); V(meminfo, "cuMemGetInfo"); V(totalmem, "cuDeviceTotalMem");
#undef V
}

static void meminfo(void) {
  size_t free_b = 0, total = 0, devtotal = 0;
  CUresult rc = cu.meminfo(&free_b, &total);
  cu.totalmem(&devtotal, 0);
  printf("meminfo_rc=%d\nfree_mib=%zu\ntotal_mib=%zu\ndevice_total_mib=%zu\n", rc, free_b >> 20, total >> 20, devtotal >> 20);
}

static CUdeviceptr ptrs[100000];

static int fill(size_t mib, CUresult *last) {
  int n = 0;
  while (n < 100000) {
    CUresult rc = cu.alloc(&ptrs[n], mib << 20);
    if (rc != 0) { *last = rc; break; }
    n++;
  }
  return n;
}

static void *ctx_for_threads;
static long thread_iterations;
static size_t thread_bytes;
static int thread_failures;
extern CUresult cuCtxSetCurrent(void *);

static pthread_barrier_t all_attempted;

static void *churn(void *arg) {
  (void)arg;
  cuCtxSetCurrent(ctx_for_threads);
  /* First round: every thread holds what it got until all have tried, so the
   * limit is contended deterministically even on one core. */
  CUdeviceptr first;
  int got = cu.alloc(&first, thread_bytes) == 0;
  if (!got) __atomic_add_fetch(&thread_failures, 1, __ATOMIC_RELAXED);
  pthread_barrier_wait(&all_attempted);
  if (got) cu.free(first);
  for (long i = 0; i < thread_iterations; i++) {
    CUdeviceptr p;
    if (cu.alloc(&p, thread_bytes) != 0) { __atomic_add_fetch(&thread_failures, 1, __ATOMIC_RELAXED); continue; }
    cu.free(p);
  }
  return NULL;
}

int main(int argc, char **argv) {
  if (argc < 3) { fprintf(stderr, "usage: probe PATH COMMAND [ARGS]\n"); return 2; }
  const char *cmd = argv[2];
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (strcmp(cmd, "nvml") == 0) {
    void *lib = dlopen("libnvidia-ml.so.1", RTLD_NOW);
    if (!lib) { fprintf(stderr, "probe: %s\n", dlerror()); return 3; }
    int (*init)(void) = dlsym(lib, "nvmlInit_v2");
    int (*by_index)(unsigned, void **) = dlsym(lib, "nvmlDeviceGetHandleByIndex_v2");
    int (*info)(void *, unsigned long long *) = dlsym(lib, "nvmlDeviceGetMemoryInfo");
    int (*info2)(void *, void *) = dlsym(lib, "nvmlDeviceGetMemoryInfo_v2");
    unsigned index = argc > 3 ? (unsigned)atoi(argv[3]) : 0;
    void *dev;
    unsigned long long m[3];
    struct { unsigned version; unsigned long long total, reserved, free, used; } m2 = {0};
    init();
    by_index(index, &dev);
    info(dev, m);
    info2(dev, &m2);
    printf("nvml_total_mib=%llu\nnvml_free_mib=%llu\nnvml_used_mib=%llu\n", m[0] >> 20, m[1] >> 20, m[2] >> 20);
    printf("nvml2_total_mib=%llu\nnvml2_free_mib=%llu\nnvml2_used_mib=%llu\n", m2.total >> 20, m2.free >> 20, m2.used >> 20);
    return 0;
  }
  load(argv[1]);
  void *ctx;
  cu.init(0);
  int device = getenv("PROBE_DEVICE") ? atoi(getenv("PROBE_DEVICE")) : 0;
  if (cu.ctx_create(&ctx, 0, device) != 0) { fprintf(stderr, "probe: no context\n"); return 3; }
  if (strcmp(cmd, "fill") == 0 || strcmp(cmd, "refill") == 0) {
    size_t mib = (size_t)atol(argv[3]);
    CUresult last = 0;
    int n = fill(mib, &last);
    printf("allocated=%d\nerror=%d\n", n, last);
    meminfo();
    if (strcmp(cmd, "refill") == 0) {
      for (int i = 0; i < n; i++) cu.free(ptrs[i]);
      printf("after_free_free_mib=");
      size_t f = 0, t = 0;
      cu.meminfo(&f, &t);
      printf("%zu\n", f >> 20);
      n = fill(mib, &last);
      printf("reallocated=%d\n", n);
    }
    return 0;
  }
  if (strcmp(cmd, "try") == 0) {
    CUdeviceptr p;
    printf("rc=%d\n", cu.alloc(&p, (size_t)atol(argv[3]) << 20));
    return 0;
  }
  if (strcmp(cmd, "hold") == 0) {
    CUdeviceptr p;
    CUresult rc = cu.alloc(&p, (size_t)atol(argv[3]) << 20);
    printf("held=%d\n", rc == 0);
    for (;;) pause();
  }
  if (strcmp(cmd, "meminfo") == 0) { meminfo(); return 0; }
  if (strcmp(cmd, "apis") == 0) {
    size_t bytes = (size_t)atol(argv[3]) << 20;
    CUdeviceptr p; size_t pitch; void *arr; unsigned long long h; size_t f, t;
    CUresult rc;
#define REPORT(name, expr, undo) rc = (expr); cu.meminfo(&f, &t); printf(name "=%d\n" name "_free_mib=%zu\n", rc, f >> 20); if (rc == 0) { undo; }
    REPORT("pitch", cu.pitch(&p, &pitch, 1000, bytes / 1024, 4), cu.free(p));
    REPORT("managed", cu.managed(&p, bytes, 1), cu.free(p));
    REPORT("async", cu.alloc_async(&p, bytes, NULL), cu.free_async(p, NULL));
    REPORT("pool", cu.alloc_pool(&p, bytes, NULL, NULL), cu.free_async(p, NULL));
    Prop prop = {1, 0, 1, device, NULL, 0};
    REPORT("vmm", cu.create(&h, bytes, &prop, 0), cu.release(h));
    ArrayDesc ad = {1024, bytes / 4096, 0x20, 1};
    REPORT("array", cu.array(&arr, &ad), cu.array_destroy(arr));
    Array3DDesc a3 = {1024, 1024, bytes / (4096 * 1024), 0x20, 1, 0};
    REPORT("array3d", cu.array3d(&arr, &a3), cu.array_destroy(arr));
    Array3DDesc mip = {1024, bytes / 4096, 0, 0x20, 1, 0};
    REPORT("mipmap", cu.mipmap(&arr, &mip, 1), cu.mipmap_destroy(arr));
#undef REPORT
    meminfo();
    return 0;
  }
  if (strcmp(cmd, "vmm") == 0) {
    size_t bytes = (size_t)atol(argv[3]) << 20, f, t;
    Prop prop = {1, 0, 1, device, NULL, 0};
    unsigned long long h, again;
    CUdeviceptr va, p;
    CUresult rc;
#define STEP(name) cu.meminfo(&f, &t); printf(name "_free_mib=%zu\n" name "_device_used_mib=%zu\n", f >> 20, stub_used_bytes(device) >> 20)
#define TRY(name) rc = cu.alloc(&p, bytes); printf(name "=%d\n", rc); if (rc == 0) cu.free(p)
    cu.reserve(&va, bytes, 0, 0, 0);
    printf("create=%d\n", cu.create(&h, bytes, &prop, 0));
    printf("map=%d\n", cu.map(va, bytes, 0, h, 0));
    printf("release=%d\n", cu.release(h));
    STEP("mapped"); TRY("alloc_while_mapped");
    printf("unmap=%d\n", cu.unmap(va, bytes));
    STEP("unmapped"); TRY("alloc_after_unmap");
    /* A retained reference keeps the memory after the unmap, until its own release. */
    cu.create(&h, bytes, &prop, 0);
    cu.map(va, bytes, 0, h, 0);
    printf("retain=%d\n", cu.retain(&again, (void *)(uintptr_t)va));
    cu.release(h);
    cu.unmap(va, bytes);
    STEP("retained"); TRY("alloc_while_retained");
    cu.release(again);
    STEP("released"); TRY("alloc_after_release");
#undef STEP
#undef TRY
    return 0;
  }
  if (strcmp(cmd, "deepbind") == 0) {
    void *deep = dlopen("libdeepbound.so", RTLD_NOW | RTLD_DEEPBIND);
    if (!deep) { fprintf(stderr, "probe: %s\n", dlerror()); return 3; }
    int (*deep_fill)(size_t, int) = (int (*)(size_t, int))dlsym(deep, "deep_fill");
    if (!deep_fill) { fprintf(stderr, "probe: no deep_fill\n"); return 3; }
    printf("allocated=%d\n", deep_fill((size_t)atol(argv[3]), strcmp(argv[4], "dlsym") == 0));
    return 0;
  }
  if (strcmp(cmd, "forkdie") == 0) {
    size_t bytes = (size_t)atol(argv[3]) << 20, f, t;
    CUdeviceptr p;
    cu.meminfo(&f, &t);
    pid_t child = fork();
    if (child < 0) { perror("fork"); return 3; }
    if (child == 0) {
      printf("child_alloc=%d\n", cu.alloc(&p, bytes));
      if (strcmp(argv[4], "kill") == 0) raise(SIGKILL);
      _exit(0);
    }
    int status;
    waitpid(child, &status, 0);
    cu.meminfo(&f, &t);
    printf("parent_free_mib=%zu\n", f >> 20);
    printf("parent_alloc=%d\n", cu.alloc(&p, bytes));
    return 0;
  }
  if (strcmp(cmd, "legacy") == 0) {
    size_t mib = (size_t)atol(argv[3]);
    unsigned held[8], p, pitch, f, t, devtotal = 0;
    void *arr;
    int n = 0;
    CUresult rc = 0;
    /* At most 8: 32-bit pointers run out past 4 GiB. */
    while (n < 8 && (rc = v1.alloc(&held[n], (unsigned)(mib << 20))) == 0) n++;
    printf("allocated=%d\nerror=%d\n", n, rc);
    v1.meminfo(&f, &t);
    v1.totalmem(&devtotal, device);
    printf("v1_free_mib=%u\nv1_total_mib=%u\nv1_device_total_mib=%u\n", f >> 20, t >> 20, devtotal >> 20);
    for (int i = 0; i < n; i++) v1.free(held[i]);
#define REPORT(name, expr, undo) rc = (expr); v1.meminfo(&f, &t); printf(name "=%d\n" name "_free_mib=%u\n", rc, f >> 20); if (rc == 0) { undo; }
    REPORT("pitch", v1.pitch(&p, &pitch, 1000, (unsigned)((mib << 20) / 1024), 4), v1.free(p));
    ArrayDescV1 ad = {1024, (unsigned)((mib << 20) / 4096), 0x20, 1};
    REPORT("array", v1.array(&arr, &ad), cu.array_destroy(arr));
    Array3DDescV1 a3 = {1024, 1024, (unsigned)((mib << 20) / (4096 * 1024)), 0x20, 1, 0};
    REPORT("array3d", v1.array3d(&arr, &a3), cu.array_destroy(arr));
#undef REPORT
    v1.meminfo(&f, &t);
    printf("end_free_mib=%u\n", f >> 20);
    return 0;
  }
  if (strcmp(cmd, "launch") == 0) {
    double seconds = atof(argv[3]);
    unsigned grid = (unsigned)atoi(argv[4]);
    unsigned long long start = stub_now_ns(), warm = start + 1000000000ull;
    unsigned long long end = start + (unsigned long long)(seconds * 1e9);
    unsigned long long launches = 0;
    LaunchConfig lc = {{grid, 1, 1}, {128, 1, 1}, 0, NULL, NULL, 0};
    while (stub_now_ns() < end) {
      CUresult rc = (launches & 1) ? cu.launch_ex(&lc, NULL, NULL, NULL)
                                   : cu.launch(NULL, grid, 1, 1, 128, 1, 1, 0, NULL, NULL, NULL);
      if (rc != 0) { printf("launch_error=%d\n", rc); return 1; }
      launches++;
    }
    unsigned long long stop = stub_now_ns();
    printf("launches=%llu\nbusy=%.3f\n", launches, (double)stub_busy_ns(device, warm, stop) / (double)(stop - warm));
    return 0;
  }
  if (strcmp(cmd, "graphs") == 0) {
    unsigned long long start = stub_now_ns(), warm = start + 1000000000ull;
    unsigned long long end = start + (unsigned long long)(atof(argv[3]) * 1e9), launches = 0;
    while (stub_now_ns() < end) {
      CUresult rc = cu.graph((void *)0x1234, NULL);
      if (rc != 0) { printf("launch_error=%d\n", rc); return 1; }
      launches++;
    }
    unsigned long long stop = stub_now_ns();
    printf("launches=%llu\nbusy=%.3f\n", launches, (double)stub_busy_ns(device, warm, stop) / (double)(stop - warm));
    return 0;
  }
  if (strcmp(cmd, "threads") == 0) {
    pthread_t t[8];
    ctx_for_threads = ctx;
    thread_iterations = atol(argv[3]);
    thread_bytes = (size_t)atol(argv[4]) << 20;
    pthread_barrier_init(&all_attempted, NULL, 8);
    for (int i = 0; i < 8; i++) pthread_create(&t[i], NULL, churn, NULL);
    for (int i = 0; i < 8; i++) pthread_join(t[i], NULL);
    printf("refused=%d\n", thread_failures);
    meminfo();
    return 0;
  }
  if (strcmp(cmd, "bench") == 0) {
    long n = atol(argv[3]);
    CUdeviceptr p;
    unsigned long long t0 = stub_now_ns();
    for (long i = 0; i < n; i++) { cu.alloc(&p, 1 << 20); cu.free(p); }
    unsigned long long t1 = stub_now_ns();
    for (long i = 0; i < n; i++) cu.launch(NULL, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL);
    unsigned long long t2 = stub_now_ns();
    size_t f, t;
    for (long i = 0; i < n; i++) cu.meminfo(&f, &t);
    unsigned long long t3 = stub_now_ns();
    printf("alloc_free_ns=%.1f\nlaunch_ns=%.1f\nmeminfo_ns=%.1f\n", (double)(t1 - t0) / n, (double)(t2 - t1) / n, (double)(t3 - t2) / n);
    return 0;
  }
  fprintf(stderr, "probe: unknown command %s\n", cmd);
  return 2;
}
