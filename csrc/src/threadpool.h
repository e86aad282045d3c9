// threadpool.h — a fixed pool of worker threads for data-parallel loops on the CPU backend.
#pragma once
#include <cstdint>
#include <functional>

namespace pumice {

class ThreadPool {
public:
    explicit ThreadPool(int n_threads);  // n_threads <= 0: all hardware threads
    ~ThreadPool();
    ThreadPool(const ThreadPool &) = delete;
    ThreadPool &operator=(const ThreadPool &) = delete;

    int size() const;
    // Calls fn(begin, end) on disjoint chunks covering [0, n), spread over the workers and the
    // calling thread; returns when all are done. Chunks hold at least `grain` items. Exceptions
    // thrown by fn are rethrown in the caller (the first one).
    void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)> &fn);

private:
    struct Impl;
    Impl *impl_;
};

}  // namespace pumice
