// The emulator's scheduler: a launch runs its blocks one after another on the calling OS
// thread; a block's CUDA threads are fibers (ucontext) that run in turn until each reaches a
// barrier, and a barrier is released once every thread it concerns waits at it. A state where
// no fiber can run and no barrier can be released is a kernel bug (a barrier inside divergent
// code, a shuffle with exited lanes), reported with the block and the threads' states.

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "emu.h"

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace clipft_emu {
namespace {

constexpr size_t STACK = 256 * 1024;  // per fiber
constexpr size_t GUARD = 256;         // poisoned bytes after the dynamic shared memory
constexpr unsigned char POISON = 0xff;  // NaN in f32, f16 and bf16

enum class St { Run, Warp, Block, Done, Failed };

// Dynamic shared memory: the launch's bytes and GUARD poisoned ones after them, between two
// inaccessible pages, so a write far outside faults where it happens and a write just past
// the end is found by the guard check.
class SharedMem {
  public:
    bool init(size_t bytes) {
        page_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
        size_ = bytes + GUARD;
        const size_t body = (size_ + page_ - 1) / page_ * page_;
        len_ = body + 2 * page_;
        void* m = mmap(nullptr, len_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) return false;
        base_ = static_cast<unsigned char*>(m);
        if (mprotect(base_ + page_, body, PROT_READ | PROT_WRITE) != 0) return false;
        // The end of the guard bytes meets the inaccessible page after them.
        data_ = base_ + page_ + (body - size_);
        data_ = reinterpret_cast<unsigned char*>(reinterpret_cast<uintptr_t>(data_) & ~uintptr_t{63});
        return true;
    }
    ~SharedMem() {
        if (base_ != nullptr) munmap(base_, len_);
    }
    unsigned char* data() { return data_; }
    unsigned char* begin() { return data_; }
    unsigned char* end() { return data_ + size_; }
    size_t size() const { return size_; }
    unsigned char operator[](size_t i) const { return data_[i]; }

  private:
    unsigned char* base_ = nullptr;
    unsigned char* data_ = nullptr;
    size_t len_ = 0, size_ = 0, page_ = 0;
};

struct Fiber {
    ucontext_t ctx;
    St st;
    Sync kind;
    unsigned mask;
};

struct Launch {
    const Entry* entry = nullptr;
    const uint64_t* args = nullptr;
    unsigned threads = 0, warps = 0;
    std::vector<Fiber> fibers;
    char* stacks = nullptr;
    ucontext_t sched;
    unsigned cur = 0;
    std::vector<uint64_t> slots;  // [warp][parity][lane]
    std::vector<unsigned> warp_gen;
    SharedMem smem;
    size_t smem_bytes = 0;
    std::string error;
};

thread_local Launch* g = nullptr;

const char* state_name(St s) {
    switch (s) {
        case St::Run: return "running";
        case St::Warp: return "at a warp barrier";
        case St::Block: return "at __syncthreads";
        case St::Done: return "exited";
        case St::Failed: return "failed";
    }
    return "?";
}

const char* sync_name(Sync s) {
    switch (s) {
        case Sync::Shfl: return "a shuffle";
        case Sync::SyncWarp: return "__syncwarp";
        case Sync::WmmaLoad: return "wmma::load_matrix_sync";
        case Sync::WmmaMma: return "wmma::mma_sync";
        case Sync::WmmaStore: return "wmma::store_matrix_sync";
    }
    return "?";
}

void set_thread(unsigned tid) {
    threadIdx.x = tid % blockDim.x;
    threadIdx.y = (tid / blockDim.x) % blockDim.y;
    threadIdx.z = tid / (blockDim.x * blockDim.y);
}

unsigned linear_tid() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

void fiber_main(int idx) {
    g->entry->invoke(g->entry->fn, g->args);
    g->fibers[idx].st = St::Done;
    // Returning resumes uc_link: the scheduler.
}

std::string where() {
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s, block (%u, %u, %u)", g->entry->name, blockIdx.x,
                  blockIdx.y, blockIdx.z);
    return buf;
}

std::string states() {
    std::string s;
    for (unsigned w = 0; w < g->warps; ++w) {
        s += "\n  warp " + std::to_string(w) + ":";
        const unsigned end = std::min(g->threads, (w + 1) * 32);
        for (unsigned t = w * 32; t < end; ++t) {
            const Fiber& f = g->fibers[t];
            if (t == w * 32 || f.st != g->fibers[t - 1].st ||
                (f.st == St::Warp && f.kind != g->fibers[t - 1].kind)) {
                s += std::string(" [") + std::to_string(t % 32) + "..] " + state_name(f.st);
                if (f.st == St::Warp) s += std::string(" (") + sync_name(f.kind) + ")";
            }
        }
    }
    return s;
}

// Releases warp w's lanes from a warp operation all of them (that have not exited) wait at:
// 1 if it did, 0 if the warp is not there, -1 with g->error set on a synchronisation error.
int release_warp(unsigned w) {
    {
        const unsigned begin = w * 32, end = std::min(g->threads, begin + 32);
        unsigned waiting = 0, done = 0;
        for (unsigned t = begin; t < end; ++t) {
            waiting += g->fibers[t].st == St::Warp;
            done += g->fibers[t].st == St::Done;
        }
        if (waiting == 0 || waiting + done != end - begin) return 0;
        Sync kind = Sync::SyncWarp;
        unsigned mask = 0;
        for (unsigned t = begin; t < end; ++t)
            if (g->fibers[t].st == St::Warp) {
                kind = g->fibers[t].kind;
                mask = g->fibers[t].mask;
                break;
            }
        for (unsigned t = begin; t < end; ++t) {
            const Fiber& f = g->fibers[t];
            if (f.st != St::Warp) continue;
            if (f.kind != kind) {
                g->error = where() + ": the lanes of warp " + std::to_string(w) +
                           " wait at different warp operations (" + sync_name(kind) + ", " +
                           sync_name(f.kind) + ")" + states();
                return -1;
            }
            if (f.mask != mask) {
                g->error = where() + ": the lanes of warp " + std::to_string(w) +
                           " name different masks at " + sync_name(kind);
                return -1;
            }
        }
        const unsigned full = end - begin == 32 ? 0xffffffffu : (1u << (end - begin)) - 1u;
        if (done > 0 && (mask & full) != 0) {
            unsigned exited = 0;
            for (unsigned t = begin; t < end; ++t)
                if (g->fibers[t].st == St::Done) exited |= 1u << (t - begin);
            if (mask & exited) {
                g->error = where() + ": " + sync_name(kind) + " in warp " + std::to_string(w) +
                           " names lanes that have exited" + states();
                return -1;
            }
        }
        for (unsigned t = begin; t < end; ++t)
            if (g->fibers[t].st == St::Warp) g->fibers[t].st = St::Run;
        g->warp_gen[w] += 1;
        return 1;
    }
}

// Releases what can be released; false if nothing could.
bool release() {
    bool any = false;
    for (unsigned w = 0; w < g->warps; ++w) {
        const int r = release_warp(w);
        if (r < 0) return false;
        any |= r > 0;
    }
    if (any) return true;
    unsigned waiting = 0, done = 0;
    for (const Fiber& f : g->fibers) {
        waiting += f.st == St::Block;
        done += f.st == St::Done;
    }
    // Exited threads do not hold a block barrier up (as on sm_70 and later).
    if (waiting > 0 && waiting + done == g->threads) {
        for (Fiber& f : g->fibers)
            if (f.st == St::Block) f.st = St::Run;
        return true;
    }
    return false;
}

// Runs the current block to its end; false with g->error set on a kernel error.
bool run_block() {
    for (unsigned t = 0; t < g->threads; ++t) {
        Fiber& f = g->fibers[t];
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = g->stacks + (size_t)t * STACK;
        f.ctx.uc_stack.ss_size = STACK;
        f.ctx.uc_link = &g->sched;
        makecontext(&f.ctx, reinterpret_cast<void (*)()>(fiber_main), 1, static_cast<int>(t));
        f.st = St::Run;
    }
    std::fill(g->warp_gen.begin(), g->warp_gen.end(), 0u);
    std::fill(g->smem.begin(), g->smem.end(), POISON);
    // Even blocks run their threads first to last, all warps in step (each warp operation
    // waits for every warp to reach its own). Odd blocks run them last to first, each warp as
    // far as it can go (through its warp operations) before the next: a missing barrier then
    // shows whichever way the data flows between threads (a reader that runs before its
    // writer reads poison or stale values; a writer of the next phase that runs before the
    // last phase's reader overwrites what it reads).
    const unsigned linear = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const bool reverse = linear % 2 == 1;
    // Runs thread t until it waits or ends; false on a kernel error.
    auto step = [](unsigned t) {
        g->cur = t;
        set_thread(t);
        swapcontext(&g->sched, &g->fibers[t].ctx);
        return g->fibers[t].st != St::Failed;
    };
    for (;;) {
        bool ran = false;
        if (reverse) {
            for (unsigned wi = 0; wi < g->warps; ++wi) {
                const unsigned w = g->warps - 1 - wi;
                const unsigned begin = w * 32, end = std::min(g->threads, begin + 32);
                for (;;) {
                    for (unsigned t = end; t-- > begin;) {
                        if (g->fibers[t].st != St::Run) continue;
                        if (!step(t)) return false;
                        ran = true;
                    }
                    const int r = release_warp(w);
                    if (r < 0) return false;
                    if (r == 0) break;
                }
            }
        } else {
            for (unsigned t = 0; t < g->threads; ++t) {
                if (g->fibers[t].st != St::Run) continue;
                if (!step(t)) return false;
                ran = true;
            }
        }
        bool finished = true;
        for (const Fiber& f : g->fibers) finished &= f.st == St::Done;
        if (finished) break;
        if (!release()) {
            if (!g->error.empty()) return false;
            if (!ran) {
                g->error = where() + ": no thread can go on (a barrier in divergent code?)" +
                           states();
                return false;
            }
        }
    }
    for (size_t i = g->smem_bytes; i < g->smem.size(); ++i)
        if (g->smem[i] != POISON) {
            g->error = where() + ": a write past the " + std::to_string(g->smem_bytes) +
                       " bytes of dynamic shared memory it was launched with";
            return false;
        }
    return true;
}

Fiber& me() { return g->fibers[g->cur]; }

void wait(St st, Sync kind, unsigned mask) {
    Fiber& f = me();
    f.st = st;
    f.kind = kind;
    f.mask = mask;
    // Resumed by the scheduler once the barrier is released, with this fiber's coordinates
    // set again.
    swapcontext(&f.ctx, &g->sched);
}

}  // namespace

