/* A simulated libcuda.so.1 for testing libvgpu without a GPU.
 *
 * Devices: STUB_CUDA_DEVICES (default 2), each with STUB_CUDA_MEMORY_MIB of memory (default
 * 81559, an H100). Allocations succeed until the device is full. Kernels run on a simulated
 * timeline: a launch of N blocks keeps the device busy N * STUB_NS_PER_BLOCK ns (default 1000)
 * after the previous kernel ends, and a launch blocks while more than 2 ms of work is queued,
 * like a full launch queue. Build with -Wl,-Bsymbolic so that the addresses cuGetProcAddress
 * hands out are the stub's own functions, as with the real driver. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void *CUcontext;
typedef void *CUstream;
typedef void *CUfunction;
typedef void *CUarray;
typedef unsigned long long CUmemGenericAllocationHandle;

#define CUDA_SUCCESS 0
#define CUDA_ERROR_INVALID_VALUE 1
#define CUDA_ERROR_OUT_OF_MEMORY 2
#define CUDA_ERROR_INVALID_DEVICE 101
#define CUDA_ERROR_INVALID_CONTEXT 201
#define CUDA_ERROR_NOT_FOUND 500
#define MAX_DEV 16
#define MAX_ALLOCS 65536
#define QUEUE_NS 2000000ull
#define LOG_SIZE 65536

typedef struct { unsigned kind, handle_types, loc_type; int loc_id; } PropHead;
typedef struct { size_t w, h; unsigned fmt, ch; } ArrayDesc;
typedef struct { size_t w, h, d; unsigned fmt, ch, flags; } Array3DDesc;
typedef struct { unsigned grid[3], block[3], shmem; CUstream stream; } LaunchConfigHead;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static size_t used_bytes[MAX_DEV];
static int has_context[MAX_DEV];
static unsigned long long next_address = 0x7f0000000000ull;
/* The legacy entry points hand out 32-bit pointers. */
static unsigned long long next_low = 0x10000000ull;
static struct { unsigned long long key; int dev; size_t size; int live; int refs; } allocs[MAX_ALLOCS];
static __thread int current = -1;
static unsigned long long busy_until[MAX_DEV];
static struct { unsigned long long start, end; } busy_log[MAX_DEV][LOG_SIZE];
static unsigned long long busy_next[MAX_DEV];

static long env_long(const char *name, long fallback) {
  const char *v = getenv(name);
  return v && *v ? strtol(v, NULL, 10) : fallback;
}
static int devices(void) { return (int)env_long("STUB_CUDA_DEVICES", 2); }
static size_t capacity(void) { return (size_t)env_long("STUB_CUDA_MEMORY_MIB", 81559) << 20; }
unsigned long long stub_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (unsigned long long)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

CUresult cuInit(unsigned flags) { (void)flags; return CUDA_SUCCESS; }
CUresult cuDriverGetVersion(int *v) { *v = 12040; return CUDA_SUCCESS; }
CUresult cuDeviceGetCount(int *n) { *n = devices(); return CUDA_SUCCESS; }
CUresult cuDeviceGet(CUdevice *d, int ordinal) {
  if (ordinal < 0 || ordinal >= devices()) return CUDA_ERROR_INVALID_DEVICE;
  *d = ordinal;
  return CUDA_SUCCESS;
}
CUresult cuDeviceGetUuid(unsigned char *uuid, CUdevice d) {
  if (d < 0 || d >= devices()) return CUDA_ERROR_INVALID_DEVICE;
  for (int i = 0; i < 16; i++) uuid[i] = (unsigned char)(d * 16 + i);
  return CUDA_SUCCESS;
}
CUresult cuDeviceGetUuid_v2(unsigned char *uuid, CUdevice d) { return cuDeviceGetUuid(uuid, d); }
CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice d) {
  if (d < 0 || d >= devices()) return CUDA_ERROR_INVALID_DEVICE;
  *bytes = capacity();
  return CUDA_SUCCESS;
}
static CUresult make_context(CUcontext *ctx, CUdevice d) {
  if (d < 0 || d >= devices()) return CUDA_ERROR_INVALID_DEVICE;
  pthread_mutex_lock(&mu);
  has_context[d] = 1;
  pthread_mutex_unlock(&mu);
  *ctx = (CUcontext)(uintptr_t)(d + 1);
  return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice d) { return make_context(ctx, d); }
