//! A PostgreSQL server that only refuses logins: it asks for the password in
//! clear text (so the client really sends it), records it, and answers
//! `28P01 password authentication failed` with the password repeated in the
//! error's DETAIL. No real server repeats it; this one does, so that a test
//! sees whether the processor passes on whatever a server or library says.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const PROTOCOL_3: u32 = 196_608;

pub struct FakePg {
    pub port: u16,
    received: Arc<Mutex<Vec<String>>>,
}

impl FakePg {
    pub fn start() -> FakePg {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake PostgreSQL server");
        let port = listener.local_addr().expect("local address").port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let passwords = received.clone();
        // Lives as long as the test process; each login is served on its own thread.
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let passwords = passwords.clone();
                std::thread::spawn(move || {
                    if let Some(password) = refuse(stream) {
                        passwords
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(password);
                    }
                });
            }
        });
        FakePg { port, received }
    }

    /// The passwords clients sent.
    pub fn received(&self) -> Vec<String> {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn read_u32(stream: &mut TcpStream) -> Option<u32> {
    let mut bytes = [0u8; 4];
    stream.read_exact(&mut bytes).ok()?;
    Some(u32::from_be_bytes(bytes))
}

fn read_body(stream: &mut TcpStream, length: u32) -> Option<Vec<u8>> {
    let mut body = vec![0u8; length.checked_sub(4)? as usize];
    stream.read_exact(&mut body).ok()?;
    Some(body)
}

fn cstrings(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// Serves one login: returns the password the client sent.
fn refuse(mut stream: TcpStream) -> Option<String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    // SSL and GSS encryption requests first (libpq), then the startup message.
    let user = loop {
        let length = read_u32(&mut stream)?;
        let body = read_body(&mut stream, length)?;
        let code = u32::from_be_bytes(body.get(..4)?.try_into().ok()?);
        match code {
            SSL_REQUEST | GSSENC_REQUEST => stream.write_all(b"N").ok()?,
            PROTOCOL_3 => {
                let params = cstrings(&body[4..]);
                let user = params
                    .chunks(2)
                    .find(|pair| pair.first().map(String::as_str) == Some("user"))
                    .and_then(|pair| pair.get(1).cloned())
                    .unwrap_or_default();
                break user;
            }
            _ => return None,
        }
    };
    // AuthenticationCleartextPassword.
    stream.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]).ok()?;
    let mut kind = [0u8; 1];
    stream.read_exact(&mut kind).ok()?;
    if kind[0] != b'p' {
        return None;
    }
    let length = read_u32(&mut stream)?;
    let body = read_body(&mut stream, length)?;
    let password = cstrings(&body).into_iter().next().unwrap_or_default();
    let mut fields = Vec::new();
    for (tag, value) in [
        (b'S', "FATAL".to_string()),
        (b'V', "FATAL".to_string()),
        (b'C', "28P01".to_string()),
        (
            b'M',
            format!("password authentication failed for user \"{user}\""),
        ),
        (b'D', format!("the password given was \"{password}\"")),
    ] {
        fields.push(tag);
        fields.extend_from_slice(value.as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut message = vec![b'E'];
    message.extend_from_slice(&(fields.len() as u32 + 4).to_be_bytes());
    message.extend_from_slice(&fields);
    let _ = stream.write_all(&message);
    Some(password)
}
