//! `scripts/services.sh status` and `down` without `SERVICES_DIR`: they find
//! every set of services the checkout started (under `.services/`, and those
//! started elsewhere) and act on each; a set whose owner still runs is left
//! running. Run on a copy of the scripts (a checkout of its own), so the sets
//! the other tests use are not touched; the services are real (the
//! MongoDB-wire server of the repository's venv).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};

/// A checkout with only the scripts, its service sets stopped when dropped.
struct Checkout {
    root: tempfile::TempDir,
    elsewhere: tempfile::TempDir,
    sets: Vec<PathBuf>,
}

impl Checkout {
    fn new() -> Checkout {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = tempfile::Builder::new()
            .prefix("services-checkout-")
            .tempdir()
            .unwrap_or_else(|err| panic!("cannot create a temp folder: {err}"));
        let scripts = root.path().join("scripts");
        std::fs::create_dir(&scripts).unwrap_or_else(|err| panic!("mkdir: {err}"));
        for name in ["services.sh", "lib.sh"] {
            std::fs::copy(repo.join("scripts").join(name), scripts.join(name))
                .unwrap_or_else(|err| panic!("cannot copy scripts/{name}: {err}"));
        }
        let elsewhere = tempfile::Builder::new()
            .prefix("services-elsewhere-")
            .tempdir()
            .unwrap_or_else(|err| panic!("cannot create a temp folder: {err}"));
        Checkout {
            root,
            elsewhere,
            sets: Vec::new(),
        }
    }

    /// `services.sh ARGS` with `SERVICES_DIR` set (`Some`) or unset (`None`).
    fn script(&self, dir: Option<&Path>, owner: Option<u32>, args: &[&str]) -> Output {
        let mut command = Command::new("bash");
        command
            .arg(self.root.path().join("scripts/services.sh"))
            .args(args)
            .env_remove("SERVICES_DIR")
            .env_remove("SERVICES_OWNER_PID")
            .env(
                "VENV_DIR",
                Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv"),
            );
        if let Some(dir) = dir {
            command.env("SERVICES_DIR", dir);
        }
        if let Some(pid) = owner {
            command.env("SERVICES_OWNER_PID", pid.to_string());
        }
        command
            .output()
            .unwrap_or_else(|err| panic!("cannot run services.sh: {err}"))
    }

    /// Starts the MongoDB-wire server in `dir`; returns its pid.
    fn up_mongo(&mut self, dir: PathBuf, owner: Option<u32>) -> u32 {
        self.sets.push(dir.clone());
        let output = self.script(Some(&dir), owner, &["up", "mongo"]);
        assert!(
            output.status.success(),
            "services.sh up mongo failed in {}:\n{}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let pid = std::fs::read_to_string(dir.join("mongo.pid"))
            .unwrap_or_else(|err| panic!("no mongo.pid in {}: {err}", dir.display()));
        pid.trim()
            .parse()
            .unwrap_or_else(|err| panic!("mongo.pid is not a pid ({err}): {pid:?}"))
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        for dir in &self.sets {
            let _ = self.script(Some(dir), None, &["down"]);
        }
    }
}

fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A process that stands for the owner of a set (test.sh, bench.sh, a test).
struct Owner(Child);

impl Drop for Owner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn status_and_down_without_services_dir_act_on_every_set_of_the_checkout() {
    let mut checkout = Checkout::new();

    // Nothing started yet: both say so.
    let status = checkout.script(None, None, &["status"]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    assert!(
        text(&status.stdout).starts_with("no services started from this checkout"),
        "{}",
        text(&status.stdout)
    );
    let down = checkout.script(None, None, &["down"]);
    assert!(down.status.success(), "{}", text(&down.stderr));
    assert!(
        text(&down.stderr).starts_with("nothing to stop: no services started from this checkout"),
        "{}",
        text(&down.stderr)
    );

    // Three sets: one under .services/, one elsewhere, one with a running owner.
    let sets = checkout.root.path().join(".services");
    let inside = sets.join("demo");
    let outside = checkout.elsewhere.path().join("mine");
    let owned = sets.join("test-owned");
    let mut owner = Owner(
        Command::new("sleep")
            .arg("300")
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start sleep: {err}")),
    );
    let inside_pid = checkout.up_mongo(inside.clone(), None);
    let outside_pid = checkout.up_mongo(outside.clone(), None);
    let owned_pid = checkout.up_mongo(owned.clone(), Some(owner.0.id()));

    let status = checkout.script(None, None, &["status"]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    let listing = text(&status.stdout);
    for (dir, pid) in [
        (&inside, inside_pid),
        (&outside, outside_pid),
        (&owned, owned_pid),
    ] {
        assert!(
            listing.contains(&format!("state dir: {}\n", dir.display())),
            "{listing}"
        );
        assert!(listing.contains(&format!("pid {pid} ")), "{listing}");
        assert!(
            listing.contains(&format!("stop:  SERVICES_DIR={} ", dir.display())),
            "{listing}"
        );
    }
    assert!(
        listing.contains(&format!("owner  pid {} (running)", owner.0.id())),
        "{listing}"
    );

    // down stops the two sets nobody owns and leaves the owned one running.
    let down = checkout.script(None, None, &["down"]);
    assert!(down.status.success(), "{}", text(&down.stderr));
    let said = text(&down.stderr);
    assert!(
        said.contains(&format!("stopped: {}\n", inside.display())),
        "{said}"
    );
    assert!(
        said.contains(&format!("stopped: {}\n", outside.display())),
        "{said}"
    );
    assert!(
        said.contains(&format!("left running: {} (in use by pid", owned.display())),
        "{said}"
    );
    assert!(said.ends_with("2 of 3 service sets stopped\n"), "{said}");
    assert!(!running(inside_pid), "the demo set's server still runs");
    assert!(
        !running(outside_pid),
        "the set elsewhere's server still runs"
    );
    assert!(running(owned_pid), "the owned set's server was stopped");
    assert!(!inside.exists() && !outside.exists());

    // Once its owner is gone, the last set is stopped too.
    let _ = owner.0.kill();
    let _ = owner.0.wait();
    let down = checkout.script(None, None, &["down"]);
    assert!(down.status.success(), "{}", text(&down.stderr));
    assert!(
        text(&down.stderr).contains(&format!("stopped: {}\n", owned.display())),
        "{}",
        text(&down.stderr)
    );
    assert!(!running(owned_pid), "the owned set's server still runs");
    let status = checkout.script(None, None, &["status"]);
    assert!(
        text(&status.stdout).starts_with("no services started from this checkout"),
        "{}",
        text(&status.stdout)
    );
}

#[test]
fn down_with_services_dir_stops_that_set_only() {
    let mut checkout = Checkout::new();
    let sets = checkout.root.path().join(".services");
    let first = sets.join("first");
    let second = sets.join("second");
    let first_pid = checkout.up_mongo(first.clone(), None);
    let second_pid = checkout.up_mongo(second.clone(), None);
    let down = checkout.script(Some(&first), None, &["down"]);
    assert!(down.status.success(), "{}", text(&down.stderr));
    assert!(!running(first_pid), "the named set's server still runs");
    assert!(running(second_pid), "the other set's server was stopped");
    assert!(!first.exists() && second.exists());
}