CUresult cuCtxCreate_v2(CUcontext *ctx, unsigned flags, CUdevice d) {
  (void)flags;
  CUresult rc = make_context(ctx, d);
  if (rc == CUDA_SUCCESS) current = d;
  return rc;
}
CUresult cuCtxSetCurrent(CUcontext ctx) { current = (int)(uintptr_t)ctx - 1; return CUDA_SUCCESS; }
CUresult cuCtxGetDevice(CUdevice *d) {
  if (current < 0) return CUDA_ERROR_INVALID_CONTEXT;
  *d = current;
  return CUDA_SUCCESS;
}

static CUresult stub_alloc_at(int dev, size_t size, unsigned long long *key, unsigned long long *next) {
  if (dev < 0) return CUDA_ERROR_INVALID_CONTEXT;
  if (size == 0) return CUDA_ERROR_INVALID_VALUE;
  pthread_mutex_lock(&mu);
  if (used_bytes[dev] + size > capacity()) { pthread_mutex_unlock(&mu); return CUDA_ERROR_OUT_OF_MEMORY; }
  for (int i = 0; i < MAX_ALLOCS; i++) {
    if (!allocs[i].live) {
      allocs[i].live = 1;
      allocs[i].key = *next;
      allocs[i].dev = dev;
      allocs[i].size = size;
      allocs[i].refs = 1;
      *key = *next;
      *next += (size + 0xfffff) & ~0xfffffull;
      used_bytes[dev] += size;
      pthread_mutex_unlock(&mu);
      return CUDA_SUCCESS;
    }
  }
  pthread_mutex_unlock(&mu);
  return CUDA_ERROR_OUT_OF_MEMORY;
}
static CUresult stub_alloc(int dev, size_t size, unsigned long long *key) {
  return stub_alloc_at(dev, size, key, &next_address);
}
static CUresult stub_free(unsigned long long key) {
  pthread_mutex_lock(&mu);
  for (int i = 0; i < MAX_ALLOCS; i++) {
    if (allocs[i].live && allocs[i].key == key) {
      allocs[i].live = 0;
      used_bytes[allocs[i].dev] -= allocs[i].size;
      pthread_mutex_unlock(&mu);
      return CUDA_SUCCESS;
    }
  }
  pthread_mutex_unlock(&mu);
  return CUDA_ERROR_INVALID_VALUE;
}
size_t stub_used_bytes(int dev) { return dev >= 0 && dev < MAX_DEV ? used_bytes[dev] : 0; }

CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) { return stub_alloc(current, n, p); }
CUresult cuMemAllocPitch_v2(CUdeviceptr *p, size_t *pitch, size_t w, size_t h, unsigned e) {
  (void)e;
  *pitch = (w + 511) & ~(size_t)511;
  return stub_alloc(current, *pitch * h, p);
}
CUresult cuMemAllocManaged(CUdeviceptr *p, size_t n, unsigned f) { (void)f; return stub_alloc(current, n, p); }
CUresult cuMemAllocAsync(CUdeviceptr *p, size_t n, CUstream s) { (void)s; return stub_alloc(current, n, p); }
CUresult cuMemAllocAsync_ptsz(CUdeviceptr *p, size_t n, CUstream s) { (void)s; return stub_alloc(current, n, p); }
CUresult cuMemAllocFromPoolAsync(CUdeviceptr *p, size_t n, void *pool, CUstream s) { (void)pool; (void)s; return stub_alloc(current, n, p); }
CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *p, size_t n, void *pool, CUstream s) { (void)pool; (void)s; return stub_alloc(current, n, p); }
CUresult cuMemFree_v2(CUdeviceptr p) { return stub_free(p); }
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) { (void)s; return stub_free(p); }
CUresult cuMemFreeAsync_ptsz(CUdeviceptr p, CUstream s) { (void)s; return stub_free(p); }
CUresult cuMemCreate(CUmemGenericAllocationHandle *h, size_t n, const PropHead *prop, unsigned long long f) {
  (void)f;
  if (!prop || prop->loc_type != 1) return CUDA_ERROR_INVALID_VALUE;
  return stub_alloc(prop->loc_id, n, h);
}
/* VMM, with the driver's lifetime: the memory of a handle lives until the handle is released
 * and every mapping of it is unmapped (and every retained reference released). */
