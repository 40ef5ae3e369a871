// A CUDA launch emulator for expanse's kernels, so that the CUDA sources (kernels/cuda/*.cu) run in
// the CPU test suite: every block of the grid runs in turn, each of its threads a fiber.
// A fiber runs until it reaches __syncthreads or __shfl_xor_sync; the scheduler releases a barrier
// when every live thread of the block (or lane of the warp) has arrived, and reports a deadlock
// or a shuffle across exited lanes as an error. The order in which fibers and blocks run is a
// parameter, so a test can run a kernel under several orders: a result that depends on the order
// is a race (a missing barrier, blocks that depend on each other).
//
// Hand-written because nothing packaged runs CUDA C++ on a CPU with warp shuffles (HIP-CPU is not
// on any registry this project can reach, and Ocelot/GPGPU-Sim need a GPU toolchain's PTX path).
#include <ucontext.h>

#include <algorithm>
#include <memory>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "emu.h"

#include "argmax.cu"
#include "decode_attention.cu"
#include "gemv.cu"
#include "gemv_quant.cu"
#include "random_normal.cu"
#include "residual_norm.cu"
#include "rope_kv.cu"

// Test only: a kernel that writes without pdl_wait(), which the emulator must refuse.
extern "C" __global__ void expanse_emu_test_skips_pdl_wait(float* x) { x[threadIdx.x] = 1.0f; }

namespace emu {
namespace {

// ---- switching between fibers ----------------------------------------------------------------
// On x86-64 Linux a fiber switch saves the callee-saved registers and swaps stack pointers (a few
// nanoseconds); elsewhere ucontext does it, with a system call per switch (signal mask), which
// made the x86-64 test suite spend most of its time in the kernel.
#if defined(__x86_64__) && defined(__linux__)
extern "C" void expanse_emu_switch(void** save_sp, void* to_sp);
asm(R"(
  .pushsection .text
  .globl expanse_emu_switch
  .type expanse_emu_switch, @function
expanse_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size expanse_emu_switch, .-expanse_emu_switch
  .popsection
)");

struct Ctx {
  void* sp = nullptr;
};

// A context whose first switch-to calls fn (which must never return) on `stack`. Fiber i's stack
// top sits i·320 bytes (mod 16 KiB) below the end, so that the tops of 64 KiB-apart stacks do not
// all fall into one L1 set.
void ctx_init(Ctx& c, char* stack, size_t size, size_t i, void (*fn)()) {
  const uintptr_t top = reinterpret_cast<uintptr_t>(stack + size - i * 320 % 16384) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top - 64);
  for (int i = 0; i < 6; ++i) sp[i] = nullptr;  // r15 r14 r13 r12 rbx rbp
  sp[6] = reinterpret_cast<void*>(fn);          // `ret` enters fn with rsp = 8 mod 16, as a call
  sp[7] = nullptr;
  c.sp = sp;
}

void ctx_switch(Ctx& from, Ctx& to) { expanse_emu_switch(&from.sp, to.sp); }
#else
struct Ctx {
  ucontext_t uc;
};

void ctx_init(Ctx& c, char* stack, size_t size, size_t, void (*fn)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, fn, 0);
}

