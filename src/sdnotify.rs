//! Telling systemd how `usersync run` is doing, with the `sd_notify` protocol, for a unit with
//! `Type=notify` and `WatchdogSec=` (`deploy/systemd/usersync.service`).
//!
//! The protocol (<https://www.freedesktop.org/software/systemd/man/latest/sd_notify.html>) is
//! one datagram per message on the `AF_UNIX` socket named by `$NOTIFY_SOCKET` (a path, or with
//! a leading `@` a name in Linux's abstract namespace), holding newline-separated assignments:
//! `READY=1` once started, `STOPPING=1` when shutting down, `WATCHDOG=1` to say "still alive".
//! With `WatchdogSec=` systemd sets `$WATCHDOG_USEC` (and `$WATCHDOG_PID`, the process it
//! means), and kills the service when no `WATCHDOG=1` came for that long; the advice is to
//! send it at half that interval. systemd learns who sent a message from the kernel (the
//! socket asks for the sender's credentials), so nothing needs to be attached.
//!
//! Without `$NOTIFY_SOCKET` (not started by systemd, or not with `Type=notify`) nothing is
//! sent. A few lines of std instead of a crate: the protocol is one `sendto`.

use std::ffi::OsStr;
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Startup is finished (the unit becomes active).
pub const READY: &str = "READY=1";
/// The service is alive: resets the watchdog's timer.
pub const WATCHDOG: &str = "WATCHDOG=1";
/// The service is shutting down.
pub const STOPPING: &str = "STOPPING=1";

/// Talking to systemd failed.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={socket:?} is not a socket usersync can send to: {reason}")]
    Address { socket: String, reason: String },
    #[error("cannot open a socket to tell systemd how usersync is doing: {0}")]
    Socket(#[source] io::Error),
    #[error("cannot tell systemd {message:?} through NOTIFY_SOCKET={socket:?}: {source}")]
    Send {
        message: String,
        socket: String,
        #[source]
        source: io::Error,
    },
    #[error("WATCHDOG_USEC={0:?} is not a number of microseconds; systemd's watchdog is not fed")]
    WatchdogUsec(String),
}

