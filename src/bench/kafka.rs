//! Stage 9: the Kafka path beside the broker's own limits.

use super::Bench;
use anyhow::Result;

pub async fn stage(_bench: &mut Bench) -> Result<()> {
    anyhow::bail!("the Kafka stage is not written yet")
}