static struct { unsigned long long ptr, size, key; int live; } maps[1024];
static unsigned long long next_va = 0x600000000000ull;
static CUresult stub_unref(unsigned long long key) {
  pthread_mutex_lock(&mu);
  for (int i = 0; i < MAX_ALLOCS; i++) {
    if (allocs[i].live && allocs[i].key == key) {
      if (--allocs[i].refs == 0) {
        allocs[i].live = 0;
        used_bytes[allocs[i].dev] -= allocs[i].size;
      }
      pthread_mutex_unlock(&mu);
      return CUDA_SUCCESS;
    }
  }
  pthread_mutex_unlock(&mu);
  return CUDA_ERROR_INVALID_VALUE;
}
CUresult cuMemRelease(CUmemGenericAllocationHandle h) { return stub_unref(h); }
CUresult cuMemAddressReserve(CUdeviceptr *p, size_t size, size_t align, CUdeviceptr addr, unsigned long long f) {
  (void)align; (void)addr; (void)f;
  pthread_mutex_lock(&mu);
  *p = next_va;
  next_va += (size + 0x1fffff) & ~0x1fffffull;
  pthread_mutex_unlock(&mu);
  return CUDA_SUCCESS;
}
CUresult cuMemAddressFree(CUdeviceptr p, size_t size) { (void)p; (void)size; return CUDA_SUCCESS; }
CUresult cuMemMap(CUdeviceptr p, size_t size, size_t offset, CUmemGenericAllocationHandle h, unsigned long long f) {
  (void)offset; (void)f;
  pthread_mutex_lock(&mu);
  for (int i = 0; i < MAX_ALLOCS; i++) {
    if (allocs[i].live && allocs[i].key == h) {
      for (int m = 0; m < 1024; m++) {
        if (!maps[m].live) {
          maps[m].live = 1; maps[m].ptr = p; maps[m].size = size; maps[m].key = h;
          allocs[i].refs++;
          pthread_mutex_unlock(&mu);
          return CUDA_SUCCESS;
        }
      }
    }
  }
  pthread_mutex_unlock(&mu);
  return CUDA_ERROR_INVALID_VALUE;
}
CUresult cuMemUnmap(CUdeviceptr p, size_t size) {
  unsigned long long keys[1024];
  int n = 0;
  pthread_mutex_lock(&mu);
  for (int m = 0; m < 1024; m++)
    if (maps[m].live && maps[m].ptr >= p && maps[m].ptr < p + size) { maps[m].live = 0; keys[n++] = maps[m].key; }
  pthread_mutex_unlock(&mu);
  if (n == 0) return CUDA_ERROR_INVALID_VALUE;
  for (int i = 0; i < n; i++) stub_unref(keys[i]);
  return CUDA_SUCCESS;
}
CUresult cuMemRetainAllocationHandle(CUmemGenericAllocationHandle *h, void *addr) {
  unsigned long long a = (unsigned long long)(uintptr_t)addr, key = 0;
  pthread_mutex_lock(&mu);
  for (int m = 0; m < 1024; m++)
    if (maps[m].live && a >= maps[m].ptr && a < maps[m].ptr + maps[m].size) key = maps[m].key;
  for (int i = 0; key && i < MAX_ALLOCS; i++)
    if (allocs[i].live && allocs[i].key == key) { allocs[i].refs++; *h = key; pthread_mutex_unlock(&mu); return CUDA_SUCCESS; }
  pthread_mutex_unlock(&mu);
  return CUDA_ERROR_INVALID_VALUE;
}
static unsigned fmt_bytes(unsigned f) { return f == 1 || f == 8 ? 1 : f == 2 || f == 9 || f == 16 ? 2 : 4; }
CUresult cuArrayCreate_v2(CUarray *a, const ArrayDesc *d) {
  unsigned long long key;
  CUresult rc = stub_alloc(current, d->w * (d->h ? d->h : 1) * d->ch * fmt_bytes(d->fmt), &key);
  if (rc == CUDA_SUCCESS) *a = (CUarray)(uintptr_t)key;
  return rc;
}
CUresult cuArray3DCreate_v2(CUarray *a, const Array3DDesc *d) {
  unsigned long long key;
  CUresult rc = stub_alloc(current, d->w * (d->h ? d->h : 1) * (d->d ? d->d : 1) * d->ch * fmt_bytes(d->fmt), &key);
  if (rc == CUDA_SUCCESS) *a = (CUarray)(uintptr_t)key;
  return rc;
}
CUresult cuArrayDestroy(CUarray a) { return stub_free((unsigned long long)(uintptr_t)a); }
/* A mipmapped array holds every level, each half the previous one. */
CUresult cuMipmappedArrayCreate(void **a, const Array3DDesc *d, unsigned levels) {
  size_t bytes = 0;
  for (unsigned l = 0; l < (levels ? levels : 1); l++) {
    size_t w = d->w >> l, h = (d->h ? d->h : 1) >> l, z = (d->d ? d->d : 1) >> l;
    bytes += (w ? w : 1) * (h ? h : 1) * (z ? z : 1) * d->ch * fmt_bytes(d->fmt);
  }
  unsigned long long key;
  CUresult rc = stub_alloc(current, bytes, &key);
  if (rc == CUDA_SUCCESS) *a = (void *)(uintptr_t)key;
  return rc;
}
CUresult cuMipmappedArrayDestroy(void *a) { return stub_free((unsigned long long)(uintptr_t)a); }