void warp_sync(Sync kind, unsigned mask) {
    if (mask != 0xffffffffu) fail(std::string(sync_name(kind)) + " with a partial mask is not emulated");
    wait(St::Warp, kind, mask);
}

void block_sync() { wait(St::Block, Sync::SyncWarp, 0); }

void* dynamic_shared() { return g->smem.data(); }

unsigned lane() { return linear_tid() % 32; }

uint64_t exchange(uint64_t v, unsigned src, unsigned mask) {
    const unsigned t = linear_tid(), w = t / 32;
    const unsigned parity = g->warp_gen[w] & 1u;
    uint64_t* slots = g->slots.data() + ((size_t)w * 2 + parity) * 32;
    slots[t % 32] = v;
    warp_sync(Sync::Shfl, mask);
    // The next shuffle writes the other parity; this one's slots are rewritten only after
    // every lane has passed the next barrier, so after every lane has read them.
    if (w * 32 + src >= g->threads) fail("a shuffle from a lane past the block's threads");
    return slots[src];
}

void fail(const std::string& why) {
    g->error = where() + ", thread " + std::to_string(linear_tid()) + ": " + why;
    me().st = St::Failed;
    setcontext(&g->sched);
    __builtin_unreachable();
}

}  // namespace clipft_emu

// `given` names the kernel's arguments `want`: the same tags, where "*0" (a null pointer)
// stands for a pointer to any type.
static bool tags_match(const std::string& given, const std::string& want) {
    if (given.size() != want.size()) return false;
    for (size_t i = 0; i < given.size(); ++i)
        if (given[i] != want[i] && !(given[i] == '0' && i > 0 && want[i - 1] == '*')) return false;
    return true;
}

