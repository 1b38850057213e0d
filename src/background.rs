//! Threads for work off the request path, at a lower CPU priority than the API.
//!
//! The decision-log writer and the workers runtime each run on a thread of their own with
//! their own database connections. On Linux a nice value belongs to a thread and is inherited
//! by the threads it starts, so lowering it at the top of such a thread also lowers the
//! database threads it opens (SQLite's connection workers). When the CPU is busy the
//! scheduler then runs a waiting request first and lets a batch commit or an outbox burst
//! wait; when it is idle, the background work runs at full speed.

use std::io;
use std::thread::JoinHandle;

/// Start `work` on a new thread named `name`, `nice` steps below the priority of the thread
/// that starts it (0: the same priority). A priority that cannot be lowered is logged and
/// the work runs anyway.
pub fn spawn<F>(name: &str, nice: u8, work: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let thread_name = name.to_string();
    std::thread::Builder::new()
        .name(thread_name.clone())
        .spawn(move || {
            if nice > 0 {
                if let Err(e) = lower_priority(nice) {
                    tracing::warn!(thread = %thread_name, error = %e, "cannot lower the thread's priority; it runs at the API's");
                }
            }
            work();
        })
}

/// Lower the calling thread's priority by `steps` nice levels (capped at the lowest, 19).
/// Linux only: elsewhere `setpriority` would lower the whole process, API included.
#[cfg(target_os = "linux")]
fn lower_priority(steps: u8) -> io::Result<()> {
    use rustix::process::{getpriority_process, setpriority_process};
    // `None` is the calling thread on Linux, whose nice values are per thread.
    let current = getpriority_process(None)?;
    let target = (current + i32::from(steps)).min(19);
    setpriority_process(None, target)?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn lower_priority(_steps: u8) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "per-thread priorities are set on Linux only",
    ))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn nice_of_this_thread() -> i32 {
        rustix::process::getpriority_process(None).unwrap()
    }

    #[test]
    fn lowers_the_new_thread_and_the_threads_it_starts_not_the_caller() {
        let before = nice_of_this_thread();
        let (tx, rx) = std::sync::mpsc::channel();
        spawn("test-background", 5, move || {
            let own = nice_of_this_thread();
            let child = std::thread::spawn(nice_of_this_thread).join().unwrap();
            tx.send((own, child)).unwrap();
        })
        .unwrap()
        .join()
        .unwrap();
        let (own, child) = rx.recv().unwrap();
        let expected = (before + 5).min(19);
        assert_eq!(own, expected);
        assert_eq!(
            child, expected,
            "a thread it starts inherits the nice value"
        );
        assert_eq!(
            nice_of_this_thread(),
            before,
            "the caller keeps its priority"
        );
    }

    #[test]
    fn zero_keeps_the_priority() {
        let before = nice_of_this_thread();
        let (tx, rx) = std::sync::mpsc::channel();
        spawn("test-background", 0, move || {
            tx.send(nice_of_this_thread()).unwrap();
        })
        .unwrap()
        .join()
        .unwrap();
        assert_eq!(rx.recv().unwrap(), before);
    }
}