void ctx_switch(Ctx& from, Ctx& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---- the scheduler ---------------------------------------------------------------------------
enum class St { Run, WarpWait, BlockWait, Done };

struct Fiber {
  Ctx ctx;
  dim3 tid;
  St st = St::Run;
  bool waited = false;  // called pdl_wait() in this block
  unsigned mask = 0;
  uint64_t val = 0, out = 0;
  int src = 0;
  char* stack = nullptr;
};

constexpr size_t STACK = 64 * 1024;

// Fiber stacks, kept across launches (a fresh stack costs page faults on every launch); not zeroed:
// a fiber touches only the top of its stack.
std::vector<std::unique_ptr<char[]>> stacks;

struct Launch {
  dim3 block_idx, block_dim, grid_dim;
  std::vector<Fiber> fibers;
  Ctx sched;
  Fiber* cur = nullptr;
  void (*body)(void**) = nullptr;
  void** args = nullptr;
  std::string error;
  bool unwaited = false;  // a thread ended its block without pdl_wait()
};

Launch* L = nullptr;  // the launch in progress (one at a time: `lock`)
// This thread's launch in progress, for the memory guard's fault report (which runs on the
// faulting thread, while another thread may be waiting for `lock`).
thread_local const Launch* here = nullptr;
thread_local const char* here_name = nullptr;
std::mutex lock;

void suspend(St st);

// A fiber runs the kernel body once per block, then waits to be resumed for the next block: fibers
// are made once per launch, not per block.
void entry() {
  for (;;) {
    L->body(L->args);
    if (!L->cur->waited) L->unwaited = true;
    suspend(St::Done);
  }
}

void suspend(St st) {
  Fiber* f = L->cur;
  f->st = st;
  ctx_switch(f->ctx, L->sched);
}

// Runs fiber `f` until it suspends or finishes its block.
void resume(Fiber& f) {
  L->cur = &f;
  ctx_switch(L->sched, f.ctx);
}

// Warps whose every live lane waits at a shuffle exchange values and run on.
bool release_warps(std::string& err) {
  bool any = false;
  const size_t n = L->fibers.size();
  for (size_t w0 = 0; w0 < n; w0 += 32) {
    const size_t w1 = std::min(n, w0 + 32);
    size_t waiting = 0, done = 0;
    for (size_t i = w0; i < w1; ++i) {
      waiting += L->fibers[i].st == St::WarpWait;
      done += L->fibers[i].st == St::Done;
    }
    if (waiting == 0 || waiting + done != w1 - w0) continue;
    if (waiting != 32) {
      err = "__shfl_xor_sync in warp " + std::to_string(w0 / 32) + " with " + std::to_string(waiting) +
            " of 32 lanes present (exited lanes or a partial warp under a full mask)";
      return false;
    }
    for (size_t i = w0; i < w1; ++i) {
      Fiber& f = L->fibers[i];
      if (f.mask != 0xffffffffu) {
        err = "__shfl_xor_sync with a partial mask (not emulated)";
        return false;
      }
      f.out = L->fibers[w0 + f.src].val;
    }
    for (size_t i = w0; i < w1; ++i) L->fibers[i].st = St::Run;
    any = true;
  }
  return any;
}

// Makes the launch's fibers (their first resume enters `entry`).
void make_fibers() {
  const dim3 bd = L->block_dim;
  for (size_t i = 0; i < L->fibers.size(); ++i) {
    Fiber& f = L->fibers[i];
    f.tid = dim3{(unsigned)(i % bd.x), (unsigned)(i / bd.x % bd.y), (unsigned)(i / (bd.x * bd.y))};
    ctx_init(f.ctx, f.stack, STACK, i, entry);
  }
}

// One block, fibers run in `order`. Returns false with L->error set on a deadlock.
bool run_block(const std::vector<size_t>& order) {
  for (Fiber& f : L->fibers) {
    f.st = St::Run;
    f.waited = false;
  }
  for (;;) {
    for (size_t i : order) {
      Fiber& f = L->fibers[i];
      if (f.st == St::Run) resume(f);
    }
    bool all_done = true, all_block = true;
    for (const Fiber& f : L->fibers) {
      all_done &= f.st == St::Done;
      all_block &= f.st == St::Done || f.st == St::BlockWait;
    }
    if (all_done && L->unwaited) {
      L->error = "a thread ended without pdl_wait() (griddepcontrol.wait): under programmatic dependent launch it could race with the previous kernel";
      return false;
    }
    if (all_done) return true;
    std::string err;
    if (release_warps(err)) continue;
    if (!err.empty()) {
      L->error = err;
      return false;
    }
    if (all_block) {
      for (Fiber& f : L->fibers)
        if (f.st == St::BlockWait) f.st = St::Run;
      continue;
    }
    L->error = "deadlock: some threads wait at __syncthreads while others wait at a shuffle";
    return false;
  }
}

// A permutation of 0..n: identity (schedule 0), reversed (1), or shuffled by `schedule` as seed.
std::vector<size_t> permutation(size_t n, uint64_t schedule) {
  std::vector<size_t> p(n);
  for (size_t i = 0; i < n; ++i) p[i] = i;
  if (schedule == 1) std::reverse(p.begin(), p.end());
  if (schedule >= 2) {
    uint64_t s = schedule;
    for (size_t i = n; i > 1; --i) {
      s = s * 6364136223846793005ull + 1442695040888963407ull;
      std::swap(p[i - 1], p[(s >> 33) % i]);
    }
  }
  return p;
}

template <typename... A, size_t... I>
void call_with(void (*f)(A...), void** a, std::index_sequence<I...>) {
  f(*static_cast<std::remove_reference_t<A>*>(a[I])...);
}

struct Kernel {
  const char* name;
  void (*body)(void**);
  size_t arity;
  const size_t* sizes;
};

template <typename... A>
constexpr size_t arity_of(void (*)(A...)) {
  return sizeof...(A);
}

template <typename... A>
const size_t* sizes_of(void (*)(A...)) {
  static const size_t s[] = {sizeof(A)..., 0};
  return s;
}

#define K(NAME)                                                                                 \
  Kernel {                                                                                      \
    #NAME, [](void** a) { call_with(NAME, a, std::make_index_sequence<arity_of(NAME)>{}); },   \
        arity_of(NAME), sizes_of(NAME)                                                          \
  }

const Kernel KERNELS[] = {
    K(expanse_residual_norm_f32), K(expanse_residual_norm_bf16), K(expanse_residual_norm_f16),
    K(expanse_gemv_f32), K(expanse_gemv_bf16), K(expanse_gemv_f16),
    K(expanse_gemv_tiled_f32), K(expanse_gemv_tiled_bf16), K(expanse_gemv_tiled_f16),
    K(expanse_gemv_silu_mul_f32), K(expanse_gemv_silu_mul_bf16), K(expanse_gemv_silu_mul_f16),
    K(expanse_gemv_silu_mul_tiled_f32), K(expanse_gemv_silu_mul_tiled_bf16), K(expanse_gemv_silu_mul_tiled_f16),
    K(expanse_gemv_q8_0_f32), K(expanse_gemv_q8_0_bf16), K(expanse_gemv_q8_0_f16),
    K(expanse_gemv_silu_mul_q8_0_f32), K(expanse_gemv_silu_mul_q8_0_bf16), K(expanse_gemv_silu_mul_q8_0_f16),
    K(expanse_gemv_q4_0_f32), K(expanse_gemv_q4_0_bf16), K(expanse_gemv_q4_0_f16),
    K(expanse_gemv_silu_mul_q4_0_f32), K(expanse_gemv_silu_mul_q4_0_bf16), K(expanse_gemv_silu_mul_q4_0_f16),
    K(expanse_gemv_q4_1_f32), K(expanse_gemv_q4_1_bf16), K(expanse_gemv_q4_1_f16),
    K(expanse_gemv_silu_mul_q4_1_f32), K(expanse_gemv_silu_mul_q4_1_bf16), K(expanse_gemv_silu_mul_q4_1_f16),
    K(expanse_gemv_q5_0_f32), K(expanse_gemv_q5_0_bf16), K(expanse_gemv_q5_0_f16),
    K(expanse_gemv_silu_mul_q5_0_f32), K(expanse_gemv_silu_mul_q5_0_bf16), K(expanse_gemv_silu_mul_q5_0_f16),
    K(expanse_gemv_q5_1_f32), K(expanse_gemv_q5_1_bf16), K(expanse_gemv_q5_1_f16),
    K(expanse_gemv_silu_mul_q5_1_f32), K(expanse_gemv_silu_mul_q5_1_bf16), K(expanse_gemv_silu_mul_q5_1_f16),
    K(expanse_gemv_q4_k_f32), K(expanse_gemv_q4_k_bf16), K(expanse_gemv_q4_k_f16),
    K(expanse_gemv_silu_mul_q4_k_f32), K(expanse_gemv_silu_mul_q4_k_bf16), K(expanse_gemv_silu_mul_q4_k_f16),
    K(expanse_gemv_q5_k_f32), K(expanse_gemv_q5_k_bf16), K(expanse_gemv_q5_k_f16),
    K(expanse_gemv_silu_mul_q5_k_f32), K(expanse_gemv_silu_mul_q5_k_bf16), K(expanse_gemv_silu_mul_q5_k_f16),
    K(expanse_gemv_q6_k_f32), K(expanse_gemv_q6_k_bf16), K(expanse_gemv_q6_k_f16),
    K(expanse_gemv_silu_mul_q6_k_f32), K(expanse_gemv_silu_mul_q6_k_bf16), K(expanse_gemv_silu_mul_q6_k_f16),
    K(expanse_rope_kv_f32), K(expanse_rope_kv_bf16), K(expanse_rope_kv_f16),
    K(expanse_decode_attn_f32_d64), K(expanse_decode_attn_f32_d128), K(expanse_decode_attn_f32_d256),
    K(expanse_decode_attn_bf16_d64), K(expanse_decode_attn_bf16_d128), K(expanse_decode_attn_bf16_d256),
    K(expanse_decode_attn_f16_d64), K(expanse_decode_attn_f16_d128), K(expanse_decode_attn_f16_d256),
    K(expanse_argmax_f32), K(expanse_argmax_bf16), K(expanse_argmax_f16),
    K(expanse_random_normal_f32), K(expanse_random_normal_bf16), K(expanse_random_normal_f16),
    K(expanse_emu_test_skips_pdl_wait),
};

}  // namespace

