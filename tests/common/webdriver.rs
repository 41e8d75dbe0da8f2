//! A small WebDriver client (the W3C protocol, JSON over HTTP/1.1) driving
//! headless Chromium through `chromedriver`, both from Debian's `chromium`
//! and `chromium-driver` packages (scripts/setup.sh installs them). Just
//! what the console's browser test needs: open a page, run a script, click,
//! take a screenshot.

use super::console::http;
use super::kafka::Proc;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The key of an element reference in the protocol.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A browser session; the browser and its driver are killed when dropped.
pub struct Browser {
    addr: SocketAddr,
    session: String,
    _driver: Proc,
    /// The driver's and the browser's `TMPDIR` (their profile and socket
    /// folders), removed after the driver is killed.
    _tmp: tempfile::TempDir,
}

impl Browser {
    /// Starts `chromedriver` and a headless Chromium session. Panics, with
    /// the command that installs them, when either is missing.
    pub async fn start(log: &Path) -> Browser {
        for binary in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(binary).exists(),
                "{binary} is missing: this test drives headless Chromium. Install it with\n    \
                 sudo apt-get install chromium chromium-driver\n(or run scripts/setup.sh --tests)"
            );
        }
        let port = free_port();
        let log_file = std::fs::File::create(log).expect("the driver's log");
        let tmp = tempfile::tempdir().expect("a TMPDIR for the browser");
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .env("TMPDIR", tmp.path())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("start chromedriver");
        let driver = Proc(driver);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("an address");
        let start = Instant::now();
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "chromedriver does not listen on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1100"],
            },
        }}});
        let created = call(addr, "POST", "/session", Some(capabilities)).await;
        let session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_string();
        Browser {
            addr,
            session,
            _driver: driver,
            _tmp: tmp,
        }
    }

    async fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        call(self.addr, method, &path, body).await
    }

    pub async fn open(&self, url: &str) {
        self.command("POST", "/url", Some(json!({ "url": url })))
            .await;
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub async fn script(&self, script: &str) -> Value {
        self.command(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
        .await
    }

    /// The text of the element `selector` picks (empty if none).
    pub async fn text(&self, selector: &str) -> String {
        let script = format!(
            "var e = document.querySelector({}); return e ? e.textContent : '';",
            json!(selector)
        );
        self.script(&script)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Clicks the element `selector` picks, as a user would.
    pub async fn click(&self, selector: &str) {
        let found = self
            .command(
                "POST",
                "/element",
                Some(json!({ "using": "css selector", "value": selector })),
            )
            .await;
        let id = found[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {selector}: {found}"))
            .to_string();
        self.command("POST", &format!("/element/{id}/click"), Some(json!({})))
            .await;
    }

    /// What the page's first script collected: errors, rejections and
    /// `console.error` calls.
    pub async fn errors(&self) -> Vec<String> {
        let errors = self
            .script("return window.__consoleErrors || ['no error collector'];")
            .await;
        errors
            .as_array()
            .map(|a| a.iter().map(|e| e.to_string()).collect())
            .unwrap_or_else(|| vec![format!("unexpected: {errors}")])
    }

    /// Waits until `selector`'s text satisfies `ok`; its last text.
    pub async fn wait_text(
        &self,
        selector: &str,
        limit: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> String {
        let start = Instant::now();
        loop {
            let text = self.text(selector).await;
            if ok(&text) {
                return text;
            }
            assert!(
                start.elapsed() < limit,
                "{selector} still shows {text:?} after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A PNG of the window, written to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let shot = self.command("GET", "/screenshot", None).await;
        let png = decode_base64(shot.as_str().expect("a screenshot"));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("the screenshots' folder");
        }
        std::fs::write(path, png).expect("write the screenshot");
    }

    pub async fn close(self) {
        let _ = self.command("DELETE", "", None).await;
    }
}

/// One WebDriver command: its `value`, or a panic with the driver's error.
async fn call(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Value {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let json = ("Content-Type", "application/json; charset=utf-8");
    let (status, _, text) = http(addr, method, path, &[json], &body).await;
    let answer: Value = serde_json::from_str(&text)
        .unwrap_or_else(|err| panic!("chromedriver: {method} {path}: {status} {err}: {text}"));
    assert_eq!(status, 200, "chromedriver: {method} {path}: {answer}");
    answer["value"].clone()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let digits: Vec<u8> = text.bytes().filter_map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, d)| n | (u32::from(*d) << (18 - 6 * i)));
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len().saturating_sub(1)]);
    }
    out
}
