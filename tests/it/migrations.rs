//! The migrations policy (docs/migrations.md) as checks: a released migration never changes
//! or disappears (its sha256 is recorded in `migrations/CHECKSUMS`); a destructive statement
//! appears only in a contract step that names the expand step it follows; and a build starts
//! on a schema that a newer build migrated, which is what makes a rollback possible.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::app::{Backend, Db, TestApp};

fn migrations_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("migrations")
}

/// Every migration file, as `backend/NNNN_name.sql`, in order.
fn migration_files() -> Vec<String> {
    let mut files = Vec::new();
    for backend in ["postgres", "sqlite"] {
        let dir = migrations_dir().join(backend);
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let name = entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned();
            if name.ends_with(".sql") {
                files.push(format!("{backend}/{name}"));
            }
        }
    }
    files.sort();
    files
}

/// `migrations/CHECKSUMS`: file → recorded sha256.
fn recorded() -> BTreeMap<String, String> {
    let path = migrations_dir().join("CHECKSUMS");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run bash scripts/record-migrations.sh",
            path.display()
        )
    });
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (sum, file) = l
                .split_once("  ")
                .unwrap_or_else(|| panic!("CHECKSUMS: malformed line {l:?}"));
            (file.trim().to_string(), sum.trim().to_string())
        })
        .collect()
}

fn sha256_of(file: &str) -> String {
    let bytes = std::fs::read(migrations_dir().join(file)).expect("read migration");
    hex::encode(Sha256::digest(&bytes))
}

#[test]
fn released_migrations_never_change_or_disappear() {
    let recorded = recorded();
    let files = migration_files();
    let mut problems = Vec::new();
    for (file, sum) in &recorded {
        if !files.contains(file) {
            problems.push(format!(
                "migrations/{file} was released and is gone. Databases have applied it: restore \
                 it, and undo what it did in a new migration instead."
            ));
        } else if &sha256_of(file) != sum {
            problems.push(format!(
                "migrations/{file} changed after it was recorded. A released migration is never \
                 edited (databases have applied it, and sqlx refuses to start when an applied \
                 file changes): restore it and put the change in a new migration. If it was \
                 never released (it is new on this branch), re-record it with \
                 `bash scripts/record-migrations.sh --amend {file}`."
            ));
        }
    }
    for file in &files {
        if !recorded.contains_key(file) {
            problems.push(format!(
                "migrations/{file} is not recorded: run `bash scripts/record-migrations.sh` and \
                 commit migrations/CHECKSUMS with it."
            ));
        }
    }
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n\n"));
}

/// A statement that would break the previous generation's code, which keeps running against
/// the new schema until the rollout ends and again after a rollback.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Destructive {
    /// Which form: `DROP TABLE`, `DROP COLUMN`, `RENAME`, `ALTER … TYPE`, `SET NOT NULL`,
    /// `ADD COLUMN … NOT NULL without DEFAULT`.
    form: &'static str,
    /// The statement, shortened.
    statement: String,
}

/// The SQL with comments removed and string literals emptied, so that words inside them are
/// not read as statements.
fn code_only(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '-' if chars.peek() == Some(&'-') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut last = ' ';
                for c in chars.by_ref() {
                    if last == '*' && c == '/' {
                        break;
                    }
                    last = c;
                }
                out.push(' ');
            }
            '\'' => {
                // '' inside a literal is an escaped quote: two literals back to back read the
                // same once emptied.
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                }
                out.push_str("''");
            }
            _ => out.push(c),
        }
    }
    out
}