const dim3& thread_idx() { return L->cur->tid; }
const dim3& block_idx() { return L->block_idx; }
const dim3& block_dim() { return L->block_dim; }
const dim3& grid_dim() { return L->grid_dim; }
void syncthreads() { suspend(St::BlockWait); }
void pdl_wait() { L->cur->waited = true; }

uint64_t shfl(unsigned mask, uint64_t bits, int src_lane) {
  Fiber* f = L->cur;
  f->mask = mask;
  f->val = bits;
  f->src = src_lane;
  suspend(St::WarpWait);
  return f->out;
}

}  // namespace emu

// Writes "kernel K block (x,y,z) thread (x,y,z)" for this thread's launch in progress into `buf`
// (NUL-terminated); returns the length, 0 when no launch is running. Called from a fault handler.
extern "C" size_t expanse_emu_where(char* buf, size_t len) {
  using namespace emu;
  if (here == nullptr || len == 0) return 0;
  const dim3 b = here->block_idx;
  const dim3 t = here->cur ? here->cur->tid : dim3{0, 0, 0};
  const int n = snprintf(buf, len, "kernel %s block (%u,%u,%u) thread (%u,%u,%u)", here_name, b.x, b.y, b.z, t.x, t.y, t.z);
  return n < 0 ? 0 : std::min((size_t)n, len - 1);
}

