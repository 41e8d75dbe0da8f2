//! A TCP fault proxy for tests: listens on a port of its own on 127.0.0.1,
//! forwards every connection to one upstream address, and can be switched at
//! run time between faults that apply to the connections already open as
//! well as to new ones:
//!
//! - [`Mode::Pass`]: bytes go through as they come;
//! - [`Mode::Latency`]: every chunk is delivered that much later (a delay
//!   line: the throughput stays, each byte arrives late);
//! - [`Mode::Reset`]: every open connection is closed abruptly on both sides
//!   (RST, through a zero linger), and new ones are reset as they arrive;
//! - [`Mode::Blackhole`]: connections are accepted and held, and nothing is
//!   forwarded either way, as in a network partition. What was sent meanwhile
//!   is delivered once the mode changes back (as TCP retransmits after a
//!   partition heals). Unlike a real partition, both peers' kernels still
//!   answer TCP keepalive probes: only the applications' own timeouts notice.
//!
//! The proxy runs on a thread and runtime of its own, so a test that blocks
//! its own threads never stalls it. Dropping it closes everything.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Latency(Duration),
    Reset,
    Blackhole,
}

/// How long the proxy waits for the upstream to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes read at most per chunk.
const CHUNK: usize = 16 * 1024;
/// Chunks in flight per direction (with latency): backpressure past this.
const IN_FLIGHT: usize = 64;

pub struct Proxy {
    port: u16,
    mode: watch::Sender<Mode>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    upstream: Mutex<Option<SocketAddr>>,
    /// Connections open now.
    open: AtomicUsize,
    /// Connections accepted since the start.
    accepted: AtomicUsize,
    /// Connections the proxy reset (open ones and refused ones).
    resets: AtomicUsize,
    /// Local ports of the open upstream connections (what the server sees
    /// as the client's port).
    upstream_ports: Mutex<BTreeSet<u16>>,
}

impl Proxy {
    /// A proxy to `upstream`, in [`Mode::Pass`].
    pub fn start(upstream: SocketAddr) -> Proxy {
        let proxy = Proxy::unrouted();
        proxy.set_upstream(upstream);
        proxy
    }

    /// A proxy whose upstream is set later ([`Proxy::set_upstream`]; until
    /// then connections are reset): for a server that must know the proxy's
    /// port before it starts.
    pub fn unrouted() -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let port = listener.local_addr().expect("proxy address").port();
        let (mode, receiver) = watch::channel(Mode::Pass);
        let shared = Arc::new(Shared::default());
        let stop = CancellationToken::new();
        let thread = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("fault-proxy-{port}"))
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("the proxy's runtime");
                    runtime.block_on(async move {
                        let listener =
                            TcpListener::from_std(listener).expect("the proxy's listener");
                        accept(listener, receiver, shared, stop).await;
                    });
                })
                .expect("start the proxy thread")
        };
        Proxy {
            port,
            mode,
            shared,
            stop,
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.shared.upstream.lock().expect("upstream") = Some(upstream);
    }

    /// Switches every connection, open and new, to `mode`.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Connections accepted since the start.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections reset by the proxy since the start.
    pub fn resets(&self) -> usize {
        self.shared.resets.load(Ordering::SeqCst)
    }

    /// The local ports of the open upstream connections: the client ports
    /// the server sees for the connections that go through this proxy.
    pub fn upstream_ports(&self) -> BTreeSet<u16> {
        self.shared
            .upstream_ports
            .lock()
            .expect("upstream ports")
            .clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The socket's address as `host:port` text resolved to one address.
pub fn socket_addr(host: &str, port: &str) -> SocketAddr {
    format!("{host}:{port}")
        .parse()
        .unwrap_or_else(|err| panic!("`{host}:{port}` is not an IP address and port: {err}"))
}

/// `mongodb://host:port/?query` with the proxy's address instead, and
/// `directConnection=true`: the server names itself in its replica-set
/// answer, and a driver that discovers the set goes to that address,
/// around the proxy.
pub fn mongodb_uri_through(uri: &str, proxy: &Proxy) -> String {
    let rest = uri.strip_prefix("mongodb://").expect("a mongodb:// URI");
    let query = rest.split_once('?').map(|(_, q)| q).unwrap_or("");
    let mut uri = format!("mongodb://{}/?directConnection=true", proxy.address());
    if !query.is_empty() {
        uri.push('&');
        uri.push_str(query);
    }
    uri
}

/// The MongoDB server's address in a `mongodb://host:port/...` URI.
pub fn mongodb_address(uri: &str) -> SocketAddr {
    let rest = uri.strip_prefix("mongodb://").expect("a mongodb:// URI");
    let host_port = rest.split(['/', '?']).next().expect("host:port");
    let (host, port) = host_port.rsplit_once(':').expect("host:port");
    socket_addr(host, port)
}

async fn accept(
    listener: TcpListener,
    mode: watch::Receiver<Mode>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, _)) = accepted else {
            // Out of descriptors or an aborted handshake: try again shortly.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if *mode.borrow() == Mode::Reset {
            shared.resets.fetch_add(1, Ordering::SeqCst);
            abort(client);
            continue;
        }
        let (mode, shared) = (mode.clone(), shared.clone());
        tokio::spawn(serve(client, mode, shared));
    }
}

