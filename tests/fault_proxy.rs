//! The TCP fault proxy of the network-fault tests (`tests/common/proxy.rs`),
//! checked against a tiny echo server: what each mode does to open and new
//! connections, in both directions.

#[path = "common/proxy.rs"]
mod proxy;

use proxy::{Mode, Proxy};
use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

/// What the echo server saw.
#[derive(Default)]
struct Seen {
    accepted: AtomicUsize,
    bytes: AtomicUsize,
    /// Connections that ended in an error (a reset) rather than an EOF.
    broken: AtomicUsize,
    peers: Mutex<BTreeSet<u16>>,
}

/// An echo server on 127.0.0.1: every byte comes back.
async fn echo_server() -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let address = listener.local_addr().expect("echo address");
    let seen = Arc::new(Seen::default());
    let shared = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, peer)) = listener.accept().await {
            shared.accepted.fetch_add(1, Ordering::SeqCst);
            shared.peers.lock().expect("peers").insert(peer.port());
            let seen = shared.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) => return,
                        Ok(n) => {
                            seen.bytes.fetch_add(n, Ordering::SeqCst);
                            if stream.write_all(&buf[..n]).await.is_err() {
                                seen.broken.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                        }
                        Err(_) => {
                            seen.broken.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                }
            });
        }
    });
    (address, seen)
}

async fn connect(proxy: &Proxy) -> TcpStream {
    TcpStream::connect(proxy.address())
        .await
        .expect("connect to the proxy")
}

/// Sends `message` and reads as many bytes back, within `limit`.
async fn round_trip(stream: &mut TcpStream, message: &[u8], limit: Duration) -> Vec<u8> {
    stream.write_all(message).await.expect("write");
    let mut back = vec![0u8; message.len()];
    timeout(limit, stream.read_exact(&mut back))
        .await
        .expect("the echo came back in time")
        .expect("read the echo");
    back
}

