//! The console over HTTP: requests with any method and headers, and the
//! shape of a JSON value (its keys and the types of its values), to pin
//! `GET /api/console`.

use serde_json::{Map, Value};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `method path` with `headers` (and `body`, sent as given) to `addr`: the
/// status, the head and the body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the console");
    let mut request = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("Host: {addr}\r\n"));
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send the request");
    let read = async {
        // Read the head, then as much body as it announces (a server may
        // keep the connection open after it, as chromedriver does).
        let mut response = Vec::new();
        let mut buffer = [0u8; 8192];
        loop {
            let n = stream.read(&mut buffer).await.expect("read the response");
            response.extend_from_slice(&buffer[..n]);
            let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
                assert!(n > 0, "the connection closed before the head ended");
                continue;
            };
            let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
            let length = head.lines().find_map(|line| {
                line.strip_prefix("content-length:")
                    .and_then(|v| v.trim().parse::<usize>().ok())
            });
            match length {
                Some(length) if response.len() >= end + 4 + length => return response,
                _ if n == 0 => return response,
                _ => {}
            }
        }
    };
    let response = tokio::time::timeout(std::time::Duration::from_secs(60), read)
        .await
        .expect("the server answers in time");
    let response = String::from_utf8(response).expect("an UTF-8 response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a response has a head and a body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    (status, head.to_string(), body.to_string())
}

/// `GET /api/console` as JSON.
pub async fn snapshot(addr: SocketAddr) -> Value {
    let (status, _, body) = http(addr, "GET", "/api/console", &[], "").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("the console's JSON")
}

/// Each value replaced by its type (`string`, `number`, `bool`, `null`),
/// arrays by the shape of their first element.
pub fn shape(value: &Value) -> Value {
    match value {
        Value::Null => Value::from("null"),
        Value::Bool(_) => Value::from("bool"),
        Value::Number(_) => Value::from("number"),
        Value::String(_) => Value::from("string"),
        Value::Array(items) => Value::Array(items.iter().take(1).map(shape).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), shape(v)))
                .collect::<Map<_, _>>(),
        ),
    }
}