/// Closes `stream` with a RST instead of a FIN.
fn abort(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Counts a connection as open for as long as it lives.
struct Open(Arc<Shared>);

impl Open {
    fn new(shared: &Arc<Shared>) -> Open {
        shared.open.fetch_add(1, Ordering::SeqCst);
        Open(shared.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How a connection (or one direction of it) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// End of stream, passed on as such.
    Closed,
    /// A peer failed (reset, error): the other side is reset too.
    Broken,
    /// The proxy was switched to [`Mode::Reset`] (or is stopping).
    Reset,
}

async fn serve(client: TcpStream, mut mode: watch::Receiver<Mode>, shared: Arc<Shared>) {
    let _open = Open::new(&shared);
    // A partition: the connection is held, and the upstream never hears of it
    // until the mode changes.
    if !forwarding(&mut mode).await {
        shared.resets.fetch_add(1, Ordering::SeqCst);
        abort(client);
        return;
    }
    let target = *shared.upstream.lock().expect("upstream");
    let connected = match target {
        Some(target) => tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
            .await
            .ok()
            .and_then(Result::ok),
        None => None,
    };
    let Some(mut upstream) = connected else {
        abort(client);
        return;
    };
    let mut client = client;
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let port = upstream.local_addr().map(|a| a.port()).ok();
    if let Some(port) = port {
        shared.upstream_ports.lock().expect("ports").insert(port);
    }
    let ended = relay(&mut client, &mut upstream, mode).await;
    if let Some(port) = port {
        shared.upstream_ports.lock().expect("ports").remove(&port);
    }
    if ended != Ended::Closed {
        if ended == Ended::Reset {
            shared.resets.fetch_add(1, Ordering::SeqCst);
        }
        abort(client);
        abort(upstream);
    }
}

/// Waits while the mode is [`Mode::Blackhole`]; false once it is
/// [`Mode::Reset`] (or the proxy stops).
async fn forwarding(mode: &mut watch::Receiver<Mode>) -> bool {
    loop {
        match *mode.borrow_and_update() {
            Mode::Pass | Mode::Latency(_) => return true,
            Mode::Reset => return false,
            Mode::Blackhole => {}
        }
        if mode.changed().await.is_err() {
            return false;
        }
    }
}

/// Returns once the mode is [`Mode::Reset`] (or the proxy stops).
async fn until_reset(mut mode: watch::Receiver<Mode>) {
    loop {
        if *mode.borrow_and_update() == Mode::Reset || mode.changed().await.is_err() {
            return;
        }
    }
}

/// Both directions until both end, one breaks, or the mode is Reset.
async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    mode: watch::Receiver<Mode>,
) -> Ended {
    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = upstream.split();
    let up = pipe(client_read, upstream_write, mode.clone());
    let down = pipe(upstream_read, client_write, mode.clone());
    let reset = until_reset(mode);
    tokio::pin!(up, down, reset);
    let (mut up_done, mut down_done) = (false, false);
    loop {
        tokio::select! {
            ended = &mut up, if !up_done => {
                if ended != Ended::Closed {
                    return ended;
                }
                up_done = true;
            }
            ended = &mut down, if !down_done => {
                if ended != Ended::Closed {
                    return ended;
                }
                down_done = true;
            }
            () = &mut reset => return Ended::Reset,
        }
        if up_done && down_done {
            return Ended::Closed;
        }
    }
}

/// One direction: a reader that stamps each chunk with when it is due, and
/// a writer that delivers it then.
async fn pipe(mut from: ReadHalf<'_>, mut to: WriteHalf<'_>, mode: watch::Receiver<Mode>) -> Ended {
    let (chunks, mut due) = mpsc::channel::<(Instant, Option<Vec<u8>>)>(IN_FLIGHT);
    let mut read_mode = mode.clone();
    let reading = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            if !forwarding(&mut read_mode).await {
                return Ended::Reset;
            }
            let read = tokio::select! {
                read = from.read(&mut buf) => read,
                // Blackhole or Reset stop the reading at once.
                changed = read_mode.changed() => {
                    if changed.is_err() {
                        return Ended::Reset;
                    }
                    continue;
                }
            };
            let chunk = match read {
                Ok(0) => None,
                Ok(n) => Some(buf[..n].to_vec()),
                Err(_) => return Ended::Broken,
            };
            let delay = match *read_mode.borrow() {
                Mode::Latency(delay) => delay,
                _ => Duration::ZERO,
            };
            let end = chunk.is_none();
            if chunks.send((Instant::now() + delay, chunk)).await.is_err() {
                return Ended::Broken;
            }
            if end {
                return Ended::Closed;
            }
        }
    };
    let mut write_mode = mode;
    let writing = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if !forwarding(&mut write_mode).await {
                return Ended::Reset;
            }
            match chunk {
                Some(bytes) => {
                    if to.write_all(&bytes).await.is_err() {
                        return Ended::Broken;
                    }
                }
                None => {
                    let _ = to.shutdown().await;
                    return Ended::Closed;
                }
            }
        }
        Ended::Broken
    };
    tokio::pin!(reading, writing);
    let mut read_done = false;
    loop {
        tokio::select! {
            ended = &mut reading, if !read_done => {
                if ended != Ended::Closed {
                    return ended;
                }
                read_done = true;
            }
            ended = &mut writing => return ended,
        }
    }
}