/// Waits until `probe` holds (at most five seconds).
async fn eventually(what: &str, probe: impl Fn() -> bool) {
    let start = Instant::now();
    while !probe() {
        assert!(start.elapsed() < Duration::from_secs(5), "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn pass_forwards_both_ways_intact_and_names_its_upstream_ports() {
    let (echo, seen) = echo_server().await;
    let proxy = Proxy::start(echo);
    let mut stream = connect(&proxy).await;
    let message: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let (mut read, mut write) = stream.split();
    let sending = async {
        write.write_all(&message).await.expect("write");
    };
    let mut back = vec![0u8; message.len()];
    let receiving = async {
        timeout(Duration::from_secs(10), read.read_exact(&mut back))
            .await
            .expect("the echo came back in time")
            .expect("read");
    };
    tokio::join!(sending, receiving);
    assert!(back == message, "the bytes came back changed");
    assert_eq!(proxy.open(), 1);
    let ports = proxy.upstream_ports();
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert_eq!(*seen.peers.lock().expect("peers"), ports);
    // A clean close passes through as a clean close.
    drop(stream);
    eventually("the connection is closed", || proxy.open() == 0).await;
    assert!(proxy.upstream_ports().is_empty());
    assert_eq!(seen.broken.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn latency_delays_each_direction_of_open_connections() {
    let (echo, _) = echo_server().await;
    let proxy = Proxy::start(echo);
    let mut stream = connect(&proxy).await;
    let start = Instant::now();
    round_trip(&mut stream, b"ping", Duration::from_secs(5)).await;
    let fast = start.elapsed();
    proxy.set(Mode::Latency(Duration::from_millis(150)));
    let start = Instant::now();
    round_trip(&mut stream, b"ping", Duration::from_secs(5)).await;
    let slow = start.elapsed();
    assert!(
        slow >= Duration::from_millis(300),
        "a round trip took {slow:?}"
    );
    // A delay line, not a queue: chunks sent together arrive together.
    let start = Instant::now();
    for _ in 0..10 {
        stream.write_all(b"x").await.expect("write");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut back = [0u8; 10];
    timeout(Duration::from_secs(5), stream.read_exact(&mut back))
        .await
        .expect("in time")
        .expect("read");
    let burst = start.elapsed();
    assert!(
        burst < Duration::from_millis(1_000),
        "ten chunks took {burst:?}"
    );
    proxy.set(Mode::Pass);
    let start = Instant::now();
    round_trip(&mut stream, b"ping", Duration::from_secs(5)).await;
    let again = start.elapsed();
    assert!(
        again < Duration::from_millis(150),
        "{again:?} after latency ended (before it: {fast:?})"
    );
}

#[tokio::test]
async fn reset_aborts_open_connections_on_both_sides_and_refuses_new_ones() {
    let (echo, seen) = echo_server().await;
    let proxy = Proxy::start(echo);
    let mut stream = connect(&proxy).await;
    round_trip(&mut stream, b"hello", Duration::from_secs(5)).await;
    proxy.set(Mode::Reset);
    let mut buf = [0u8; 8];
    let read = timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("the reset arrives in time");
    assert_eq!(
        read.map_err(|e| e.kind()).err(),
        Some(ErrorKind::ConnectionReset),
        "the open connection was not reset"
    );
    eventually("the upstream side is reset too", || {
        seen.broken.load(Ordering::SeqCst) == 1
    })
    .await;
    // New connections are reset while the mode lasts.
    let accepted = seen.accepted.load(Ordering::SeqCst);
    // The proxy resets the connection as soon as it accepts it: the reset can
    // reach the client before its connect returns, or at its first read.
    match TcpStream::connect(proxy.address()).await {
        Ok(mut refused) => {
            let read = timeout(Duration::from_secs(5), refused.read(&mut buf))
                .await
                .expect("the refusal arrives in time");
            assert_eq!(
                read.map_err(|e| e.kind()).err(),
                Some(ErrorKind::ConnectionReset)
            );
        }
        Err(err) => assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}"),
    }
    assert_eq!(seen.accepted.load(Ordering::SeqCst), accepted);
    assert!(proxy.resets() >= 2, "{} resets", proxy.resets());
    proxy.set(Mode::Pass);
    let mut stream = connect(&proxy).await;
    assert_eq!(
        round_trip(&mut stream, b"again", Duration::from_secs(5)).await,
        b"again"
    );
}

#[tokio::test]
async fn blackhole_holds_everything_until_it_ends() {
    let (echo, seen) = echo_server().await;
    let proxy = Proxy::start(echo);
    let mut stream = connect(&proxy).await;
    round_trip(&mut stream, b"before", Duration::from_secs(5)).await;
    let bytes = seen.bytes.load(Ordering::SeqCst);
    proxy.set(Mode::Blackhole);
    // Sent into the partition: nothing arrives, nothing comes back, nothing fails.
    stream.write_all(b"during").await.expect("write");
    let mut back = [0u8; 6];
    let read = timeout(Duration::from_millis(700), stream.read_exact(&mut back)).await;
    assert!(read.is_err(), "an answer came through the blackhole");
    assert_eq!(seen.bytes.load(Ordering::SeqCst), bytes);
    // A new connection is accepted and held; the upstream never hears of it.
    let accepted = seen.accepted.load(Ordering::SeqCst);
    let mut held = connect(&proxy).await;
    held.write_all(b"held").await.expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(seen.accepted.load(Ordering::SeqCst), accepted);
    assert_eq!(proxy.open(), 2);
    // The partition heals: what was sent into it is delivered.
    proxy.set(Mode::Pass);
    timeout(Duration::from_secs(5), stream.read_exact(&mut back))
        .await
        .expect("the held bytes arrive after the blackhole")
        .expect("read");
    assert_eq!(&back, b"during");
    let mut four = [0u8; 4];
    timeout(Duration::from_secs(5), held.read_exact(&mut four))
        .await
        .expect("the held connection goes through after the blackhole")
        .expect("read");
    assert_eq!(&four, b"held");
    assert_eq!(seen.accepted.load(Ordering::SeqCst), accepted + 1);
}

#[tokio::test]
async fn an_unrouted_proxy_resets_until_it_has_an_upstream() {
    let (echo, _) = echo_server().await;
    let proxy = Proxy::unrouted();
    // The reset can reach the client before its connect has returned, so
    // a connect that fails with it counts as the same answer.
    match TcpStream::connect(proxy.address()).await {
        Ok(mut stream) => {
            let mut buf = [0u8; 4];
            let read = timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("in time");
            assert!(
                !matches!(read, Ok(n) if n > 0),
                "an unrouted proxy answered"
            );
        }
        Err(err) => assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}"),
    }
    proxy.set_upstream(echo);
    let mut stream = connect(&proxy).await;
    assert_eq!(
        round_trip(&mut stream, b"ok", Duration::from_secs(5)).await,
        b"ok"
    );
}
