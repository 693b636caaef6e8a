//! A future that is polled only when its own waker fired: for the rare
//! events (a failover, a shutdown) a relay waits on beside its sockets.
//! `tokio::select!` polls every branch at every wake-up of the task, and
//! polling a pending `Notify` wait takes that Notify's lock; with this
//! filter a wake-up for bytes costs the rare branches one atomic swap.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;
use pin_project_lite::pin_project;

pin_project! {
    /// Polls `inner` the first time and then only after `inner` asked to
    /// be woken; otherwise it stays pending without touching `inner`.
    pub struct WakeFilter<F> {
        #[pin]
        inner: F,
        signal: Arc<Signal>,
        // `signal` as a waker, made once.
        waker: Waker,
    }
}

/// Whether the inner future was woken, and the task to wake for it.
struct Signal {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> WakeFilter<F> {
    pub fn new(inner: F) -> WakeFilter<F> {
        let signal = Arc::new(Signal {
            // Polled once at first, so that it can register its waits.
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        WakeFilter {
            inner,
            waker: Waker::from(signal.clone()),
            signal,
        }
    }
}

impl<F: Future> Future for WakeFilter<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // The task is registered before the flag is read: a wake-up that
        // comes after the read still reaches the task.
        this.signal.task.register(cx.waker());
        if !this.signal.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.inner.poll(&mut Context::from_waker(this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;
    use tokio::sync::{mpsc, Notify};

    #[tokio::test]
    async fn the_inner_future_is_polled_only_when_woken_and_its_wake_reaches_the_task() {
        let (notify, polls) = (Arc::new(Notify::new()), Arc::new(AtomicUsize::new(0)));
        let inner = {
            let (notify, polls) = (notify.clone(), polls.clone());
            async move {
                let mut notified = std::pin::pin!(notify.notified());
                std::future::poll_fn(|cx| {
                    polls.fetch_add(1, Ordering::SeqCst);
                    notified.as_mut().poll(cx)
                })
                .await
            }
        };
        // A task woken five times for "bytes" beside the filtered wait.
        let (bytes, mut more_bytes) = mpsc::channel::<()>(8);
        let relay = tokio::spawn(async move {
            let mut filtered = std::pin::pin!(WakeFilter::new(inner));
            let mut wakes = 0;
            loop {
                tokio::select! {
                    () = &mut filtered => return wakes,
                    Some(()) = more_bytes.recv() => wakes += 1,
                }
            }
        });
        for _ in 0..5 {
            bytes.send(()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Polled once, to register its wait: not at every wake-up.
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        notify.notify_one();
        let woken = tokio::time::timeout(Duration::from_secs(5), relay).await;
        assert_eq!(woken.expect("the wake-up reached the task").unwrap(), 5);
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_superseding_route_reaches_a_relay_waiting_on_bytes() {
        use crate::proxy::routing::{superseded, Discovery, Principal, Route};
        use crate::roles::Epoch;
        let principal = Principal {
            address: "127.0.0.1:5432".into(),
            server_name: "alpha".into(),
            discovery: Discovery::Agent,
        };
        let route = {
            let principal = principal.clone();
            move |epoch, name: &str| Route {
                epoch: Epoch(epoch),
                principal: Some(Principal {
                    server_name: name.into(),
                    ..principal.clone()
                }),
                ..Default::default()
            }
        };
        let (publish, mut routes) = tokio::sync::watch::channel(route(3, "alpha"));
        let (_bytes, mut no_bytes) = mpsc::channel::<()>(1);
        let relay = tokio::spawn(async move {
            let mut failover = std::pin::pin!(WakeFilter::new(superseded(
                &mut routes,
                Epoch(3),
                &principal
            )));
            tokio::select! {
                () = &mut failover => {}
                _ = no_bytes.recv() => panic!("no bytes were sent"),
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The same principal at its epoch: not a failover.
        publish.send(route(3, "alpha")).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!relay.is_finished());
        publish.send(route(4, "beta")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .expect("the relay saw the failover")
            .unwrap();
    }
}
