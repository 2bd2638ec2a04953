//! A throwaway real PostgreSQL per test: initdb + pg_ctl into a temp dir, on a
//! free loopback port and a private unix socket dir, stopped (immediate) when
//! dropped, also when the test fails. As root, the server runs as `postgres`
//! (initdb refuses root).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A PostgreSQL cluster owned by one test.
pub struct Pg {
    pub dir: tempfile::TempDir,
    pub port: u16,
    bindir: PathBuf,
}

fn bindir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").exists() {
            return p;
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries not found: `make test` installs the postgresql package")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort_by_key(|p| {
        p.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok())
    });
    found.pop().expect("no /usr/lib/postgresql/*/bin/initdb")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Pg {
    /// initdb only: the server is not running (for "down from the start").
    pub fn init() -> Self {
        let dir = tempfile::Builder::new().prefix("outpost-pg").tempdir().unwrap();
        let pg = Self { port: free_port(), bindir: bindir(), dir };
        if is_root() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(pg.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            let st = Command::new("chown").args(["postgres:postgres"]).arg(pg.dir.path()).status().unwrap();
            assert!(st.success(), "chown postgres failed (is the postgresql package installed?)");
        }
        let out = pg
            .cmd("initdb")
            .args(["-D", &pg.data().display().to_string(), "-U", "postgres", "-A", "trust", "-E", "UTF8"])
            .args(["--no-sync", "--no-instructions"])
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        pg
    }

    /// initdb + start.
    pub fn start() -> Self {
        let pg = Self::init();
        pg.up();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn cmd(&self, tool: &str) -> Command {
        let bin = self.bindir.join(tool);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin);
            c
        } else {
            Command::new(bin)
        }
    }

    /// initdb + start, logging every statement with its protocol step
    /// (`parse <name>`, `bind`, `execute`) to [`Pg::server_log`].
    #[allow(dead_code)]
    pub fn start_logging_statements() -> Self {
        let pg = Self::init();
        pg.up_with("-c log_min_duration_statement=0");
        pg
    }

    /// The server's log so far.
    #[allow(dead_code)]
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// initdb + a self-signed certificate for 127.0.0.1 + start with ssl=on.
    /// Returns the server and the certificate's path (the CA to trust).
    pub fn start_tls() -> (Self, PathBuf) {
        let pg = Self::init();
        let (cert, key) = (pg.data().join("server.crt"), pg.data().join("server.key"));
        let work = pg.dir.path();
        let (ca_key, ca_cert, csr, ext) =
            (work.join("ca.key"), work.join("ca.pem"), work.join("server.csr"), work.join("ext.cnf"));
        std::fs::write(&ext, "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
        let openssl = |args: Vec<std::ffi::OsString>| {
            let out = Command::new("openssl").args(args).output().unwrap();
            assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
        };
        let os = |v: &[&dyn AsRef<std::ffi::OsStr>]| v.iter().map(|a| a.as_ref().to_os_string()).collect::<Vec<_>>();
        // A CA, then a server certificate it signs (webpki refuses a CA as end entity).
        openssl(os(&[
            &"req",
            &"-x509",
            &"-newkey",
            &"rsa:2048",
            &"-nodes",
            &"-days",
            &"2",
            &"-subj",
            &"/CN=outpost test CA",
            &"-keyout",
            &ca_key,
            &"-out",
            &ca_cert,
        ]));
        openssl(os(&[
            &"req",
            &"-newkey",
            &"rsa:2048",
            &"-nodes",
            &"-subj",
            &"/CN=localhost",
            &"-keyout",
            &key,
            &"-out",
            &csr,
        ]));
        openssl(os(&[
            &"x509",
            &"-req",
            &"-in",
            &csr,
            &"-CA",
            &ca_cert,
            &"-CAkey",
            &ca_key,
            &"-CAcreateserial",
            &"-days",
            &"2",
            &"-extfile",
            &ext,
            &"-out",
            &cert,
        ]));
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        if is_root() {
            let st = Command::new("chown").arg("postgres:postgres").arg(&cert).arg(&key).status().unwrap();
            assert!(st.success());
        }
        let public = ca_cert;
        pg.up_with("-c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key");
        (pg, public)
    }

    /// Starts the server (again) on the same port; waits until it accepts.
    pub fn up(&self) {
        self.up_with("");
    }

    /// A primary for a streaming standby: it also listens on 127.0.0.2 (the
    /// standby replicates through that address, so a firewall rule can cut
    /// replication alone) and lets loopback replicate.
    #[allow(dead_code)]
    pub fn start_primary() -> Self {
        let pg = Self::init();
        let hba = pg.data().join("pg_hba.conf");
        let mut text = std::fs::read_to_string(&hba).unwrap();
        text.push_str("\nhost all all 127.0.0.0/8 trust\nhost replication all 127.0.0.0/8 trust\n");
        std::fs::write(&hba, text).unwrap();
        pg.up_with("-c listen_addresses=127.0.0.1,127.0.0.2 -c wal_level=replica -c max_wal_senders=4");
        pg
    }

    /// A streaming standby of `primary`, copied with `pg_basebackup -R`
    /// through 127.0.0.2, started on a port of its own (read-only until
    /// promoted).
    #[allow(dead_code)]
    pub fn start_standby(primary: &Pg) -> Self {
        let dir = tempfile::Builder::new().prefix("outpost-pg-standby").tempdir().unwrap();
        let pg = Self { port: free_port(), bindir: bindir(), dir };
        if is_root() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(pg.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            let st = Command::new("chown").args(["postgres:postgres"]).arg(pg.dir.path()).status().unwrap();
            assert!(st.success());
        }
        let out = pg
            .cmd("pg_basebackup")
            .args(["-h", "127.0.0.2", "-p", &primary.port.to_string(), "-U", "postgres", "-R", "-X", "stream"])
            .args(["-D", &pg.data().display().to_string(), "--no-sync"])
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_basebackup: {}", String::from_utf8_lossy(&out.stderr));
        pg.up();
        pg
    }

    /// `pg_ctl promote`: the standby becomes a primary (waits until it is).
    #[allow(dead_code)]
    pub fn promote(&self) {
        let out =
            self.cmd("pg_ctl").args(["-D", &self.data().display().to_string(), "-w", "promote"]).output().unwrap();
        assert!(out.status.success(), "pg_ctl promote: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn up_with(&self, extra: &str) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=50 {extra}",
            self.port,
            self.dir.path().display()
        );
        let out = self
            .cmd("pg_ctl")
            .args(["-D", &self.data().display().to_string(), "-l"])
            .arg(self.dir.path().join("server.log"))
            .args(["-o", &opts, "-w", "-t", "60", "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
        );
    }

    /// `pg_ctl stop -m immediate`: a crash as far as clients can tell.
    pub fn kill(&self) {
        let _ = self
            .cmd("pg_ctl")
            .args(["-D", &self.data().display().to_string(), "-m", "immediate", "-w", "stop"])
            .output();
    }

    /// URL for the appliance (no password: trust auth on loopback).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A plain client connection for assertions.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client
    }

    /// Runs `psql -c` style SQL as the superuser.
    pub async fn exec(&self, sql: &str) {
        self.client().await.batch_execute(sql).await.unwrap();
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.kill();
    }
}
