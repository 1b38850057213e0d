//! What a client may hold of the server's connections: a share per client address, an idle
//! bound that PINGs and keep-alive do not reset, and, near the global limit, room made for a
//! new client by closing the connection idle longest (docs/operations.md, "Connections").
//!
//! A connection is idle while it has no request in flight. That is counted here, in the
//! service wrapper, because hyper's HTTP/2 server has no timeout for a connection without
//! streams: its keep-alive only checks that the peer answers PINGs, which a hoarder does.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio_util::sync::CancellationToken;

use crate::config::ConnectionLimits;
use crate::telemetry::Metrics;

/// The open connections of one listener.
pub(super) struct Conns {
    inner: Mutex<Inner>,
    limits: ConnectionLimits,
    epoch: Instant,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    open: HashMap<u64, Arc<Conn>>,
    by_address: HashMap<IpAddr, usize>,
}

/// One connection's state, shared by its task and its requests.
pub(super) struct Conn {
    /// Requests in flight, their response bodies included (an event stream is in flight
    /// until it ends).
    active: AtomicUsize,
    /// When `active` last fell to 0, in milliseconds since the listener's epoch.
    idle_since: AtomicU64,
    /// Set once the connection holds a permit of the global limit: only then may it be
    /// closed to make room (one still waiting for a permit holds nothing).
    admitted: AtomicBool,
    /// Cancelled to close the connection gracefully: at shutdown, or to make room.
    pub(super) close: CancellationToken,
    epoch: Instant,
}

/// A connection's place in [`Conns`], given back when the connection ends.
pub(super) struct Registered {
    conns: Arc<Conns>,
    id: u64,
    address: IpAddr,
    pub(super) conn: Arc<Conn>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let Ok(mut inner) = self.conns.inner.lock() else {
            return;
        };
        inner.open.remove(&self.id);
        if let Some(n) = inner.by_address.get_mut(&self.address) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inner.by_address.remove(&self.address);
            }
        }
    }
}

/// A client address holds its whole share of connections already.
#[derive(Debug)]
pub(super) struct AddressFull(pub usize);

impl Conns {
    pub(super) fn new(limits: ConnectionLimits, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            limits,
            epoch: Instant::now(),
            metrics,
        }
    }

    /// Count a new connection from `address`, or refuse it when the address holds its
    /// share. `parent` closes every connection at shutdown.
    pub(super) fn register(
        self: &Arc<Self>,
        address: IpAddr,
        parent: &CancellationToken,
    ) -> Result<Registered, AddressFull> {
        // An IPv4 client on a dual-stack socket is the same client as over IPv4.
        let address = address.to_canonical();
        let Ok(mut inner) = self.inner.lock() else {
            return Err(AddressFull(self.limits.per_ip));
        };
        let held = inner.by_address.get(&address).copied().unwrap_or(0);
        if held >= self.limits.per_ip {
            self.metrics.connections_refused_per_address.inc();
            return Err(AddressFull(self.limits.per_ip));
        }
        inner.by_address.insert(address, held + 1);
        inner.next_id += 1;
        let id = inner.next_id;
        let conn = Arc::new(Conn {
            active: AtomicUsize::new(0),
            idle_since: AtomicU64::new(self.now_ms()),
            admitted: AtomicBool::new(false),
            close: parent.child_token(),
            epoch: self.epoch,
        });
        inner.open.insert(id, conn.clone());
        Ok(Registered {
            conns: self.clone(),
            id,
            address,
            conn,
        })
    }

    /// Close the admitted connection that has been idle longest, if one has been idle for
    /// at least the eviction bound; whether one was found.
    pub(super) fn evict_idlest(&self) -> bool {
        let bound = u64::try_from(self.limits.evict_idle_after.as_millis()).unwrap_or(u64::MAX);
        let now = self.now_ms();
        let Ok(inner) = self.inner.lock() else {
            return false;
        };
        let victim = inner
            .open
            .values()
            .filter(|c| {
                c.admitted.load(Ordering::Acquire)
                    && c.active.load(Ordering::Acquire) == 0
                    && !c.close.is_cancelled()
            })
            .map(|c| (c.idle_since.load(Ordering::Acquire), c))
            .filter(|(since, _)| now.saturating_sub(*since) >= bound)
            .min_by_key(|(since, _)| *since);
        match victim {
            Some((_, conn)) => {
                conn.close.cancel();
                self.metrics.connections_closed_idle[1].inc();
                true
            }
            None => false,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

impl Conn {
    /// The connection now holds a permit of the global limit.
    pub(super) fn admitted(&self) {
        self.admitted.store(true, Ordering::Release);
    }

    /// A request starts; it ends when the returned guard is dropped.
    pub(super) fn begin(self: &Arc<Self>) -> Active {
        self.active.fetch_add(1, Ordering::AcqRel);
        Active(self.clone())
    }

    /// When the connection will have been idle for `timeout`, if nothing starts before:
    /// `None` while a request is in flight.
    pub(super) fn idle_deadline(&self, timeout: Duration) -> Option<Instant> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since.load(Ordering::Acquire));
        Some(self.epoch + since + timeout)
    }
}

/// A request in flight on a connection.
pub(super) struct Active(Arc<Conn>);

impl Drop for Active {
    fn drop(&mut self) {
        let conn = &self.0;
        // The time is stored before the count falls, so whoever sees 0 sees a fresh time.
        let now = u64::try_from(conn.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        conn.idle_since.store(now, Ordering::Release);
        conn.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in flight until it is sent or dropped.
pub(super) struct Tracked<B> {
    inner: B,
    _active: Active,
}

impl<B> Tracked<B> {
    pub(super) fn new(inner: B, active: Active) -> Self {
        Self {
            inner,
            _active: active,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conns(per_ip: usize, evict_ms: u64) -> Arc<Conns> {
        Arc::new(Conns::new(
            ConnectionLimits {
                per_ip,
                idle_timeout: Duration::from_secs(10),
                evict_idle_after: Duration::from_millis(evict_ms),
            },
            Arc::new(Metrics::new()),
        ))
    }

    #[test]
    fn an_address_holds_at_most_its_share_and_gets_it_back_when_one_closes() {
        let c = conns(2, 0);
        let stop = CancellationToken::new();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let first = c.register(a, &stop).unwrap();
        let _second = c.register(a, &stop).unwrap();
        assert!(c.register(a, &stop).is_err());
        // The IPv4-mapped form is the same client.
        assert!(c
            .register("::ffff:127.0.0.1".parse().unwrap(), &stop)
            .is_err());
        assert!(c.register(b, &stop).is_ok());
        drop(first);
        assert!(c.register(a, &stop).is_ok());
        assert_eq!(c.metrics.connections_refused_per_address.get(), 2);
    }

    #[test]
    fn the_idlest_admitted_connection_without_requests_is_evicted() {
        let c = conns(10, 0);
        let stop = CancellationToken::new();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let waiting = c.register(ip, &stop).unwrap();
        assert!(
            !c.evict_idlest(),
            "one without a permit holds nothing to give"
        );
        let busy = c.register(ip, &stop).unwrap();
        busy.conn.admitted();
        let request = busy.conn.begin();
        assert!(
            !c.evict_idlest(),
            "one with a request in flight is not idle"
        );
        drop(request);
        assert!(c.evict_idlest());
        assert!(busy.conn.close.is_cancelled());
        assert!(!waiting.conn.close.is_cancelled());
        assert!(!c.evict_idlest(), "one already closing is not chosen twice");
    }
}
