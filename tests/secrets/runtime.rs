//! Run-time failures and successes against the test services (and a fake
//! PostgreSQL server that refuses logins), with secrets in every input.

use super::*;
use crate::fake_pg::FakePg;

/// The commands that connect to PostgreSQL, and how each ends when it
/// cannot: the short ones fail; `run --source replication` waits for an
/// unreachable server and gives up on a refused login; the relay waits for
/// both (until SIGTERM).
fn postgres_commands(says: &str, refused: bool) -> Vec<(Vec<&'static str>, End, String)> {
    let mut commands = Vec::new();
    for command in [
        &["migrate"][..],
        &["seed"],
        &["status"],
        &["run", "--source", "polling", "--until-caught-up"],
    ] {
        commands.push((command.to_vec(), End::Exit(1), says.to_string()));
    }
    let replication = ["run", "--source", "replication", "--until-caught-up"].to_vec();
    commands.push(if refused {
        (replication, End::Exit(1), says.to_string())
    } else {
        let retrying = "cannot take the slot ownership; retrying".to_string();
        (replication, End::RunsUntilStopped(RETRYING), retrying)
    });
    // The relay on its slot takes the slot's ownership first, which a refused
    // login stops as it stops `run`; the polling relay retries.
    let relay = ["relay", "--until-caught-up"].to_vec();
    commands.push(if refused {
        (relay, End::Exit(1), says.to_string())
    } else {
        (relay, End::RunsUntilStopped(RETRYING), says.to_string())
    });
    let polling_relay = ["relay", "--source", "polling", "--until-caught-up"].to_vec();
    commands.push((
        polling_relay,
        End::RunsUntilStopped(RETRYING),
        says.to_string(),
    ));
    commands
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_failures_never_show_the_password() {
    let db = TestDb::create().await;
    let mongo = TestMongo::create().await;
    let topic = common::kafka::fresh("aep-secrets-pg");
    common::kafka::create_topic(&topic, 1).await;
    let mut env = services_env(&db, &mongo.uri, &mongo.name, &fresh_slot());
    env.push(("KAFKA_TOPIC".into(), topic));

    // Nothing listens on port 1.
    let unreachable = "cannot connect to PostgreSQL at 127.0.0.1:1/";
    for (command, end, says) in postgres_commands(unreachable, false) {
        Case::new("postgres unreachable", &command)
            .env(&env)
            .env(&[("POSTGRES_HOST", "127.0.0.1"), ("POSTGRES_PORT", "1")])
            .ends(end)
            .says(&says)
            .check();
    }

    // A server that asks for the password and refuses it (repeating it).
    let fake = FakePg::start();
    let port = fake.port.to_string();
    let refused = "password authentication failed for user";
    for (index, (command, end, says)) in postgres_commands(refused, true).into_iter().enumerate() {
        let json = if index % 2 == 0 { "json" } else { "text" };
        Case::new("postgres refuses the password", &command)
            .env(&env)
            .dotenv(&format!("LOG_FORMAT={json}\n"))
            .env(&[
                ("POSTGRES_HOST", "127.0.0.1"),
                ("POSTGRES_PORT", port.as_str()),
            ])
            .env(&[("POSTGRES_USER", "app")])
            .ends(end)
            .says(&says)
            .check();
    }
    let received = fake.received();
    assert!(
        !received.is_empty() && received.iter().all(|p| p == PG_SECRET),
        "the fake server was sent the password each time: {received:?}"
    );

    // The test cluster trusts every login from 127.0.0.1: a role with a
    // password gets in with a wrong one too. Nothing of either is printed.
    let role = format!(
        "aep_secret_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let admin = common::connect(&common::postgres_config("postgres")).await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{PG_SECRET}-right';
             ALTER DATABASE {} OWNER TO {role};",
            db.config.database
        ))
        .await
        .expect("create a role with a password");
    for command in [
        &["migrate"][..],
        &["seed"],
        &["status"],
        &["run", "--source", "polling", "--until-caught-up"],
    ] {
        Case::new("a role with a password, a wrong one given", command)
            .env(&env)
            .env(&[("POSTGRES_USER", role.as_str())])
            .env(&[("POSTGRES_PASSWORD", format!("{PG_SECRET}-wrong"))])
            .ends(End::Exit(0))
            .check();
    }
    mongo.drop().await;
    drop(db);
    admin
        .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
        .await
        .expect("drop the role");
}

