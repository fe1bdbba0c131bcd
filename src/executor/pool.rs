//! The preprocessing pool: threads that decode images and tokenize texts for every request,
//! taking one item at a time from each waiting request in turn.
//!
//! Why not a work-stealing pool: rayon runs a job's own work before anything queued after it,
//! so one request of forty 8192x8192 PNGs held every thread for seconds while a one-caption
//! request waited behind it. Here a request's items are claimed one by one, and after each
//! claim the request goes to the back of the line: a request arriving behind others waits, per
//! thread, for the item in hand and at most one more of each request ahead of it, however many
//! items they have; a lone request still has every thread working on it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::status::{self, ExecutorError};

/// Threads that preprocess the items of every request, round-robin over requests.
pub struct PreprocessPool {
    shared: Arc<Shared>,
}

struct Shared {
    line: Mutex<Line>,
    ready: Condvar,
}

/// Requests with items left to claim, in the order they get their next turn.
struct Line {
    jobs: VecDeque<Arc<dyn Claim>>,
    closed: bool,
}

/// One request's work as the workers see it.
trait Claim: Send + Sync {
    /// Takes the next item: its index, and whether more remain after it. None when every item
    /// is claimed or the job stopped.
    fn claim(&self) -> Option<(usize, bool)>;
    /// Preprocesses item `i` and records the outcome; the last one answers the caller.
    fn run(&self, i: usize);
}

struct Job<T, R, F> {
    items: Vec<T>,
    f: F,
    next: AtomicUsize,
    /// Set at the first error, or when the caller went away: nothing more is claimed.
    stopped: AtomicBool,
    state: Mutex<JobState<R>>,
}

struct JobState<R> {
    out: Vec<Option<R>>,
    left: usize,
    tx: Option<tokio::sync::oneshot::Sender<Result<Vec<R>, ExecutorError>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic is caught around each item, outside these locks: a poisoned lock still holds
    // consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T, R, F> Claim for Job<T, R, F>
where
    T: Send + Sync,
    R: Send,
    F: Fn(&T) -> Result<R, ExecutorError> + Send + Sync,
{
    fn claim(&self) -> Option<(usize, bool)> {
        if self.stopped.load(Ordering::Acquire) {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::AcqRel);
        (i < self.items.len()).then(|| (i, i + 1 < self.items.len()))
    }

    fn run(&self, i: usize) {
        // A request whose client went away (tonic dropped the call, and with it the receiver)
        // preprocesses nothing more.
        let gone = lock(&self.state)
            .tx
            .as_ref()
            .is_none_or(|tx| tx.is_closed());
        if gone || self.stopped.load(Ordering::Acquire) {
            self.stopped.store(true, Ordering::Release);
            return;
        }
        // A panic (a decoder bug on a crafted image, say) fails this request, not the thread.
        let item = &self.items[i];
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.f)(item)))
            .unwrap_or_else(|panic| {
                let msg = status::panic_message(panic.as_ref());
                tracing::error!("preprocessing panicked: {msg}");
                Err(ExecutorError::Internal(format!(
                    "preprocessing failed: {msg}"
                )))
            });
        let mut st = lock(&self.state);
        match out {
            Ok(r) => {
                st.out[i] = Some(r);
                st.left -= 1;
                if st.left == 0 {
                    let out = std::mem::take(&mut st.out).into_iter().flatten().collect();
                    if let Some(tx) = st.tx.take() {
                        let _ = tx.send(Ok(out));
                    }
                }
            }
            Err(e) => {
                self.stopped.store(true, Ordering::Release);
                if let Some(tx) = st.tx.take() {
                    let _ = tx.send(Err(e));
                }
            }
        }
    }
}

impl PreprocessPool {
    /// Starts `threads` workers (at least one).
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            line: Mutex::new(Line {
                jobs: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
        });
        for i in 0..threads.max(1) {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("clipft-preprocess-{i}"))
                .spawn(move || work(&shared))?;
        }
        Ok(Self { shared })
    }

    /// `f` over every item, in parallel and in turn with other requests' items; the results
    /// in item order, or the first error. Ends early, leaving the rest undone, at an error or
    /// when the returned future is dropped.
    pub async fn run<T, R, F>(&self, items: Vec<T>, f: F) -> Result<Vec<R>, ExecutorError>
    where
        T: Send + Sync + 'static,
        R: Send + 'static,
        F: Fn(&T) -> Result<R, ExecutorError> + Send + Sync + 'static,
    {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let n = items.len();
        let job = Arc::new(Job {
            items,
            f,
            next: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
            state: Mutex::new(JobState {
                out: std::iter::repeat_with(|| None).take(n).collect(),
                left: n,
                tx: Some(tx),
            }),
        });
        {
            let mut line = lock(&self.shared.line);
            if line.closed {
                return Err(ExecutorError::ShuttingDown);
            }
            line.jobs.push_back(job);
        }
        self.shared.ready.notify_one();
        // The sender goes without an answer only when the pool closes.
        rx.await.map_err(|_| ExecutorError::ShuttingDown)?
    }
}

impl Drop for PreprocessPool {
    /// Workers finish the item in hand and exit; requests still waiting get ShuttingDown.
    fn drop(&mut self) {
        let jobs = {
            let mut line = lock(&self.shared.line);
            line.closed = true;
            std::mem::take(&mut line.jobs)
        };
        self.shared.ready.notify_all();
        drop(jobs);
    }
}

