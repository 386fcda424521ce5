/* Coverage under gcc's AddressSanitizer for atheris (used by `make fuzz`).

   gcc's libasan.so, preloaded so that the ASan build of eoq._C runs, also defines the
   sanitizer-coverage entry points (__sanitizer_cov_8bit_counters_init, _pcs_init,
   _trace_cmp*, the __sanitizer_weak_hook_* of memcmp/strcmp, ...) as no-ops. atheris's
   libFuzzer (core_with_libfuzzer.so) defines them too, but being loaded later its own calls
   bind to libasan's: Python coverage then never reaches libFuzzer ("Coverage symbols are
   being provided by a library other than libFuzzer"), and the fuzzer runs blind.

   Preloaded before libasan (LD_PRELOAD="shim.so libasan.so ...", with
   ASAN_OPTIONS=verify_asan_link_order=0), this library defines the same symbols first and
   forwards each call to atheris's libFuzzer. Until atheris has registered its first counters
   (that is, until the fuzzer is set up) every call is a no-op.

   Build: gcc -shared -fPIC -O2 -o asan_cov_shim.so asan_cov_shim.c -ldl
*/
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

static void* core;  /* dlopen handle of atheris's core_with_libfuzzer */

#define FWD(ret, name, params, args)              \
  static ret(*p_##name) params;                   \
  ret name params {                               \
    if (p_##name) return p_##name args;           \
  }

#define FWDV(name, params, args)                  \
  static void(*p_##name) params;                  \
  void name params {                              \
    if (p_##name) p_##name args;                  \
  }

FWDV(__sanitizer_cov_trace_cmp1, (uint8_t a, uint8_t b), (a, b))
FWDV(__sanitizer_cov_trace_cmp2, (uint16_t a, uint16_t b), (a, b))
FWDV(__sanitizer_cov_trace_cmp4, (uint32_t a, uint32_t b), (a, b))
FWDV(__sanitizer_cov_trace_cmp8, (uint64_t a, uint64_t b), (a, b))
FWDV(__sanitizer_cov_trace_const_cmp1, (uint8_t a, uint8_t b), (a, b))
FWDV(__sanitizer_cov_trace_const_cmp2, (uint16_t a, uint16_t b), (a, b))
FWDV(__sanitizer_cov_trace_const_cmp4, (uint32_t a, uint32_t b), (a, b))
FWDV(__sanitizer_cov_trace_const_cmp8, (uint64_t a, uint64_t b), (a, b))
FWDV(__sanitizer_cov_trace_div4, (uint32_t v), (v))
FWDV(__sanitizer_cov_trace_div8, (uint64_t v), (v))
FWDV(__sanitizer_cov_trace_gep, (uintptr_t v), (v))
FWDV(__sanitizer_cov_trace_pc_indir, (uintptr_t v), (v))
FWDV(__sanitizer_cov_trace_switch, (uint64_t v, uint64_t* cases), (v, cases))
FWDV(__sanitizer_cov_pcs_init, (const uintptr_t* b, const uintptr_t* e), (b, e))
FWDV(__sanitizer_weak_hook_memcmp, (void* pc, const void* a, const void* b, size_t n, int r), (pc, a, b, n, r))
FWDV(__sanitizer_weak_hook_strncmp, (void* pc, const char* a, const char* b, size_t n, int r), (pc, a, b, n, r))
FWDV(__sanitizer_weak_hook_strcmp, (void* pc, const char* a, const char* b, int r), (pc, a, b, r))
FWDV(__sanitizer_weak_hook_strncasecmp, (void* pc, const char* a, const char* b, size_t n, int r), (pc, a, b, n, r))
FWDV(__sanitizer_weak_hook_strcasecmp, (void* pc, const char* a, const char* b, int r), (pc, a, b, r))
FWDV(__sanitizer_weak_hook_strstr, (void* pc, const char* a, const char* b, char* r), (pc, a, b, r))
FWDV(__sanitizer_weak_hook_strcasestr, (void* pc, const char* a, const char* b, char* r), (pc, a, b, r))
FWDV(__sanitizer_weak_hook_memmem, (void* pc, const void* a, size_t n, const void* b, size_t m, void* r),
     (pc, a, n, b, m, r))

static int find_core(struct dl_phdr_info* info, size_t size, void* data) {
  (void)size;
  if (info->dlpi_name && strstr(info->dlpi_name, "atheris/core_with_libfuzzer")) {
    *(const char**)data = info->dlpi_name;
    return 1;
  }
  return 0;
}

#define RESOLVE(name) p_##name = (__typeof__(p_##name))dlsym(core, #name)

static void (*p_counters_init)(uint8_t*, uint8_t*);

void __sanitizer_cov_8bit_counters_init(uint8_t* b, uint8_t* e) {
  if (!core) {
    const char* path = NULL;
    dl_iterate_phdr(find_core, &path);
    if (path) core = dlopen(path, RTLD_NOLOAD | RTLD_LAZY);
    if (!core) return;
    p_counters_init = (void (*)(uint8_t*, uint8_t*))dlsym(core, "__sanitizer_cov_8bit_counters_init");
    RESOLVE(__sanitizer_cov_pcs_init);
    RESOLVE(__sanitizer_cov_trace_cmp1);
    RESOLVE(__sanitizer_cov_trace_cmp2);
    RESOLVE(__sanitizer_cov_trace_cmp4);
    RESOLVE(__sanitizer_cov_trace_cmp8);
    RESOLVE(__sanitizer_cov_trace_const_cmp1);
    RESOLVE(__sanitizer_cov_trace_const_cmp2);
    RESOLVE(__sanitizer_cov_trace_const_cmp4);
    RESOLVE(__sanitizer_cov_trace_const_cmp8);
    RESOLVE(__sanitizer_cov_trace_div4);
    RESOLVE(__sanitizer_cov_trace_div8);
    RESOLVE(__sanitizer_cov_trace_gep);
    RESOLVE(__sanitizer_cov_trace_pc_indir);
    RESOLVE(__sanitizer_cov_trace_switch);
    RESOLVE(__sanitizer_weak_hook_memcmp);
    RESOLVE(__sanitizer_weak_hook_strncmp);
    RESOLVE(__sanitizer_weak_hook_strcmp);
    RESOLVE(__sanitizer_weak_hook_strncasecmp);
    RESOLVE(__sanitizer_weak_hook_strcasecmp);
    RESOLVE(__sanitizer_weak_hook_strstr);
    RESOLVE(__sanitizer_weak_hook_strcasestr);
    RESOLVE(__sanitizer_weak_hook_memmem);
  }
  if (p_counters_init) p_counters_init(b, e);
}
