/* A simulated libnvidia-ml.so.1 over the stub libcuda's devices. Process utilization comes from
 * the stub's kernel timeline; PIDs are reported as getpid() + STUB_NVML_PID_OFFSET, so a test
 * can pretend the process runs in its own PID namespace, as in a container. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int nvmlReturn_t;
typedef struct { int index; } Device;
typedef Device *nvmlDevice_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { unsigned pid; unsigned long long timeStamp; unsigned smUtil, memUtil, encUtil, decUtil; } Sample;
typedef struct { unsigned gpu, memory; } Utilization;
typedef struct { unsigned pid; unsigned long long usedGpuMemory; unsigned gi, ci; } ProcessInfo;

#define NVML_SUCCESS 0
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_NOT_FOUND 6

extern unsigned long long stub_now_ns(void);
extern unsigned long long stub_busy_ns(int d, unsigned long long from, unsigned long long to);
extern size_t stub_used_bytes(int d);
extern int stub_has_context(int d);

static Device devs[16] = {{0},{1},{2},{3},{4},{5},{6},{7},{8},{9},{10},{11},{12},{13},{14},{15}};
static unsigned long long last_rates_ns[16];

static int count(void) { const char *v = getenv("STUB_CUDA_DEVICES"); return v ? atoi(v) : 2; }
static unsigned long long capacity(void) {
  const char *v = getenv("STUB_CUDA_MEMORY_MIB");
  return (unsigned long long)(v ? atol(v) : 81559) << 20;
}
static unsigned pid(void) {
  const char *v = getenv("STUB_NVML_PID_OFFSET");
  return (unsigned)getpid() + (unsigned)(v ? atoi(v) : 0);
}
static void uuid(int d, char *buf, unsigned len) {
  unsigned char b[16];
  for (int i = 0; i < 16; i++) b[i] = (unsigned char)(d * 16 + i);
  snprintf(buf, len, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
           b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
}

nvmlReturn_t nvmlInit_v2(void) { return NVML_SUCCESS; }
nvmlReturn_t nvmlInit(void) { return NVML_SUCCESS; }
nvmlReturn_t nvmlShutdown(void) { return NVML_SUCCESS; }
nvmlReturn_t nvmlDeviceGetCount_v2(unsigned *n) { *n = (unsigned)count(); return NVML_SUCCESS; }
nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned i, nvmlDevice_t *h) {
  if ((int)i >= count()) return NVML_ERROR_INVALID_ARGUMENT;
  *h = &devs[i];
  return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *u, nvmlDevice_t *h) {
  char buf[96];
  for (int d = 0; d < count(); d++) {
    uuid(d, buf, sizeof buf);
    if (strcmp(buf, u) == 0) { *h = &devs[d]; return NVML_SUCCESS; }
  }
  return NVML_ERROR_NOT_FOUND;
}
nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t h, char *buf, unsigned len) { uuid(h->index, buf, len); return NVML_SUCCESS; }
nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t h, unsigned *i) { *i = (unsigned)h->index; return NVML_SUCCESS; }
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t h, nvmlMemory_t *m) {
  m->total = capacity();
  m->used = stub_used_bytes(h->index);
  m->free = m->total - m->used;
  return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t h, nvmlMemory_v2_t *m) {
  m->total = capacity();
  m->reserved = 0;
  m->used = stub_used_bytes(h->index);
  m->free = m->total - m->used;
  return NVML_SUCCESS;
}
static unsigned percent(int d, unsigned long long from, unsigned long long to) {
  if (to <= from) return 0;
  return (unsigned)(100.0 * (double)stub_busy_ns(d, from, to) / (double)(to - from) + 0.5);
}
nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t h, Utilization *u) {
  unsigned long long now = stub_now_ns();
  unsigned long long from = last_rates_ns[h->index] ? last_rates_ns[h->index] : now - 100000000ull;
  last_rates_ns[h->index] = now;
  u->gpu = percent(h->index, from, now);
  u->memory = 0;
  return NVML_SUCCESS;
}
/* One sample per call, over the time since lastSeen (in microseconds, like NVML's). */
#define NVML_ERROR_NOT_SUPPORTED 3
/* STUB_NVML_NO_PROCESS_UTIL=1: like GPUs (and vGPU, MIG) whose NVML cannot report it. */
nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t h, Sample *s, unsigned *n, unsigned long long last_seen_us) {
  const char *off = getenv("STUB_NVML_NO_PROCESS_UTIL");
  if (off && *off == '1') return NVML_ERROR_NOT_SUPPORTED;
  if (!stub_has_context(h->index)) { *n = 0; return NVML_ERROR_NOT_FOUND; }
  if (!s || *n < 1) { *n = 1; return NVML_ERROR_INSUFFICIENT_SIZE; }
  unsigned long long now = stub_now_ns();
  unsigned long long from = last_seen_us ? last_seen_us * 1000ull : now - 1000000000ull;
  memset(s, 0, sizeof *s);
  s->pid = pid();
  s->timeStamp = now / 1000ull;
  s->smUtil = percent(h->index, from, now);
  *n = 1;
  return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t h, unsigned *n, ProcessInfo *p) {
  if (!stub_has_context(h->index)) { *n = 0; return NVML_SUCCESS; }
  if (!p || *n < 1) { *n = 1; return NVML_ERROR_INSUFFICIENT_SIZE; }
  memset(p, 0, sizeof *p);
  p->pid = pid();
  p->usedGpuMemory = stub_used_bytes(h->index);
  *n = 1;
  return NVML_SUCCESS;
}
