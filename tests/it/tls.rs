//! TLS to Postgres, against a server of the test's own: a second PostgreSQL instance
//! (`initdb` into a temporary directory) with `ssl=on` and a certificate from a CA made in
//! the test. `sslmode=verify-full` with the right CA connects and every session of the
//! service is encrypted (`pg_stat_ssl`, so the test fails when TLS is off); a wrong CA is
//! refused with an error that says the certificate is the problem.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use spectral::store::{Store, StoreConfig};
use sqlx::Connection;

use crate::app::{test_config, Backend, Db, TestApp};

/// Where Debian's PostgreSQL 15 puts its server programs.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A CA and the PEM files of a server certificate it signed for 127.0.0.1 and localhost.
struct Pki {
    ca_pem: String,
    server_pem: String,
    server_key_pem: String,
}

fn pki(name: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("server params");
    params
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .expect("server certificate");
    Pki {
        ca_pem: ca.pem(),
        server_pem: cert.pem(),
        server_key_pem: key.serialize_pem(),
    }
}

/// Run a PostgreSQL program as the `postgres` user when this process is root (initdb refuses
/// root), as this user otherwise.
fn pg(program: &str, args: &[&str]) -> std::process::Output {
    let binary = format!("{PG_BIN}/{program}");
    let as_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let mut cmd = if as_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &binary]);
        c
    } else {
        Command::new(&binary)
    };
    cmd.args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {binary}: {e}"))
}

fn own_for_postgres(path: &Path) {
    let _ = Command::new("chown")
        .arg("-R")
        .arg("postgres:")
        .arg(path)
        .status();
}

/// A PostgreSQL instance of the test's own with TLS on, stopped and removed on drop.
struct TlsServer {
    dir: tempfile::TempDir,
    data: PathBuf,
    port: u16,
    /// The CA that signed the server's certificate, as a file.
    ca_file: PathBuf,
}

impl TlsServer {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let _ = Command::new("chmod").arg("755").arg(dir.path()).status();
        own_for_postgres(dir.path());
        let data = dir.path().join("data");
        let data_s = data.to_str().expect("utf-8 path");
        let out = pg(
            "initdb",
            &[
                "-D",
                data_s,
                "--auth=trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        assert!(
            out.status.success(),
            "initdb: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let pki = pki("right");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &pki.ca_pem).expect("CA file");
        std::fs::write(data.join("server.crt"), &pki.server_pem).expect("certificate");
        let key = data.join("server.key");
        std::fs::write(&key, &pki.server_key_pem).expect("key");
        own_for_postgres(dir.path());
        let _ = Command::new("chmod").arg("600").arg(&key).status();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let options = format!(
            "-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c ssl=on -c fsync=off",
            dir.path().display()
        );
        let log = dir.path().join("server.log");
        let out = pg(
            "pg_ctl",
            &[
                "-D",
                data_s,
                "-o",
                &options,
                "-l",
                log.to_str().expect("utf-8 path"),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Self {
            dir,
            data,
            port,
            ca_file,
        }
    }

    /// The URL of database `postgres` on this server with `params` as its query.
    fn url(&self, params: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?{params}",
            self.port
        )
    }

    fn verify_full(&self, ca: &Path) -> String {
        self.url(&format!("sslmode=verify-full&sslrootcert={}", ca.display()))
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        if let Some(data) = self.data.to_str() {
            let _ = pg("pg_ctl", &["-D", data, "-m", "immediate", "-w", "stop"]);
        }
        let _ = &self.dir;
    }
}

/// The service on `verify-full` with the right CA starts, serves, and every session it holds
/// is encrypted; this test's own plain session shows the check can tell the difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_reaches_postgres_over_verified_tls() {
    let server = TlsServer::start().await;
    // The tests' usual configuration, with the store on the TLS server.
    let db = Db::fresh(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.store.database_url = Some(server.verify_full(&server.ca_file));
    let app = TestApp::start(config).await;
    let (status, health) = app.admin_get("/health").await;
    assert_eq!(status, 200, "{health}");
    let (status, d) = app
        .decide(crate::app::OPERATOR, &crate::app::green_wire())
        .await;
    assert_eq!(status, 200, "{d}");

    let mut admin = sqlx::PgConnection::connect(&server.url("sslmode=disable"))
        .await
        .expect("a plain admin session");
    let sessions: Vec<(i32, bool)> = sqlx::query_as(
        "SELECT s.pid, s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.backend_type = 'client backend'",
    )
    .fetch_all(&mut admin)
    .await
    .expect("sessions");
    let own: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut admin)
        .await
        .expect("pid");
    let (mine, service): (Vec<_>, Vec<_>) = sessions.into_iter().partition(|(p, _)| *p == own);
    assert_eq!(
        mine,
        vec![(own, false)],
        "the probe sees a plain session as plain"
    );
    assert!(!service.is_empty(), "the service holds no session");
    assert!(
        service.iter().all(|(_, ssl)| *ssl),
        "the service opened unencrypted sessions: {service:?}"
    );
    app.stop().await;
    admin.close().await.expect("close");
}

/// A CA that did not sign the server's certificate: the store refuses to connect, and the
/// error says the certificate is the problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_another_ca_is_refused_clearly() {
    let server = TlsServer::start().await;
    let wrong = server.dir.path().join("wrong-ca.pem");
    std::fs::write(&wrong, pki("wrong").ca_pem).expect("wrong CA");
    let connect = |url: String| async move {
        tokio::time::timeout(
            Duration::from_secs(60),
            Store::connect(&StoreConfig {
                database_url: Some(url),
                max_connections: 1,
                migrate_on_start: false,
                ..StoreConfig::default()
            }),
        )
        .await
        .expect("the connection attempt ends")
    };
    let Err(refused) = connect(server.verify_full(&wrong)).await else {
        panic!("a certificate from another CA was accepted");
    };
    let message = format!("{refused:#}");
    assert!(
        message.to_lowercase().contains("certificate"),
        "the error does not name the certificate: {message}"
    );
    // The same URL with the right CA connects: the refusal is the CA's.
    let store = connect(server.verify_full(&server.ca_file))
        .await
        .expect("the right CA connects");
    store.close().await;
}