/// Every destructive statement in a migration's SQL.
fn destructive_statements(sql: &str) -> Vec<Destructive> {
    let mut found = Vec::new();
    for statement in code_only(sql).split(';') {
        let tokens: Vec<String> = statement
            .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
            .filter(|t| !t.is_empty())
            .map(|t| t.trim_matches('"').to_ascii_uppercase())
            .collect();
        let t = |i: usize| tokens.get(i).map(String::as_str).unwrap_or("");
        let shown = || {
            let s = statement.split_whitespace().collect::<Vec<_>>().join(" ");
            if s.len() > 100 {
                format!(
                    "{}…",
                    &s[..s.char_indices().nth(100).map_or(s.len(), |(i, _)| i)]
                )
            } else {
                s
            }
        };
        let mut flag = |form: &'static str| {
            if !found
                .iter()
                .any(|d: &Destructive| d.form == form && d.statement == shown())
            {
                found.push(Destructive {
                    form,
                    statement: shown(),
                });
            }
        };
        let alters_table = t(0) == "ALTER" && t(1) == "TABLE";
        for i in 0..tokens.len() {
            match t(i) {
                "DROP" if t(i + 1) == "TABLE" => flag("DROP TABLE"),
                "DROP" if alters_table => {
                    // DROP CONSTRAINT, DEFAULT, NOT NULL, IDENTITY and EXPRESSION relax the
                    // schema; anything else after DROP in ALTER TABLE is a column.
                    let next = t(i + 1);
                    if !matches!(
                        next,
                        "CONSTRAINT" | "DEFAULT" | "NOT" | "IDENTITY" | "EXPRESSION" | ""
                    ) {
                        flag("DROP COLUMN");
                    }
                }
                "RENAME" => flag("RENAME"),
                "TYPE" if alters_table => {
                    let after_alter = t(i.wrapping_sub(2)) == "ALTER"
                        || (t(i.wrapping_sub(3)) == "ALTER" && t(i.wrapping_sub(2)) == "COLUMN");
                    let set_data = t(i.wrapping_sub(1)) == "DATA" && t(i.wrapping_sub(2)) == "SET";
                    if after_alter || set_data {
                        flag("ALTER … TYPE");
                    }
                }
                "SET" if alters_table && t(i + 1) == "NOT" && t(i + 2) == "NULL" => {
                    flag("SET NOT NULL")
                }
                "ADD"
                    if alters_table
                        && !matches!(
                            t(i + 1),
                            "CONSTRAINT" | "PRIMARY" | "UNIQUE" | "CHECK" | "FOREIGN"
                        ) =>
                {
                    // The column definition runs to the next ADD/DROP/ALTER of this statement.
                    let end = (i + 1..tokens.len())
                        .find(|&j| matches!(t(j), "ADD" | "DROP" | "ALTER"))
                        .unwrap_or(tokens.len());
                    let def = &tokens[i + 1..end];
                    let not_null = def.windows(2).any(|w| w[0] == "NOT" && w[1] == "NULL");
                    let default = def.iter().any(|w| w == "DEFAULT");
                    if not_null && !default {
                        flag("ADD COLUMN … NOT NULL without DEFAULT");
                    }
                }
                _ => {}
            }
        }
    }
    found
}

/// The expand migration a contract step names: `-- contract: follows 0003_add_x.sql`.
fn contract_marker(sql: &str) -> Option<String> {
    sql.lines().find_map(|l| {
        l.trim()
            .strip_prefix("--")
            .map(str::trim)
            .and_then(|l| l.strip_prefix("contract:"))
            .map(str::trim)
            .and_then(|l| l.strip_prefix("follows"))
            .map(|f| f.trim().to_string())
            .filter(|f| !f.is_empty())
    })
}

/// What is wrong with one migration, given the other files of its backend: destructive
/// statements need a contract marker naming an earlier migration of the same backend.
fn lint(file: &str, sql: &str, siblings: &[String]) -> Vec<String> {
    let found = destructive_statements(sql);
    if found.is_empty() {
        return Vec::new();
    }
    let marker = contract_marker(sql);
    let why = match &marker {
        None => "it is not marked as a contract step".to_string(),
        Some(expand) if !siblings.contains(expand) => {
            format!("its marker names {expand}, which is not a migration beside it")
        }
        Some(expand) if expand.as_str() >= file => {
            format!("its marker names {expand}, which does not come before it")
        }
        Some(_) => return Vec::new(),
    };
    found
        .into_iter()
        .map(|d| {
            format!(
                "{file}: {} in `{}`, and {why}. The previous generation runs against this schema \
                 until the rollout ends and again after a rollback, so remove things in two \
                 steps: an expand migration and the code that stops using them ship first, then \
                 a later migration marked `-- contract: follows <that expand migration>` \
                 (docs/migrations.md).",
                d.form, d.statement
            )
        })
        .collect()
}