namespace {
int fail(char* err, size_t err_len, const std::string& msg) {
  if (err_len > 0) snprintf(err, err_len, "%s", msg.c_str());
  return 1;
}
}  // namespace

// Runs kernel `name` over `grid` blocks of `block` threads with the argument values `args`
// (`sizes[i]` bytes each, checked against the kernel's parameters). Returns 0, or 1 with a message
// in `err`.
extern "C" int expanse_emu_launch(const char* name, const unsigned grid[3], const unsigned block[3],
                                  void** args, const size_t* sizes, size_t n_args, uint64_t schedule,
                                  char* err, size_t err_len) {
  using namespace emu;
  const Kernel* k = nullptr;
  for (const Kernel& c : KERNELS)
    if (strcmp(c.name, name) == 0) k = &c;
  if (!k) return fail(err, err_len, std::string("no kernel named ") + name);
  if (n_args != k->arity)
    return fail(err, err_len, std::string(name) + ": " + std::to_string(n_args) + " arguments given, " +
                                  std::to_string(k->arity) + " expected");
  for (size_t i = 0; i < n_args; ++i)
    if (sizes[i] != k->sizes[i])
      return fail(err, err_len, std::string(name) + ": argument " + std::to_string(i) + " is " +
                                    std::to_string(sizes[i]) + " bytes, the kernel takes " +
                                    std::to_string(k->sizes[i]));
  const size_t threads = (size_t)block[0] * block[1] * block[2];
  if (threads == 0 || threads > 1024 || grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[1] > 65535 ||
      grid[2] > 65535)
    return fail(err, err_len, std::string(name) + ": invalid launch configuration");

  std::lock_guard<std::mutex> guard(lock);
  Launch launch;
  launch.block_dim = dim3{block[0], block[1], block[2]};
  launch.grid_dim = dim3{grid[0], grid[1], grid[2]};
  launch.body = k->body;
  launch.args = args;
  launch.fibers.resize(threads);
  while (stacks.size() < threads) stacks.emplace_back(new char[STACK]);
  for (size_t i = 0; i < threads; ++i) launch.fibers[i].stack = stacks[i].get();
  L = &launch;
  here = &launch;
  here_name = k->name;
  const size_t blocks = (size_t)grid[0] * grid[1] * grid[2];
  const std::vector<size_t> block_order = permutation(blocks, schedule);
  const std::vector<size_t> thread_order = permutation(threads, schedule);
  make_fibers();
  bool ok = true;
  for (size_t b : block_order) {
    launch.block_idx = dim3{(unsigned)(b % grid[0]), (unsigned)(b / grid[0] % grid[1]),
                            (unsigned)(b / ((size_t)grid[0] * grid[1]))};
    if (!(ok = run_block(thread_order))) break;
  }
  L = nullptr;
  here = nullptr;
  if (!ok) {
    const dim3 bi = launch.block_idx;
    return fail(err, err_len, std::string(name) + " block (" + std::to_string(bi.x) + "," + std::to_string(bi.y) +
                                  "," + std::to_string(bi.z) + "): " + launch.error);
  }
  return 0;
}
