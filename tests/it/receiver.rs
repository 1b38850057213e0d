//! The one real HTTP server standing in for a webhook subscriber in the tests: it records
//! every request as it arrives (and whether it has been answered), answers with scripted
//! statuses, and, when made [`Receiver::slow`], takes its time to answer, so that a sender is
//! in the middle of a delivery much of the time.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rand::Rng;
use tokio::sync::watch;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub arrived: Instant,
    /// Set once the answer is ready; a request whose sender gave up may never get one.
    pub answered: bool,
}

impl Delivery {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }
}

/// The subscriber.
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    /// `http://{addr}/hook`.
    pub url: String,
    deliveries: Arc<Mutex<Vec<Delivery>>>,
    /// Statuses to answer with, in order; 200 once they run out.
    statuses: Arc<Mutex<VecDeque<u16>>>,
    /// The number of requests that arrived; changes with each.
    arrived: Arc<watch::Sender<usize>>,
}

impl Receiver {
    /// A receiver that answers at once.
    pub async fn start() -> Self {
        Self::slow(0..=0).await
    }

    /// A receiver that answers each request after a random number of milliseconds in
    /// `answer_after_ms`: the slow answer is the behaviour a test needs, not a wait.
    pub async fn slow(answer_after_ms: RangeInclusive<u64>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let addr = listener.local_addr().expect("addr");
        let this = Self {
            addr,
            url: format!("http://{addr}/hook"),
            deliveries: Arc::default(),
            statuses: Arc::default(),
            arrived: Arc::new(watch::channel(0).0),
        };
        let server = this.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (server, delays) = (server.clone(), answer_after_ms.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let (server, delays) = (server.clone(), delays.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(server.receive(req, delays).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        this
    }

    async fn receive(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
        answer_after_ms: RangeInclusive<u64>,
    ) -> hyper::Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let headers = req
            .headers()
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes().to_vec())
            .unwrap_or_default();
        let index = {
            let mut deliveries = self.deliveries.lock().expect("lock");
            deliveries.push(Delivery {
                path,
                headers,
                body,
                arrived: Instant::now(),
                answered: false,
            });
            deliveries.len() - 1
        };
        self.arrived.send_modify(|n| *n += 1);
        let status = self
            .statuses
            .lock()
            .expect("lock")
            .pop_front()
            .unwrap_or(200);
        let delay = rand::thread_rng().gen_range(answer_after_ms);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        self.deliveries.lock().expect("lock")[index].answered = true;
        let mut resp = hyper::Response::new(Full::new(Bytes::from_static(b"ok")));
        *resp.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
        resp
    }

    /// `http://{addr}{path}`.
    pub fn url_of(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Answer the next requests with these statuses.
    pub fn answer(&self, statuses: &[u16]) {
        self.statuses.lock().expect("lock").extend(statuses);
    }

    pub fn all(&self) -> Vec<Delivery> {
        self.deliveries.lock().expect("lock").clone()
    }

    /// Wait until `n` requests arrived, woken by each arrival; at most 30 s.
    pub async fn until(&self, n: usize) -> Vec<Delivery> {
        let mut arrived = self.arrived.subscribe();
        let waited =
            tokio::time::timeout(Duration::from_secs(30), arrived.wait_for(|&got| got >= n)).await;
        assert!(
            waited.is_ok(),
            "only {} of {n} deliveries arrived",
            self.all().len()
        );
        self.all()
    }
}