#[test]
fn destructive_statements_only_in_marked_contract_steps() {
    let mut problems = Vec::new();
    for backend in ["postgres", "sqlite"] {
        let names: Vec<String> = migration_files()
            .iter()
            .filter_map(|f| f.strip_prefix(&format!("{backend}/")).map(String::from))
            .collect();
        for name in &names {
            let path: &Path = &migrations_dir().join(backend).join(name);
            let sql = std::fs::read_to_string(path).expect("read migration");
            problems.extend(lint(name, &sql, &names));
        }
    }
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n\n"));
}

#[test]
fn the_lint_catches_every_destructive_form() {
    let cases = [
        ("DROP TABLE core.decisions;", "DROP TABLE"),
        ("drop table if exists widgets;", "DROP TABLE"),
        ("ALTER TABLE core.worlds DROP COLUMN draft;", "DROP COLUMN"),
        ("ALTER TABLE worlds DROP draft;", "DROP COLUMN"),
        (
            "ALTER TABLE worlds ADD COLUMN note text, DROP COLUMN draft;",
            "DROP COLUMN",
        ),
        (
            "ALTER TABLE worlds RENAME COLUMN draft TO working_copy;",
            "RENAME",
        ),
        ("ALTER TABLE worlds RENAME TO tenants;", "RENAME"),
        (
            "ALTER TABLE core.decisions ALTER COLUMN status TYPE varchar(16);",
            "ALTER … TYPE",
        ),
        (
            "ALTER TABLE decisions ALTER status TYPE int USING status::int;",
            "ALTER … TYPE",
        ),
        (
            "ALTER TABLE decisions ALTER COLUMN status SET DATA TYPE text;",
            "ALTER … TYPE",
        ),
        (
            "ALTER TABLE core.worlds ALTER COLUMN draft SET NOT NULL;",
            "SET NOT NULL",
        ),
        (
            "ALTER TABLE worlds ADD COLUMN region text NOT NULL;",
            "ADD COLUMN … NOT NULL without DEFAULT",
        ),
    ];
    for (sql, form) in cases {
        let found = destructive_statements(sql);
        assert!(
            found.iter().any(|d| d.form == form),
            "{sql:?} should be flagged as {form}, got {found:?}"
        );
        let problems = lint("0007_change.sql", sql, &["0007_change.sql".into()]);
        assert_eq!(problems.len(), found.len(), "{problems:?}");
        assert!(
            problems[0].contains("not marked as a contract step"),
            "{}",
            problems[0]
        );
    }
}

#[test]
fn the_lint_lets_additive_statements_comments_and_strings_pass() {
    let sql = "
        -- We never DROP TABLE here, and never RENAME anything.
        /* ALTER TABLE worlds DROP COLUMN draft; */
        CREATE TABLE core.widgets (id bigint PRIMARY KEY, kind text NOT NULL, type text);
        ALTER TABLE core.worlds ADD COLUMN region text;
        ALTER TABLE core.worlds ADD COLUMN tier text NOT NULL DEFAULT 'free';
        ALTER TABLE core.worlds ADD COLUMN type text;
        ALTER TABLE core.worlds ADD CONSTRAINT tier_known CHECK (tier <> 'DROP TABLE x');
        ALTER TABLE core.worlds ALTER COLUMN draft DROP NOT NULL;
        ALTER TABLE core.worlds ALTER COLUMN tier DROP DEFAULT;
        ALTER TABLE core.worlds DROP CONSTRAINT tier_known;
        CREATE INDEX widgets_kind ON core.widgets (kind);
        INSERT INTO core.widgets VALUES (1, 'it''s RENAME', NULL);
    ";
    assert_eq!(destructive_statements(sql), vec![]);
    assert!(lint("0003_widgets.sql", sql, &[]).is_empty());
}