// The kernel tables build.rs generates, one per .cu file.
extern "C" const clipft_emu::Entry* clipft_emu_find(const char* name);

// Runs kernel `name` over `grid` blocks of `block` threads with `smem` bytes of dynamic shared
// memory, its arguments in 64-bit slots described by `tags` (the C++ signature's, checked).
// Returns 0, or 1 with a message in err.
extern "C" int clipft_emu_launch(const char* name, const char* tags, const uint64_t* args,
                                 const unsigned* grid, const unsigned* block, size_t smem,
                                 char* err, size_t errlen) {
    using namespace clipft_emu;
    auto report = [&](const std::string& msg) {
        std::snprintf(err, errlen, "%s", msg.c_str());
        return 1;
    };
    const Entry* e = clipft_emu_find(name);
    if (e == nullptr) return report(std::string("no kernel named ") + name);
    const std::string want = e->tags();
    if (!tags_match(tags, want))
        return report(std::string(name) + " takes arguments " + want + ", given " + tags);
    const unsigned threads = block[0] * block[1] * block[2];
    if (threads == 0 || threads > e->max_threads)
        return report(std::string(name) + ": blocks of 1 to " + std::to_string(e->max_threads) +
                      " threads (its __launch_bounds__), not " + std::to_string(threads));
    Launch l;
    l.entry = e;
    l.args = args;
    l.threads = threads;
    l.warps = (threads + 31) / 32;
    l.fibers.resize(threads);

    l.slots.assign((size_t)l.warps * 2 * 32, 0);
    l.warp_gen.assign(l.warps, 0);
    l.smem_bytes = smem;
    if (!l.smem.init(smem)) return report("no memory for the shared memory");
    void* stacks = mmap(nullptr, (size_t)threads * STACK, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (stacks == MAP_FAILED) return report("no memory for the fibers' stacks");
    l.stacks = static_cast<char*>(stacks);
    Launch* outer = g;
    g = &l;
    blockDim = dim3{block[0], block[1], block[2]};
    gridDim = dim3{grid[0], grid[1], grid[2]};
    bool ok = true;
    for (unsigned z = 0; ok && z < grid[2]; ++z)
        for (unsigned y = 0; ok && y < grid[1]; ++y)
            for (unsigned x = 0; ok && x < grid[0]; ++x) {
                blockIdx = uint3{x, y, z};
                ok = run_block();
            }
    g = outer;
    munmap(stacks, (size_t)threads * STACK);
    return ok ? 0 : report(l.error);
}
