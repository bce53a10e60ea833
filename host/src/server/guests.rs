//! Where untrusted module code runs in the server: its own small async
//! runtime whose threads have the lowest CPU priority.
//!
//! Model inference runs on the pool's worker threads at normal priority;
//! a strategy module's own code (the WebAssembly) runs here. The sandbox
//! bounds how long and how much a module may run, but while it runs it
//! competes for the same cores as inference. At `nice 19` a module spinning
//! until its deadline takes what inference leaves over instead of half of
//! it, so one tenant's broken or hostile module barely slows another
//! tenant's requests (figures: benches/RESULTS.md, "isolation"). A benign
//! strategy's own code is small next to the model calls it makes, so the
//! low priority costs it little.

use std::future::Future;

use tokio::runtime::Handle;

/// A handle to the guest runtime; dropping the last one stops it.
pub struct Guests {
    handle: Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Lowers the calling thread's CPU priority (Linux applies `setpriority`
/// with `who = 0` to the calling thread only).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority has no memory-safety preconditions; failure (not
    // permitted) leaves the priority as it was, which is harmless.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
    }
}

impl Guests {
    /// Starts the runtime with `threads` workers on a thread of its own (so
    /// it can be dropped from async code).
    pub fn start(threads: usize) -> std::io::Result<Self> {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("tessera-guests".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads.max(1))
                    .thread_name("tessera-guest")
                    .on_thread_start(lower_priority)
                    .enable_all()
                    .build();
                match rt {
                    Ok(rt) => {
                        let _ = handle_tx.send(Ok(rt.handle().clone()));
                        rt.block_on(async {
                            let _ = stopped.await;
                        });
                    }
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                    }
                }
            })?;
        let handle = handle_rx
            .recv()
            .map_err(|_| std::io::Error::other("the guest runtime thread died"))??;
        Ok(Guests { handle, _stop: stop })
    }

    /// Runs `fut` on the guest runtime and waits for it. If the runtime is
    /// gone (shutting down), the error says so.
    ///
    /// The task lives only as long as this call: a caller that stops
    /// waiting (its request timed out, its client left) drops the call,
    /// and that aborts the task, module and model calls with it, instead
    /// of leaving it to run on detached, unbilled and outside admission.
    pub async fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        let task = self.handle.spawn(fut);
        let _abort = AbortOnDrop(task.abort_handle());
        task.await
    }
}

/// Aborts its task when dropped (a no-op once the task has finished).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