#[test]
fn the_lint_accepts_a_contract_step_that_names_its_earlier_expand_step() {
    let names: Vec<String> = ["0003_add_region.sql", "0004_drop_country.sql"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let contract = "-- contract: follows 0003_add_region.sql\n\
                    -- The code stopped reading country in the release that added region.\n\
                    ALTER TABLE core.vendors DROP COLUMN country;\n";
    assert!(lint("0004_drop_country.sql", contract, &names).is_empty());

    // The marker must name a migration that exists, and one that comes first.
    let missing = contract.replace("0003_add_region.sql", "0002_nothing.sql");
    let problems = lint("0004_drop_country.sql", &missing, &names);
    assert!(
        problems.len() == 1 && problems[0].contains("not a migration beside it"),
        "{problems:?}"
    );
    let later = contract.replace("0003_add_region.sql", "0004_drop_country.sql");
    let problems = lint("0004_drop_country.sql", &later, &names);
    assert!(
        problems.len() == 1 && problems[0].contains("does not come before it"),
        "{problems:?}"
    );
}

/// A rollback runs the previous build against the schema a newer build migrated: the
/// previous build must start (and `spectral migrate` must succeed) although the database has a
/// migration it does not know.
async fn a_build_starts_on_a_schema_newer_than_itself(backend: Backend) {
    let db = Db::fresh(backend).await;
    TestApp::on(&db).await.stop().await;
    let future = "INSERT INTO _sqlx_migrations \
                  (version, description, success, checksum, execution_time) \
                  VALUES (99990101000000, 'from a newer build', TRUE, X'00', 0)";
    match backend {
        Backend::Sqlite => {
            use sqlx::Connection;
            let file = db.sqlite_file().expect("sqlite");
            let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", file.display()))
                .await
                .expect("connect");
            sqlx::query(future).execute(&mut c).await.expect("insert");
            c.close().await.expect("close");
        }
        Backend::Postgres => {
            use sqlx::Connection;
            let mut c = sqlx::PgConnection::connect(db.postgres_url().expect("postgres"))
                .await
                .expect("connect");
            sqlx::query(&future.replace("X'00'", "decode('00', 'hex')"))
                .execute(&mut c)
                .await
                .expect("insert");
            c.close().await.expect("close");
        }
    }
    let app = TestApp::on(&db).await;
    let (status, health) = app.admin_get("/health").await;
    assert_eq!(status, 200, "{health}");
    app.stop().await;
}

/// A build from before retirement deploys without looking at retired versions: the schema
/// refuses the deployment for it, so a rollback of the code does not undo a retirement.
async fn a_build_that_ignores_retirement_still_cannot_deploy_a_retired_version(backend: Backend) {
    use sqlx::Connection;
    let db = Db::fresh(backend).await;
    let store = db.store().await;
    for n in 1..=2 {
        let content = format!("module {n}");
        store
            .publish(&spectral::store::NewVersion {
                world: "w".into(),
                model: serde_json::json!({"n": n}),
                modules: vec![spectral::store::NewModule {
                    action: "act".into(),
                    hash: spectral::worlds::module::hash_bytes(content.as_bytes()),
                    content: content.into_bytes(),
                }],
                published_by: "op".into(),
            })
            .await
            .expect("publish");
    }
    store.retire("w", 2, "op", None).await.expect("retire");
    store.close().await;
    // The statements a build that knows nothing of retirement runs to deploy.
    let result = |version: i64, seq: i64| match backend {
        Backend::Sqlite => format!(
            "INSERT INTO world_deployments (world, seq, version, deployed_at, deployed_by) \
             VALUES ('w', {seq}, {version}, 0, 'old build')"
        ),
        Backend::Postgres => format!(
            "INSERT INTO core.world_deployments (world, seq, version, deployed_at, deployed_by) \
             VALUES ('w', {seq}, {version}, now(), 'old build')"
        ),
    };
    let (refused, allowed) = match backend {
        Backend::Sqlite => {
            let file = db.sqlite_file().expect("sqlite");
            let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", file.display()))
                .await
                .expect("connect");
            let refused = sqlx::query(&result(2, 1)).execute(&mut c).await.err();
            let allowed = sqlx::query(&result(1, 1)).execute(&mut c).await.err();
            c.close().await.expect("close");
            (refused, allowed)
        }
        Backend::Postgres => {
            let mut c = sqlx::PgConnection::connect(db.postgres_url().expect("postgres"))
                .await
                .expect("connect");
            let refused = sqlx::query(&result(2, 1)).execute(&mut c).await.err();
            let allowed = sqlx::query(&result(1, 1)).execute(&mut c).await.err();
            c.close().await.expect("close");
            (refused, allowed)
        }
    };
    let refused = refused.expect("deploying the retired version is refused");
    assert!(refused.to_string().contains("retired"), "{refused}");
    assert!(allowed.is_none(), "{allowed:?}");
}

crate::both_backends!(
    a_build_starts_on_a_schema_newer_than_itself,
    a_build_that_ignores_retirement_still_cannot_deploy_a_retired_version,
);
