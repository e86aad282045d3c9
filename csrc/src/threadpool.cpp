// threadpool.cpp — persistent workers with a spin-then-sleep wait.
//
// A decode step issues a few hundred parallel_for calls of a few microseconds each, so the
// dispatch path must not go through the kernel when workers are awake: the caller publishes a
// job by bumping a tagged counter, workers spin on it for a short while after each job and only
// then fall asleep on a condition variable (woken only if someone actually sleeps).
//
// Chunks are claimed with a compare-and-swap on one 64-bit word that holds the job's
// generation (high 32 bits) and the next chunk index (low 32 bits). A worker that read a stale
// job can therefore never claim a chunk of the next one: its CAS fails because the tag moved.
// The caller participates in its own job and returns once every chunk has been completed, so
// it never waits for a sleeping worker to wake up.
#include "threadpool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#define PUMICE_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define PUMICE_CPU_RELAX() __asm__ __volatile__("yield")
#else
#define PUMICE_CPU_RELAX() ((void)0)
#endif

namespace pumice {

namespace {

// How long an idle worker keeps spinning after its last job before it sleeps. Long enough to
// bridge the serial gaps inside a decode step (norms, attention bookkeeping), short enough not
// to steal a shared core for long once the model is idle.
constexpr auto kSpinBudget = std::chrono::microseconds(300);
// Caller-side wait for chunks still running on other threads: spin, then yield the core so that
// a descheduled worker can finish on an oversubscribed machine.
constexpr int kCallerSpinsBeforeYield = 1 << 14;
// Chunks per thread: more than one so that a thread delayed by the OS does not hold up the job.
constexpr int64_t kChunksPerThread = 4;

thread_local bool t_inside_pool_job = false;

inline uint64_t make_tag(uint32_t generation, uint32_t index) {
    return (uint64_t(generation) << 32) | index;
}
inline uint32_t tag_generation(uint64_t tag) { return uint32_t(tag >> 32); }
inline uint32_t tag_index(uint64_t tag) { return uint32_t(tag & 0xffffffffu); }

}  // namespace

struct ThreadPool::Impl {
    int n_threads = 1;
    std::vector<std::thread> workers;

    // The current job. Fields other than `tag` are written by the caller before it publishes a
    // new generation in `tag` (release) and read by workers after they observe it (acquire).
    alignas(64) std::atomic<uint64_t> tag{0};
    alignas(64) std::atomic<const std::function<void(int64_t, int64_t)> *> fn{nullptr};
    std::atomic<int64_t> n{0};
    std::atomic<int64_t> chunk{1};
    std::atomic<uint32_t> n_chunks{0};
    alignas(64) std::atomic<uint32_t> done{0};

    std::mutex error_mutex;
    std::exception_ptr error;

    // Sleeping workers.
    std::mutex sleep_mutex;
    std::condition_variable wake;
    std::atomic<int> sleepers{0};
    std::atomic<bool> stopping{false};

    // One job at a time; concurrent callers queue here.
    std::mutex dispatch_mutex;

    void run_chunk(uint32_t index) {
        const int64_t total = n.load(std::memory_order_relaxed);
        const int64_t size = chunk.load(std::memory_order_relaxed);
        const int64_t begin = int64_t(index) * size;
        const int64_t end = std::min(total, begin + size);
        try {
            (*fn.load(std::memory_order_relaxed))(begin, end);
        } catch (...) {
            std::lock_guard<std::mutex> lock(error_mutex);
            if (!error) error = std::current_exception();
        }
        done.fetch_add(1, std::memory_order_acq_rel);
    }

    // Claims and runs chunks of generation `generation` until none are left or the job changed.
    void work_on(uint32_t generation) {
        uint64_t current = tag.load(std::memory_order_acquire);
        for (;;) {
            if (tag_generation(current) != generation) return;
            const uint32_t index = tag_index(current);
            if (index >= n_chunks.load(std::memory_order_relaxed)) return;
            if (tag.compare_exchange_weak(current, make_tag(generation, index + 1),
                                          std::memory_order_acq_rel,
                                          std::memory_order_acquire)) {
                run_chunk(index);
                current = tag.load(std::memory_order_acquire);
            }
        }
    }