#[tokio::test(flavor = "multi_thread")]
async fn mongodb_failures_never_show_credentials() {
    let db = TestDb::migrated().await;
    let mongo = TestMongo::create().await;
    let slot = fresh_slot();
    let _slots = common::kafka::Slots(db.config.clone());
    let unreachable = format!(
        "mongodb://app:{MONGO_SECRET}@127.0.0.1:1/?serverSelectionTimeoutMS=300&connectTimeoutMS=300"
    );
    let env = services_env(&db, &unreachable, &mongo.name, &slot);
    Case::new("mongodb unreachable", &["show"])
        .env(&env)
        .ends(End::Exit(1))
        .says("cannot reach MongoDB at mongodb://***@127.0.0.1:1/")
        .check();
    Case::new("mongodb unreachable", &["status"])
        .env(&env)
        .ends(End::Exit(0))
        .says("read models: unavailable")
        .check();
    for source in ["replication", "polling", "kafka"] {
        Case::new(
            "mongodb unreachable",
            &["run", "--source", source, "--until-caught-up"],
        )
        .env(&env)
        .ends(End::RunsUntilStopped(RETRYING))
        .says("mongodb unreachable; retrying")
        .says("mongodb://***@127.0.0.1:1/")
        .check();
    }

    // The server knows the user, not this password.
    mongo
        .store
        .database()
        .run_command(doc! {
            "createUser": "app",
            "pwd": format!("{MONGO_SECRET}-right"),
            "roles": [{ "role": "readWrite", "db": mongo.name.as_str() }],
        })
        .await
        .expect("create a MongoDB user");
    let wrong = with_credentials(
        &mongodb_uri(),
        "app",
        &format!("{MONGO_SECRET}-wrong"),
        &mongo.name,
    );
    let env = services_env(&db, &wrong, &mongo.name, &slot);
    Case::new("mongodb refuses the password", &["show"])
        .env(&env)
        .ends(End::Exit(1))
        .says("authentication failed")
        .check();
    Case::new("mongodb refuses the password", &["status", "--json"])
        .env(&env)
        .ends(End::Exit(0))
        .says("authentication failed")
        .check();
    for (source, format) in [
        ("replication", "json"),
        ("polling", "text"),
        ("kafka", "json"),
    ] {
        Case::new(
            "mongodb refuses the password",
            &["run", "--source", source, "--until-caught-up"],
        )
        .env(&env)
        .env(&[("LOG_FORMAT", format)])
        .ends(End::Exit(1))
        .says("cannot use MongoDB at mongodb://***@127.0.0.1")
        .says("authentication failed")
        .check();
    }
    let _ = mongo
        .store
        .database()
        .run_command(doc! { "dropUser": "app" })
        .await;
    mongo.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_failures_never_show_properties() {
    let db = TestDb::migrated().await;
    let mongo = TestMongo::create().await;
    let slot = fresh_slot();
    let _slots = common::kafka::Slots(db.config.clone());
    let topic = common::kafka::fresh("aep-secrets-kafka");
    let mut env = services_env(&db, &mongo.uri, &mongo.name, &slot);
    env.push(("KAFKA_TOPIC".into(), topic.clone()));

    Case::new(
        "a missing topic",
        &["run", "--source", "kafka", "--until-caught-up"],
    )
    .env(&env)
    .ends(End::Exit(1))
    .says(&format!("topic `{topic}` does not exist"))
    .check();
    Case::new("a missing topic", &["relay", "--until-caught-up"])
        .env(&env)
        .ends(End::Exit(1))
        .says(&format!("topic `{topic}` does not exist"))
        .check();

    // Nothing listens on port 1.
    let gone = [("KAFKA_BROKERS", "127.0.0.1:1")];
    Case::new("brokers unreachable", &["kafka", "topics", "create"])
        .env(&env)
        .env(&gone)
        .ends(End::Exit(1))
        .says("cannot reach the Kafka brokers at 127.0.0.1:1")
        .check();
    for command in [
        &["run", "--source", "kafka", "--until-caught-up"][..],
        &["relay", "--until-caught-up"],
    ] {
        Case::new("brokers unreachable", command)
            .env(&env)
            .env(&gone)
            .ends(End::RunsUntilStopped(RETRYING))
            .says("cannot reach the Kafka brokers at 127.0.0.1:1")
            .check();
    }

    // SASL to a broker that does not speak it: the password is only ever sent.
    let sasl = format!(
        "security.protocol=sasl_plaintext,sasl.mechanism=PLAIN,sasl.username=app,sasl.password={KAFKA_SECRET}"
    );
    Case::new("sasl refused", &["kafka", "topics", "create"])
        .env(&env)
        .env(&[("KAFKA_CONFIG", sasl.as_str()), ("LOG_LEVEL", "trace")])
        .ends(End::Exit(1))
        .says("cannot reach the Kafka brokers")
        .check();
    for command in [
        &["run", "--source", "kafka", "--until-caught-up"][..],
        &["relay", "--until-caught-up"],
    ] {
        Case::new("sasl refused", command)
            .env(&env)
            .env(&[("KAFKA_CONFIG", sasl.as_str()), ("LOG_FORMAT", "json")])
            .ends(End::RunsUntilStopped(RETRYING))
            .says("cannot reach the Kafka brokers")
            .check();
    }
    mongo.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_command_succeeds_with_secrets_everywhere_and_prints_none() {
    let db = TestDb::create().await;
    let mongo = TestMongo::create().await;
    let slot = fresh_slot();
    let _slots = common::kafka::Slots(db.config.clone());
    mongo
        .store
        .database()
        .run_command(doc! {
            "createUser": "app",
            "pwd": MONGO_SECRET,
            "roles": [{ "role": "readWrite", "db": mongo.name.as_str() }],
        })
        .await
        .expect("create a MongoDB user");
    let uri = with_credentials(&mongodb_uri(), "app", MONGO_SECRET, &mongo.name);
    let topic = common::kafka::fresh("aep-secrets-ok");
    let mut env = services_env(&db, &uri, &mongo.name, &slot);
    env.push(("KAFKA_TOPIC".into(), topic.clone()));
    // The secrets move between the inputs from one command to the next.
    let (secret_keys, plain): (Vars, Vars) = env.into_iter().partition(|(k, _)| {
        matches!(
            k.as_str(),
            "POSTGRES_PASSWORD"
                | "MONGODB_URI"
                | "KAFKA_CONFIG"
                | "KAFKA_CONSUMER_CONFIG"
                | "KAFKA_PRODUCER_CONFIG"
        )
    });
    let as_file = secret_keys
        .iter()
        .map(|(k, v)| format!("{k}='{v}'\n"))
        .collect::<String>();
    let steps: [(&[&str], &str, &str); 10] = [
        (&["migrate"], "env", "migrations: 2 applied"),
        (&["seed"], ".env", "seed: 4 events inserted"),
        (&["status", "--json"], "--env-file", "\"pending\":4"),
        (
            &["kafka", "topics", "create", "--partitions", "1"],
            "env",
            "created with 1 partitions",
        ),
        (&["relay", "--until-caught-up"], ".env", "relay stopped"),
        (
            &["run", "--source", "replication", "--until-caught-up"],
            "--env-file",
            "starting",
        ),
        (
            &["run", "--source", "polling", "--until-caught-up"],
            "env",
            "starting",
        ),
        (
            &["run", "--source", "kafka", "--until-caught-up"],
            ".env",
            "kafka consumer subscribed",
        ),
        (&["show"], "--env-file", "users: "),
        (
            &["status"],
            "env",
            "dead letters; last applied sequence_id 4",
        ),
    ];
    for (index, (command, input, says)) in steps.into_iter().enumerate() {
        let name = format!("secrets in {input}, json logs: {}", index % 3 == 0);
        let mut case = Case::new(&name, command).env(&plain).says(says);
        if index % 3 == 0 {
            case = case.env(&[("LOG_FORMAT", "json")]);
        }
        case = match input {
            "env" => case.env(&secret_keys),
            ".env" => case.dotenv(&as_file),
            _ => case.env_file(&as_file),
        };
        case.ends(End::Exit(0)).check();
    }
    Case::new("decode with secrets in the environment", &["decode"])
        .env(&plain)
        .env(&secret_keys)
        .ends(End::Exit(0))
        .says("tombstone")
        .check();
    let _ = mongo
        .store
        .database()
        .run_command(doc! { "dropUser": "app" })
        .await;
    mongo.drop().await;
}
