//! Test databases: a fresh Postgres database or SQLite directory for each test, removed when
//! the test ends.

use sqlx::{Connection, PgConnection};

/// The server the Postgres tests use unless `SPECTRAL_TEST_DATABASE_URL` names another; the
/// user must be allowed to create databases.
const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A Postgres database of its own, dropped (with every connection to it) on drop.
pub struct TestDb {
    url: String,
    admin_url: String,
    name: String,
}

impl TestDb {
    /// The URL of the test database.
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// Create a uniquely named database. Fails (never skips) when Postgres cannot be reached: a
/// suite that silently skips a backend proves nothing about it.
pub async fn fresh_postgres() -> TestDb {
    let admin_url = std::env::var("SPECTRAL_TEST_DATABASE_URL")
        .unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned());
    let name = format!("spectral_test_{:016x}", rand::random::<u64>());
    let mut conn = PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
        panic!(
            "the store tests need PostgreSQL: cannot connect to {} ({e}). Start it, or set \
             SPECTRAL_TEST_DATABASE_URL to a server where the user may create databases",
            redact(&admin_url)
        )
    });
    sqlx::raw_sql(&format!(r#"CREATE DATABASE "{name}""#))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
    let _ = conn.close().await;
    TestDb {
        url: with_database(&admin_url, &name),
        admin_url,
        name,
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop runs inside the test's tokio runtime, which cannot block on a future; a thread
        // with a runtime of its own can. Failures are ignored: a leftover database is
        // harmless, a panic in drop would abort the test binary.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let dropper = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(mut conn) = PgConnection::connect(&admin_url).await {
                    let _ =
                        sqlx::raw_sql(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
                            .execute(&mut conn)
                            .await;
                    let _ = conn.close().await;
                }
            });
        });
        let _ = dropper.join();
    }
}

/// A temporary directory for a SQLite store, removed on drop.
pub fn fresh_sqlite_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("create a temporary directory")
}

/// `url` with its database name replaced by `name`, keeping any query string.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let server = match base[authority..].find('/') {
        Some(slash) => &base[..authority + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}

/// `url` without its password, for messages.
fn redact(url: &str) -> String {
    let authority = url.find("://").map_or(0, |i| i + 3);
    match (url[authority..].find('@'), url[authority..].find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}:***{}",
            &url[..authority + colon],
            &url[authority + at..]
        ),
        _ => url.to_owned(),
    }
}

#[test]
fn urls_are_rewritten_for_the_test_database() {
    assert_eq!(
        with_database("postgres://u:p@h:5432/postgres?sslmode=disable", "t"),
        "postgres://u:p@h:5432/t?sslmode=disable"
    );
    assert_eq!(with_database("postgres://u@h", "t"), "postgres://u@h/t");
    assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
    assert_eq!(redact("postgres://u@h:5432/db"), "postgres://u@h:5432/db");
}