    void worker_loop() {
        t_inside_pool_job = true;  // nested parallel_for from a worker runs inline
        uint32_t seen = tag_generation(tag.load(std::memory_order_acquire));
        for (;;) {
            // Spin for a while waiting for the next generation.
            auto spin_start = std::chrono::steady_clock::now();
            uint32_t generation = seen;
            for (int spins = 0;; ++spins) {
                generation = tag_generation(tag.load(std::memory_order_acquire));
                if (generation != seen || stopping.load(std::memory_order_relaxed)) break;
                PUMICE_CPU_RELAX();
                if ((spins & 255) == 255 &&
                    std::chrono::steady_clock::now() - spin_start > kSpinBudget) {
                    std::unique_lock<std::mutex> lock(sleep_mutex);
                    sleepers.fetch_add(1, std::memory_order_seq_cst);
                    wake.wait(lock, [&] {
                        return stopping.load(std::memory_order_seq_cst) ||
                               tag_generation(tag.load(std::memory_order_seq_cst)) != seen;
                    });
                    sleepers.fetch_sub(1, std::memory_order_relaxed);
                    spin_start = std::chrono::steady_clock::now();
                }
            }
            if (stopping.load(std::memory_order_relaxed)) return;
            work_on(generation);
            seen = generation;
        }
    }
};

ThreadPool::ThreadPool(int n_threads) : impl_(new Impl) {
    if (n_threads <= 0) n_threads = int(std::max(1u, std::thread::hardware_concurrency()));
    impl_->n_threads = n_threads;
    try {
        impl_->workers.reserve(size_t(n_threads - 1));
        for (int i = 1; i < n_threads; ++i)
            impl_->workers.emplace_back([impl = impl_] { impl->worker_loop(); });
    } catch (...) {
        impl_->stopping.store(true);
        impl_->wake.notify_all();
        for (auto &t : impl_->workers) t.join();
        delete impl_;
        throw;
    }
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(impl_->sleep_mutex);
        impl_->stopping.store(true, std::memory_order_seq_cst);
    }
    impl_->wake.notify_all();
    for (auto &t : impl_->workers) t.join();
    delete impl_;
}

int ThreadPool::size() const { return impl_->n_threads; }

void ThreadPool::parallel_for(int64_t n, int64_t grain,
                              const std::function<void(int64_t, int64_t)> &fn) {
    if (n <= 0) return;
    grain = std::max<int64_t>(1, grain);
    Impl &p = *impl_;
    const int64_t max_chunks = std::min<int64_t>((n + grain - 1) / grain,
                                                 int64_t(p.n_threads) * kChunksPerThread);
    // Serial cases: one thread, tiny loops, or a nested call from inside a job.
    if (p.n_threads == 1 || max_chunks <= 1 || t_inside_pool_job) {
        fn(0, n);
        return;
    }

    std::lock_guard<std::mutex> dispatch(p.dispatch_mutex);
    const int64_t chunk = (n + max_chunks - 1) / max_chunks;
    const uint32_t n_chunks = uint32_t((n + chunk - 1) / chunk);

    // Close the previous job's chunk counter first: a worker still in work_on() for it would
    // otherwise read the new n_chunks below and claim (and count as done) a chunk of this job.
    p.tag.store(make_tag(tag_generation(p.tag.load(std::memory_order_relaxed)), UINT32_MAX), std::memory_order_seq_cst);
    p.fn.store(&fn, std::memory_order_relaxed);
    p.n.store(n, std::memory_order_relaxed);
    p.chunk.store(chunk, std::memory_order_relaxed);
    p.n_chunks.store(n_chunks, std::memory_order_relaxed);
    p.done.store(0, std::memory_order_relaxed);
    p.error = nullptr;
    const uint32_t generation = tag_generation(p.tag.load(std::memory_order_relaxed)) + 1;
    p.tag.store(make_tag(generation, 0), std::memory_order_seq_cst);
    if (p.sleepers.load(std::memory_order_seq_cst) > 0) {
        std::lock_guard<std::mutex> lock(p.sleep_mutex);
        p.wake.notify_all();
    }

    t_inside_pool_job = true;
    p.work_on(generation);
    for (int spins = 0; p.done.load(std::memory_order_acquire) < n_chunks; ++spins) {
        if (spins < kCallerSpinsBeforeYield) {
            PUMICE_CPU_RELAX();
        } else {
            std::this_thread::yield();
        }
    }
    t_inside_pool_job = false;

    std::exception_ptr error;
    {
        std::lock_guard<std::mutex> lock(p.error_mutex);
        error = p.error;
        p.error = nullptr;
    }
    if (error) std::rethrow_exception(error);
}

}  // namespace pumice
