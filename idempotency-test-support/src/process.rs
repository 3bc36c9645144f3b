//! A server process on a free port, found on `PATH`; the polling helpers.

use std::ffi::OsString;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process on a free loopback port with its own temporary
/// directory, killed (and the directory removed) when dropped.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    /// The loopback port it listens on.
    pub port: u16,
    pub(crate) dir: PathBuf,
}

/// The command-line arguments of a server on `port` with its files in `dir`.
pub(crate) type Args<'a> = dyn Fn(u16, &Path) -> Vec<OsString> + 'a;

/// Whether a fresh connection to the server shows it is ready.
pub(crate) type Ready = fn(&mut TcpStream) -> bool;

/// A loopback port nothing listens on (at the time of asking).
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// The executable `name` on `PATH`, `/usr/bin` or `/usr/sbin`; panics with
/// how to install the Debian `package` that has it when it is missing.
pub(crate) fn binary(name: &str, package: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "{name} was not found on PATH. These tests run against a real server: install it \
             with `apt-get install {package}`, or run `bash scripts/check.sh`, which installs \
             it when missing."
        )
    })
}

/// Runs `program` with `args` (stdin closed), returning its stdout; panics
/// with its output when it fails.
pub(crate) fn run_tool(program: &Path, args: &[String], dir: Option<&Path>) -> String {
    let mut command = Command::new(program);
    command.args(args).stdin(Stdio::null());
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", program.display()));
    assert!(
        output.status.success(),
        "{} {args:?} failed: {}{}",
        program.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Polls `check` every 50 ms for up to `within`; panics with `what` if it
/// never holds.
pub(crate) fn wait_until(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {within:?} waiting until {what}");
}

impl ServerProcess {
    /// Starts `name` with `args(port, dir)` on the ports `port()` gives, up to
    /// `tries` times, until `ready` says a fresh connection answers.
    pub(crate) fn start(
        name: &str,
        tries: usize,
        port: impl FnMut() -> u16,
        args: &Args<'_>,
        ready: Ready,
    ) -> Self {
        Self::start_binary(&binary(name, name), name, tries, port, args, ready)
    }

    /// [`start`](Self::start) with the executable's path given.
    pub(crate) fn start_binary(
        binary: &Path,
        name: &str,
        tries: usize,
        mut port: impl FnMut() -> u16,
        args: &Args<'_>,
        ready: Ready,
    ) -> Self {
        let mut last_error = String::new();
        for attempt in 0..tries {
            let port = port();
            let dir = std::env::temp_dir().join(format!(
                "idem-{name}-{}-{port}-{attempt}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).expect("temp dir");
            let child = Command::new(binary)
                .args(args(port, &dir))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("could not start {}: {e}", binary.display()));
            let mut server = Self { child, port, dir };
            match server.wait_ready(ready) {
                Ok(()) => return server,
                Err(e) => {
                    last_error = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        panic!("{name} did not start: {last_error}");
    }

    fn wait_ready(&mut self, ready: Ready) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited with {status}"));
            }
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
                if ready(&mut stream) {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err("timed out waiting for it to answer".into())
    }

    /// Kills the process (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
