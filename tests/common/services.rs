//! A private set of services (PostgreSQL and the MongoDB-wire server) for tests
//! that restart, crash or freeze a server: they must not disturb the shared
//! ones other tests use. Started and stopped with the project's own script.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

pub struct OwnServices {
    dir: PathBuf,
    pub env: BTreeMap<String, String>,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/services.sh")
}

impl OwnServices {
    /// Starts `services` (e.g. `["pg", "mongo"]`) in a fresh state folder.
    pub fn up(services: &[&str]) -> OwnServices {
        Self::up_with(services, &[])
    }

    /// [`OwnServices::up`] with variables for the script (e.g.
    /// `KAFKA_ADVERTISED_PORT`).
    pub fn up_with(services: &[&str], env: &[(&str, String)]) -> OwnServices {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(".services")
            .join(format!(
                "own-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..10]
            ));
        let output = Command::new("bash")
            .arg(script())
            .arg("up")
            .args(services)
            .env("SERVICES_DIR", &dir)
            // `services.sh down` without SERVICES_DIR leaves them to this process.
            .env("SERVICES_OWNER_PID", std::process::id().to_string())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run scripts/services.sh");
        assert!(
            output.status.success(),
            "scripts/services.sh up {services:?} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut env = BTreeMap::new();
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let Some(assignment) = line.strip_prefix("export ") else {
                continue;
            };
            if let Some((key, value)) = assignment.split_once('=') {
                let value = value.trim_matches(|c| c == '\'' || c == '"');
                env.insert(key.to_string(), value.to_string());
            }
        }
        OwnServices { dir, env }
    }

    pub fn get(&self, key: &str) -> String {
        self.env
            .get(key)
            .cloned()
            .unwrap_or_else(|| panic!("services.sh did not export {key}: {:?}", self.env))
    }

    /// Runs `scripts/services.sh <args>` on this state folder.
    pub fn control(&self, args: &[&str]) {
        let output = Command::new("bash")
            .arg(script())
            .args(args)
            .env("SERVICES_DIR", &self.dir)
            .output()
            .expect("run scripts/services.sh");
        assert!(
            output.status.success(),
            "scripts/services.sh {args:?} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for OwnServices {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("down")
            .env("SERVICES_DIR", &self.dir)
            .output();
    }
}