/* The CUDA 2.x entry points, 32-bit, still exported by the driver under the base names. */
typedef unsigned int CUdeviceptr_v1;
typedef struct { unsigned w, h, fmt, ch; } ArrayDescV1;
typedef struct { unsigned w, h, d, fmt, ch, flags; } Array3DDescV1;
static CUresult stub_alloc_v1(size_t n, CUdeviceptr_v1 *p) {
  unsigned long long key;
  CUresult rc = stub_alloc_at(current, n, &key, &next_low);
  if (rc == CUDA_SUCCESS) *p = (CUdeviceptr_v1)key;
  return rc;
}
CUresult cuMemAlloc(CUdeviceptr_v1 *p, unsigned n) { return stub_alloc_v1(n, p); }
CUresult cuMemAllocPitch(CUdeviceptr_v1 *p, unsigned *pitch, unsigned w, unsigned h, unsigned e) {
  (void)e;
  *pitch = (w + 511) & ~511u;
  return stub_alloc_v1((size_t)*pitch * h, p);
}
CUresult cuMemFree(CUdeviceptr_v1 p) { return stub_free(p); }
CUresult cuArrayCreate(CUarray *a, const ArrayDescV1 *d) {
  unsigned long long key;
  CUresult rc = stub_alloc(current, (size_t)d->w * (d->h ? d->h : 1) * d->ch * fmt_bytes(d->fmt), &key);
  if (rc == CUDA_SUCCESS) *a = (CUarray)(uintptr_t)key;
  return rc;
}
CUresult cuArray3DCreate(CUarray *a, const Array3DDescV1 *d) {
  unsigned long long key;
  CUresult rc = stub_alloc(current, (size_t)d->w * (d->h ? d->h : 1) * (d->d ? d->d : 1) * d->ch * fmt_bytes(d->fmt), &key);
  if (rc == CUDA_SUCCESS) *a = (CUarray)(uintptr_t)key;
  return rc;
}
CUresult cuMemGetInfo(unsigned *free_bytes, unsigned *total) {
  if (current < 0) return CUDA_ERROR_INVALID_CONTEXT;
  size_t f = capacity() - used_bytes[current];
  *total = capacity() > 0xffffffffu ? 0xffffffffu : (unsigned)capacity();
  *free_bytes = f > 0xffffffffu ? 0xffffffffu : (unsigned)f;
  return CUDA_SUCCESS;
}
CUresult cuDeviceTotalMem(unsigned *bytes, CUdevice d) {
  if (d < 0 || d >= devices()) return CUDA_ERROR_INVALID_DEVICE;
  *bytes = capacity() > 0xffffffffu ? 0xffffffffu : (unsigned)capacity();
  return CUDA_SUCCESS;
}

CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total) {
  if (current < 0) return CUDA_ERROR_INVALID_CONTEXT;
  *total = capacity();
  *free_bytes = capacity() - used_bytes[current];
  return CUDA_SUCCESS;
}