/// A socket to systemd's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    address: SocketAddr,
    /// `$NOTIFY_SOCKET` as given, for messages.
    shown: String,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` asks for; `None` when it is unset or empty.
    pub fn from_env() -> Result<Option<Notifier>, NotifyError> {
        Self::from_socket_var(std::env::var_os("NOTIFY_SOCKET").as_deref())
    }

    fn from_socket_var(socket: Option<&OsStr>) -> Result<Option<Notifier>, NotifyError> {
        match socket {
            None => Ok(None),
            Some(socket) if socket.is_empty() => Ok(None),
            Some(socket) => Self::connect(socket).map(Some),
        }
    }

    /// A notifier for the socket at `socket`: a path, or `@name` in the abstract namespace.
    pub fn connect(socket: &OsStr) -> Result<Notifier, NotifyError> {
        let shown = socket.to_string_lossy().into_owned();
        let address = address(socket).map_err(|error| NotifyError::Address {
            socket: shown.clone(),
            reason: error.to_string(),
        })?;
        let socket = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
        // Callers are async tasks: a receiver that does not drain its queue (a busy PID 1, a
        // socket a crafted NOTIFY_SOCKET names) must fail a send, not hang the thread.
        socket.set_nonblocking(true).map_err(NotifyError::Socket)?;
        Ok(Notifier {
            socket,
            address,
            shown,
        })
    }

    /// Sends one message (one or more `KEY=value` lines).
    pub fn notify(&self, message: &str) -> Result<(), NotifyError> {
        self.socket
            .send_to_addr(message.as_bytes(), &self.address)
            .map(drop)
            .map_err(|source| NotifyError::Send {
                message: message.to_owned(),
                socket: self.shown.clone(),
                source,
            })
    }
}

/// The socket address `$NOTIFY_SOCKET` names.
fn address(socket: &OsStr) -> io::Result<SocketAddr> {
    use std::os::unix::ffi::OsStrExt;
    match socket.as_bytes() {
        [b'@', name @ ..] => abstract_address(name),
        [b'/', ..] => SocketAddr::from_pathname(socket),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "neither an absolute path nor @ and an abstract name",
        )),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_address(name: &[u8]) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_address(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets exist only on Linux",
    ))
}

/// The shortest interval [`WATCHDOG`] is sent at.
const MIN_WATCHDOG_INTERVAL: Duration = Duration::from_millis(100);

/// How often to send [`WATCHDOG`]: half of `$WATCHDOG_USEC` (at least 100 ms), when systemd watches this
/// process; `None` when it does not (no `WatchdogSec=`, or `$WATCHDOG_PID` names another
/// process, which inherited the variables).
pub fn watchdog_interval_from_env() -> Result<Option<Duration>, NotifyError> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_interval(usec.as_deref(), pid.as_deref(), std::process::id())
}

fn watchdog_interval(
    usec: Option<&str>,
    pid: Option<&str>,
    own_pid: u32,
) -> Result<Option<Duration>, NotifyError> {
    let Some(usec) = usec.filter(|usec| !usec.is_empty()) else {
        return Ok(None);
    };
    if pid.is_some_and(|pid| pid.parse::<u32>().ok() != Some(own_pid)) {
        return Ok(None);
    }
    match usec.parse::<u64>() {
        Ok(0) => Ok(None),
        // No busy loop for a tiny (or crafted) value: a watchdog that short could never be
        // fed in time anyway.
        Ok(usec) => Ok(Some(
            (Duration::from_micros(usec) / 2).max(MIN_WATCHDOG_INTERVAL),
        )),
        Err(_) => Err(NotifyError::WatchdogUsec(usec.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of its own for a test's socket, removed on drop.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir()
                .join(format!("usersync-sdnotify-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn received(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buffer = [0; 256];
        let length = socket.recv(&mut buffer).unwrap();
        String::from_utf8(buffer[..length].to_vec()).unwrap()
    }

    #[test]
    fn messages_reach_a_socket_at_a_path() {
        let dir = TempDir::new("path");
        let path = dir.0.join("notify");
        let systemd = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::from_socket_var(Some(path.as_os_str()))
            .unwrap()
            .expect("a notifier");
        for message in [READY, WATCHDOG, STOPPING] {
            notifier.notify(message).unwrap();
            assert_eq!(received(&systemd), message);
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn messages_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("usersync-sdnotify-test-{}", std::process::id());
        let systemd =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        let variable = format!("@{name}");
        let notifier = Notifier::connect(OsStr::new(&variable)).unwrap();
        notifier.notify(READY).unwrap();
        assert_eq!(received(&systemd), READY);
    }

    #[test]
    fn nothing_without_a_socket_and_errors_for_a_bad_one() {
        assert!(Notifier::from_socket_var(None).unwrap().is_none());
        assert!(Notifier::from_socket_var(Some(OsStr::new("")))
            .unwrap()
            .is_none());
        let relative = Notifier::connect(OsStr::new("run/notify")).unwrap_err();
        assert!(
            relative
                .to_string()
                .contains("NOTIFY_SOCKET=\"run/notify\""),
            "{relative}"
        );
        let dir = TempDir::new("gone");
        let gone = Notifier::connect(dir.0.join("nobody").as_os_str()).unwrap();
        let error = gone.notify(READY).unwrap_err();
        assert!(matches!(error, NotifyError::Send { .. }), "{error}");
    }

    #[test]
    fn the_watchdog_is_fed_at_half_its_interval_when_it_watches_this_process() {
        let half = Some(Duration::from_secs(15));
        assert_eq!(watchdog_interval(Some("30000000"), None, 7).unwrap(), half);
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("7"), 7).unwrap(),
            half
        );
        // Inherited from a parent the watchdog watches: not ours to feed.
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("8"), 7).unwrap(),
            None
        );
        assert_eq!(watchdog_interval(None, None, 7).unwrap(), None);
        assert_eq!(watchdog_interval(Some(""), None, 7).unwrap(), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7).unwrap(), None);
        // No busy loop for a tiny value.
        assert_eq!(
            watchdog_interval(Some("1"), None, 7).unwrap(),
            Some(MIN_WATCHDOG_INTERVAL)
        );
        assert!(matches!(
            watchdog_interval(Some("30s"), None, 7),
            Err(NotifyError::WatchdogUsec(_))
        ));
    }

    /// `notify` runs on async tasks: when the receiver does not drain its queue (a socket a
    /// crafted NOTIFY_SOCKET names, or a busy PID 1), a send fails instead of hanging the
    /// thread (the attacker-seat review's case).
    #[test]
    fn attack_notify_blocks_when_the_receiver_does_not_read() {
        let dir = TempDir::new("full");
        let path = dir.0.join("notify");
        let _never_reads = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::connect(path.as_os_str()).unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut refused = 0;
            for _ in 0..100_000 {
                refused += usize::from(notifier.notify(WATCHDOG).is_err());
            }
            assert!(refused > 0, "a queue that is never drained filled up");
            let _ = done.send(());
        });
        assert!(
            finished.recv_timeout(Duration::from_secs(5)).is_ok(),
            "notify blocked: sending to a socket nobody reads hangs the caller"
        );
    }
}
