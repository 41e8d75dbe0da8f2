//! Client builders: the drivers' configuration made from ours.

use super::PostgresConfig;

impl PostgresConfig {
    /// `host:port/database`, safe to print.
    pub fn display_target(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.database)
    }

    pub fn to_client_config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.host)
            .port(self.port)
            .dbname(&self.database)
            .user(&self.user)
            .application_name("activity-event-processor")
            .connect_timeout(self.connect_timeout);
        if !self.password.expose().is_empty() {
            config.password(self.password.expose());
        }
        config
    }
}
