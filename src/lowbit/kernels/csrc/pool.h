// The decode-sized kernels' threads: a small pool whose workers spin for a while after each
// task before they sleep, used instead of at::parallel_for (an OpenMP parallel region) for
// work that takes microseconds.
//
// Why by hand: a one-token decode step of a small model is ~150 kernel calls of 10-50 us each,
// and every OpenMP region wakes its threads again. With OMP_WAIT_POLICY=PASSIVE (what shared
// machines use) libgomp puts them to sleep at once, and on a 2-core VM waking one cost more
// than the call's arithmetic: smollm2-135m W4 decoded at 26-44 tok/s with PASSIVE and 97-137
// with ACTIVE (which spins forever, burning a core whenever the process idles). torch has no
// pool with a bounded spin; llama.cpp keeps its own threadpool for the same reason. Here the
// workers spin (pausing, yielding now and then to other runnable threads) for spin_us
// (LOWBIT_SPIN_US, default 1000) after their last task, so the calls of one decode step and
// the steps of one generation find them awake, and an idle process sleeps.
//
// Semantics are at::parallel_for's: [begin, end) cut into at most get_num_threads() chunks of
// at least `grain`; each chunk is run by whichever thread claims it first (the caller too), and
// every output element is computed within one chunk, so results do not depend on which thread
// ran what. Claiming (not a fixed chunk per thread) matters beside another spinning thread:
// with OpenMP's default wait policy the transformers decode loop (torch ops between the
// kernels) fell to 3.3 tok/s when the caller waited for a worker that was not on a core.
// Nested calls (from a worker, inside an OpenMP region) and calls while another thread uses
// the pool run inline or on at::parallel_for. After fork() the child starts a fresh pool (the
// parent's threads do not exist there).
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <strings.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace lowbit_kernels {

class SpinPool {
 public:
  explicit SpinPool(int workers) : forks_(fork_count().load()), spin_ns_(spin_ns()) {
    try {
      for (int t = 0; t < workers; ++t) threads_.emplace_back([this] { work(); });
    } catch (...) {  // a thread could not start: stop those that did before unwinding
      stop();
      throw;
    }
  }

  ~SpinPool() { stop(); }

  int workers() const { return static_cast<int>(threads_.size()); }
  // (a count that a pthread_atfork handler raises in the child: no getpid() system call per
  // kernel call)
  bool forked() const { return fork_count().load(std::memory_order_relaxed) != forks_; }

  static std::atomic<uint64_t>& fork_count() {
    static std::atomic<uint64_t> forks{0};
    static const int registered = pthread_atfork(
        nullptr, nullptr, [] { fork_count().fetch_add(1, std::memory_order_relaxed); });
    (void)registered;
    return forks;
  }

  // fn(ctx, c) for every chunk c in 0..chunks-1, each run once by whichever thread claims it
  // first (the caller claims too); returns when all have run. A worker that is not on a core
  // (another process's or OpenMP's spinning thread holds it) claims nothing, so the caller
  // never waits for it to be scheduled: at worst it runs every chunk itself.
  // chunks <= kMaxChunks.
  void run(void (*fn)(void*, int64_t), void* ctx, int64_t chunks) {
    fn_.store(fn, std::memory_order_relaxed);
    ctx_.store(ctx, std::memory_order_relaxed);
    completed_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    const uint64_t gen = ((state_.load(std::memory_order_relaxed) >> 32) + 1) & 0xffffffffu;
    const uint64_t task = gen << 32 | static_cast<uint64_t>(chunks) << 16;
    state_.store(task, std::memory_order_seq_cst);  // publishes the task (fn_, ctx_ above)
    const int asleep = sleepers_.load(std::memory_order_seq_cst);
    if (asleep > 0) {  // as many as the chunks the caller leaves (the awake ones claim too)
      std::lock_guard<std::mutex> lock(mutex_);  // a sleeper re-checks under it: no lost wake
      const int64_t wanted = std::min<int64_t>(asleep, chunks - 1);
      if (wanted >= asleep) wake_.notify_all();
      else
        for (int64_t i = 0; i < wanted; ++i) wake_.notify_one();
    }
    in_worker() = true;  // a nested call from a chunk runs inline
    drain(task >> 16);
    in_worker() = false;
    // A worker that claimed a chunk and then lost its core is waited for; yield now and then
    // so that it can get it back.
    for (int64_t i = 1; completed_.load(std::memory_order_acquire) < chunks; ++i) {
      _mm_pause();
      if (i % 64 == 0) sched_yield();
    }
    if (error_) std::rethrow_exception(error_);
  }

  static constexpr int64_t kMaxChunks = 0xffff;

 private:
  static int64_t spin_ns() {
    const char* env = std::getenv("LOWBIT_SPIN_US");
    char* end = nullptr;
    const long us = env ? std::strtol(env, &end, 10) : -1;
    const bool whole = env && end != env && *end == '\0' && us >= 0 && us <= 10000000;
    return static_cast<int64_t>(whole ? us : 1000) * 1000;  // not a whole number: the default
  }

  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_.store(true);
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }

  // Claims and runs chunks of one task until none is left; `task` = generation << 16 | chunks.
  // state_ holds the task's generation (32 bits), its chunk count and its next unclaimed
  // chunk (16 bits each) in one word: a claim is one compare-exchange against it, so a late
  // worker whose task has ended sees another task in that word and claims nothing.
  void drain(uint64_t task) {
    const int64_t chunks = static_cast<int64_t>(task & 0xffffu);
    for (;;) {
      uint64_t v = state_.load(std::memory_order_acquire);
      if ((v >> 16) != task) return;
      const int64_t c = static_cast<int64_t>(v & 0xffffu);
      if (c >= chunks) return;
      if (!state_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) continue;
      // chunk c of task gen is ours: the task cannot end (nor fn_/ctx_ change) before it is done
      try {
        fn_.load(std::memory_order_relaxed)(ctx_.load(std::memory_order_relaxed), c);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
      completed_.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  void work() {
    in_worker() = true;
    uint64_t seen = 0;
    auto current = [&] { return state_.load(std::memory_order_seq_cst) >> 16; };
    for (;;) {
      const int64_t since = now_ns();
      uint64_t g;
      for (int64_t i = 1; (g = current()) == seen; ++i) {
        if (stop_.load(std::memory_order_relaxed)) return;
        _mm_pause();
        if (i % 64 == 0) sched_yield();  // let an OpenMP or other thread on this core run
        if (i % 256 == 0 && now_ns() - since > spin_ns_) {
          std::unique_lock<std::mutex> lock(mutex_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          wake_.wait(lock, [&] { return current() != seen || stop_.load(); });
          sleepers_.fetch_sub(1, std::memory_order_relaxed);
          i = 0;
        }
      }
      seen = g;
      drain(g);
    }
  }

 public:
  static bool& in_worker() {
    thread_local bool flag = false;
    return flag;
  }

 private:
  const uint64_t forks_;
  const int64_t spin_ns_;
  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> state_{0};  // generation << 32 | chunks << 16 | next unclaimed chunk
  std::atomic<int64_t> completed_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::atomic<void (*)(void*, int64_t)> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::exception_ptr error_;  // written under mutex_, read after every chunk completed
};

// Held by the thread submitting work (one for every instantiation of parallel_for).
inline std::mutex& pool_guard() {
  static std::mutex guard;
  return guard;
}

// The process's pool for `threads` threads (threads - 1 workers), rebuilt when the thread count
// changes. After fork() the old pool is dropped without joining (its threads are not in the
// child) and deliberately leaked.
inline SpinPool& spin_pool(int threads) {
  static SpinPool* pool = nullptr;
  if (pool && pool->forked()) pool = nullptr;
  if (!pool || pool->workers() != threads - 1) {
    SpinPool* old = pool;
    pool = nullptr;  // (if the new pool fails to start, the next call tries again)
    delete old;
    pool = new SpinPool(threads - 1);
  }
  return *pool;
}

// Whether OpenMP's threads never sleep: OMP_WAIT_POLICY=active; libgomp's GOMP_SPINCOUNT
// infinite or at least the 30 billion spins it uses itself for ACTIVE (a number may carry a
// k/M/G/T suffix); LLVM/Intel OpenMP's KMP_BLOCKTIME=infinite. They are awake for every
// region then, and a spinning pool beside them would share their cores (smollm2 W4 decode
// fell from ~100 to 3 tok/s on 2 cores, measured with fixed chunks per thread before chunks
// were claimed), so OpenMP runs everything.
inline bool openmp_spins() {
  static const bool spins = [] {
    auto is = [](const char* name, const char* value) {
      const char* env = std::getenv(name);
      return env && strcasecmp(env, value) == 0;
    };
    const char* count = std::getenv("GOMP_SPINCOUNT");
    bool long_count = false;
    if (count != nullptr) {
      char* end = nullptr;
      double n = std::strtod(count, &end);
      if (end != count) {
        const char unit = static_cast<char>(tolower(static_cast<unsigned char>(*end)));
        if (unit == 'k') n *= 1e3;
        if (unit == 'm') n *= 1e6;
        if (unit == 'g') n *= 1e9;
        if (unit == 't') n *= 1e12;
        long_count = n >= 3e10;
      }
    }
    return is("OMP_WAIT_POLICY", "active") || is("GOMP_SPINCOUNT", "infinite") ||
           is("GOMP_SPINCOUNT", "infinity") || long_count || is("KMP_BLOCKTIME", "infinite");
  }();
  return spins;
}

// Threads for the pool's work while torch's own ops are held to one (0: torch's count). Set
// by lowbit.kernels.threads around calls whose layers are all pooled GEMVs: a torch op that
// opens an OpenMP region (a mixture's router, a float GEMV through MKL) leaves OpenMP's
// threads spinning for a while after it, on the cores the pool's workers need; on 2 cores
// that halved the speed of the GEMVs that followed (OLMoE's shape: 21 tok/s with the router
// on one thread, 14 without).
// Per calling thread: the Python thread that set it is the one whose calls it changes.
inline int& kernel_threads() {
  static thread_local int threads = 0;
  return threads;
}

// The threads parallel_for below splits work between: the held count, else torch's. Work
// that is cut by thread count before it reaches parallel_for (decode attention's ranges of
// slots) asks here, not at::get_num_threads(), which is 1 while torch is held.
inline int64_t pool_threads() {
  const int held = kernel_threads();
  return std::min<int64_t>(held > 0 ? held : at::get_num_threads(), SpinPool::kMaxChunks);
}

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t threads = pool_threads();
  const int64_t chunks = std::min<int64_t>(threads, (n + grain - 1) / std::max<int64_t>(grain, 1));
  if (chunks <= 1 || SpinPool::in_worker() || at::in_parallel_region()) {
    f(begin, end);
    return;
  }
  std::unique_lock<std::mutex> lock(pool_guard(), std::try_to_lock);
  if (!lock.owns_lock() || openmp_spins()) {  // another thread's decode is using it
    at::parallel_for(begin, end, grain, f);
    return;
  }
  SpinPool& pool = spin_pool(static_cast<int>(threads));
  const int64_t step = (n + chunks - 1) / chunks;
  struct Ctx {
    const F* f;
    int64_t begin, end, step;
  } ctx{&f, begin, end, step};
  pool.run(
      [](void* p, int64_t c) {
        const Ctx& x = *static_cast<const Ctx*>(p);
        const int64_t lo = x.begin + c * x.step, hi = std::min(x.end, lo + x.step);
        if (lo < hi) (*x.f)(lo, hi);
      },
      &ctx, chunks);
}

}  // namespace lowbit_kernels