/* The simulated timeline. */
static CUresult run_for(unsigned long long duration) {
  int d = current;
  if (d < 0) return CUDA_ERROR_INVALID_CONTEXT;
  for (;;) {
    unsigned long long now = stub_now_ns();
    pthread_mutex_lock(&mu);
    if (busy_until[d] <= now + QUEUE_NS) {
      unsigned long long start = busy_until[d] > now ? busy_until[d] : now;
      busy_until[d] = start + duration;
      unsigned long long i = busy_next[d]++ % LOG_SIZE;
      busy_log[d][i].start = start;
      busy_log[d][i].end = start + duration;
      pthread_mutex_unlock(&mu);
      return CUDA_SUCCESS;
    }
    unsigned long long wait = busy_until[d] - now - QUEUE_NS;
    pthread_mutex_unlock(&mu);
    struct timespec ts = {0, (long)(wait < 1000000 ? wait : 1000000)};
    nanosleep(&ts, NULL);
  }
}
static CUresult run_kernel(unsigned gx, unsigned gy, unsigned gz) {
  unsigned long long blocks = (unsigned long long)(gx ? gx : 1) * (gy ? gy : 1) * (gz ? gz : 1);
  return run_for(blocks * (unsigned long long)env_long("STUB_NS_PER_BLOCK", 1000));
}
/* Events on the timeline: one completes when the work queued before it is done. */
#define CUDA_ERROR_NOT_READY 600
typedef struct { unsigned long long t; } StubEvent;
CUresult cuEventCreate(void **e, unsigned flags) {
  (void)flags;
  StubEvent *ev = calloc(1, sizeof *ev);
  if (!ev) return CUDA_ERROR_OUT_OF_MEMORY;
  *e = ev;
  return CUDA_SUCCESS;
}
CUresult cuEventRecord(void *e, CUstream s) {
  (void)s;
  int d = current;
  if (d < 0 || !e) return CUDA_ERROR_INVALID_CONTEXT;
  unsigned long long now = stub_now_ns();
  pthread_mutex_lock(&mu);
  ((StubEvent *)e)->t = busy_until[d] > now ? busy_until[d] : now;
  pthread_mutex_unlock(&mu);
  return CUDA_SUCCESS;
}
CUresult cuEventQuery(void *e) {
  if (!e) return CUDA_ERROR_INVALID_VALUE;
  return stub_now_ns() >= ((StubEvent *)e)->t ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}
CUresult cuEventElapsedTime(float *ms, void *a, void *b) {
  if (cuEventQuery(a) != CUDA_SUCCESS || cuEventQuery(b) != CUDA_SUCCESS) return CUDA_ERROR_NOT_READY;
  *ms = (float)((double)(((StubEvent *)b)->t - ((StubEvent *)a)->t) / 1e6);
  return CUDA_SUCCESS;
}
CUresult cuEventDestroy_v2(void *e) { free(e); return CUDA_SUCCESS; }
CUresult cuStreamIsCapturing(CUstream s, int *status) { (void)s; *status = 0; return CUDA_SUCCESS; }

/* Busy nanoseconds of device d within [from, to]. */
unsigned long long stub_busy_ns(int d, unsigned long long from, unsigned long long to) {
  unsigned long long busy = 0;
  pthread_mutex_lock(&mu);
  unsigned long long n = busy_next[d] < LOG_SIZE ? busy_next[d] : LOG_SIZE;
  for (unsigned long long i = 0; i < n; i++) {
    unsigned long long s = busy_log[d][i].start > from ? busy_log[d][i].start : from;
    unsigned long long e = busy_log[d][i].end < to ? busy_log[d][i].end : to;
    if (e > s) busy += e - s;
  }
  pthread_mutex_unlock(&mu);
  return busy;
}
int stub_has_context(int d) { return d >= 0 && d < MAX_DEV && has_context[d]; }

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned sh, CUstream s, void **p, void **e) {
  (void)f; (void)bx; (void)by; (void)bz; (void)sh; (void)s; (void)p; (void)e;
  return run_kernel(gx, gy, gz);
}
CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                             unsigned bz, unsigned sh, CUstream s, void **p, void **e) {
  return cuLaunchKernel(f, gx, gy, gz, bx, by, bz, sh, s, p, e);
}
CUresult cuLaunchKernelEx(const LaunchConfigHead *c, CUfunction f, void **p, void **e) {
  (void)f; (void)p; (void)e;
  return run_kernel(c->grid[0], c->grid[1], c->grid[2]);
}
CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                   unsigned by, unsigned bz, unsigned sh, CUstream s, void **p) {
  return cuLaunchKernel(f, gx, gy, gz, bx, by, bz, sh, s, p, NULL);
}
/* A graph runs STUB_GRAPH_NS (default 1000) of work. */
CUresult cuGraphLaunch(void *g, CUstream s) {
  (void)g; (void)s;
  return run_for((unsigned long long)env_long("STUB_GRAPH_NS", 1000));
}
CUresult cuCtxSynchronize(void) {
  int d = current;
  if (d < 0) return CUDA_ERROR_INVALID_CONTEXT;
  for (;;) {
    unsigned long long now = stub_now_ns();
    if (busy_until[d] <= now) return CUDA_SUCCESS;
    struct timespec ts = {0, 200000};
    nanosleep(&ts, NULL);
  }
}

CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, unsigned long long flags);
CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, unsigned long long flags, int *status);

#define ENTRY(f) {#f, (void *)f}
static const struct { const char *name; void *fn; } table[] = {
  ENTRY(cuInit), ENTRY(cuDriverGetVersion), ENTRY(cuDeviceGetCount), ENTRY(cuDeviceGet),
  ENTRY(cuDeviceGetUuid), ENTRY(cuDeviceGetUuid_v2), ENTRY(cuDeviceTotalMem_v2),
  ENTRY(cuDevicePrimaryCtxRetain), ENTRY(cuCtxCreate_v2), ENTRY(cuCtxSetCurrent), ENTRY(cuCtxGetDevice),
  ENTRY(cuMemAlloc_v2), ENTRY(cuMemAllocPitch_v2), ENTRY(cuMemAllocManaged), ENTRY(cuMemAllocAsync),
  ENTRY(cuMemAllocAsync_ptsz), ENTRY(cuMemAllocFromPoolAsync), ENTRY(cuMemAllocFromPoolAsync_ptsz),
  ENTRY(cuMemFree_v2), ENTRY(cuMemFreeAsync), ENTRY(cuMemFreeAsync_ptsz), ENTRY(cuMemCreate),
  ENTRY(cuMemRelease), ENTRY(cuArrayCreate_v2), ENTRY(cuArray3DCreate_v2), ENTRY(cuArrayDestroy),
  ENTRY(cuMemGetInfo_v2), ENTRY(cuLaunchKernel), ENTRY(cuLaunchKernel_ptsz), ENTRY(cuLaunchKernelEx),
  ENTRY(cuLaunchCooperativeKernel), ENTRY(cuGraphLaunch), ENTRY(cuCtxSynchronize),
  ENTRY(cuGetProcAddress), ENTRY(cuGetProcAddress_v2), ENTRY(cuMipmappedArrayCreate),
  ENTRY(cuMipmappedArrayDestroy), ENTRY(cuMemAlloc), ENTRY(cuMemAllocPitch), ENTRY(cuMemFree),
  ENTRY(cuArrayCreate), ENTRY(cuArray3DCreate), ENTRY(cuMemGetInfo), ENTRY(cuDeviceTotalMem),
  ENTRY(cuMemAddressReserve), ENTRY(cuMemAddressFree), ENTRY(cuMemMap), ENTRY(cuMemUnmap),
  ENTRY(cuMemRetainAllocationHandle), ENTRY(cuEventCreate), ENTRY(cuEventRecord), ENTRY(cuEventQuery),
  ENTRY(cuEventElapsedTime), ENTRY(cuEventDestroy_v2), ENTRY(cuStreamIsCapturing),
};

static void *find(const char *name) {
  for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
    if (strcmp(table[i].name, name) == 0) return table[i].fn;
  return NULL;
}

/* Like the driver: the base name resolves to the newest version the caller's CUDA version knows
 * (the _v2 memory functions came with CUDA 3.2, 3020: an older version gets the base, 32-bit
 * entry point), and per-thread-default-stream callers get the _ptsz variant where there is one. */
CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, unsigned long long flags, int *status) {
  char name[128];
  void *fn = NULL;
  if (!symbol || !pfn) return CUDA_ERROR_INVALID_VALUE;
  if (version < 3020) fn = find(symbol);
  if (!fn && (flags & 2)) { snprintf(name, sizeof name, "%s_ptsz", symbol); fn = find(name); }
  if (!fn) { snprintf(name, sizeof name, "%s_v2", symbol); fn = find(name); }
  if (!fn) fn = find(symbol);
  *pfn = fn;
  if (status) *status = fn ? 0 : 1;
  return fn ? CUDA_SUCCESS : CUDA_ERROR_NOT_FOUND;
}
CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, unsigned long long flags) {
  return cuGetProcAddress_v2(symbol, pfn, version, flags, NULL);
}