/// A worker: the next request in line gives one item, goes to the back of the line if it has
/// more (so other workers can take them meanwhile), and the item is preprocessed.
fn work(shared: &Shared) {
    loop {
        let job = {
            let mut line = lock(&shared.line);
            loop {
                if line.closed {
                    return;
                }
                if let Some(job) = line.jobs.pop_front() {
                    break job;
                }
                line = shared.ready.wait(line).unwrap_or_else(|p| p.into_inner());
            }
        };
        let Some((i, more)) = job.claim() else {
            continue;
        };
        if more {
            lock(&shared.line).jobs.push_back(job.clone());
            shared.ready.notify_one();
        }
        job.run(i);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    }

    #[test]
    fn results_come_back_in_item_order() {
        let pool = PreprocessPool::new(3).unwrap();
        let rt = runtime();
        let items: Vec<u64> = (0..200).collect();
        let out = rt
            .block_on(pool.run(items, |x| {
                std::thread::sleep(Duration::from_micros(50 * (x % 7)));
                Ok(x * 2)
            }))
            .unwrap();
        assert_eq!(out, (0..200).map(|x| x * 2).collect::<Vec<_>>());
        assert!(rt
            .block_on(pool.run(Vec::<u8>::new(), |_| Ok(())))
            .unwrap()
            .is_empty());
    }

    /// A panicking item fails its request with the panic's message; the pool and the process
    /// go on, and the same threads serve the next request.
    #[test]
    fn a_panic_is_an_error_for_that_request() {
        let pool = PreprocessPool::new(1).unwrap();
        let rt = runtime();
        let err = rt
            .block_on(pool.run(vec![1, 2, 3], |x| -> Result<u32, _> {
                if *x == 2 {
                    panic!("bad image header");
                }
                Ok(*x)
            }))
            .unwrap_err();
        assert!(err.to_string().contains("bad image header"), "{err}");
        assert_eq!(
            rt.block_on(pool.run(vec![7u32], |x| Ok(*x))).unwrap(),
            vec![7]
        );
    }

    #[test]
    fn the_first_error_stops_the_request() {
        let pool = PreprocessPool::new(1).unwrap();
        let rt = runtime();
        let ran = Arc::new(AtomicUsize::new(0));
        let seen = ran.clone();
        let err = rt
            .block_on(pool.run((0..100).collect::<Vec<u32>>(), move |x| {
                seen.fetch_add(1, Ordering::SeqCst);
                match x {
                    3 => Err(ExecutorError::Internal("item 3".into())),
                    x => Ok(*x),
                }
            }))
            .unwrap_err();
        assert!(err.to_string().contains("item 3"), "{err}");
        // One thread: items run in order and none after the error.
        assert_eq!(ran.load(Ordering::SeqCst), 4);
    }

    /// A request sent while a long one is being preprocessed waits for one turn of the long
    /// one, not for its end: with one thread, the short request's item runs after the long
    /// request's item in hand and the one next in line (the long request had gone back to the
    /// line before the short one arrived).
    #[test]
    fn requests_take_turns() {
        let pool = Arc::new(PreprocessPool::new(1).unwrap());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let (order_tx, order_rx) = mpsc::channel::<String>();
        let (started_tx, started_rx) = mpsc::channel::<()>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let go_rx = Mutex::new(go_rx);
        let long = {
            let pool = pool.clone();
            let order = Mutex::new(order_tx.clone());
            let started = Mutex::new(started_tx);
            rt.spawn(async move {
                pool.run((0..20).collect::<Vec<u32>>(), move |i| {
                    if *i == 0 {
                        // Hold the only thread until the short request is in line.
                        let _ = lock(&started).send(());
                        let _ = lock(&go_rx).recv();
                    }
                    let _ = lock(&order).send(format!("long {i}"));
                    Ok(())
                })
                .await
            })
        };
        started_rx.recv().unwrap();
        let short = {
            let pool = pool.clone();
            let order = Mutex::new(order_tx);
            rt.spawn(async move {
                pool.run(vec![0u32], move |_| {
                    let _ = lock(&order).send("short".into());
                    Ok(())
                })
                .await
            })
        };
        // Let the short request reach the line before the long one's first item ends.
        std::thread::sleep(Duration::from_millis(200));
        go_tx.send(()).unwrap();
        rt.block_on(async {
            long.await.unwrap().unwrap();
            short.await.unwrap().unwrap();
        });
        let order: Vec<String> = order_rx.try_iter().collect();
        let at = order.iter().position(|s| s == "short").unwrap();
        assert_eq!(at, 2, "{order:?}");
        assert_eq!(order.len(), 21);
    }

    /// A request whose caller went away preprocesses nothing more.
    #[test]
    fn a_request_stops_when_its_caller_goes() {
        let pool = PreprocessPool::new(1).unwrap();
        let rt = runtime();
        let ran = Arc::new(AtomicUsize::new(0));
        let seen = ran.clone();
        let (started_tx, started_rx) = mpsc::channel::<()>();
        let started = Mutex::new(started_tx);
        let call = pool.run((0..50).collect::<Vec<u32>>(), move |_| {
            seen.fetch_add(1, Ordering::SeqCst);
            let _ = lock(&started).send(());
            std::thread::sleep(Duration::from_millis(20));
            Ok(())
        });
        // Poll the call until its first item runs, then drop it, as tonic drops a cancelled call.
        rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_millis(1), call).await;
        });
        let _ = started_rx.recv_timeout(Duration::from_secs(2));
        // The pool is free again: a later request is served, and few of the 50 items ran.
        assert_eq!(
            rt.block_on(pool.run(vec![1u8], |x| Ok(*x))).unwrap(),
            vec![1]
        );
        assert!(
            ran.load(Ordering::SeqCst) <= 2,
            "{}",
            ran.load(Ordering::SeqCst)
        );
    }
}
