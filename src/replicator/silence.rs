//! A silent source is a dead one.
//!
//! While idle, a walsender sends a keepalive every half `wal_sender_timeout`; a connection
//! that brings nothing at all, neither data nor keepalive, for `source_timeout` (default
//! 60 s, the server's default `wal_sender_timeout`) is most likely half-open: the network
//! stalled, or the server vanished without a FIN. Waiting on it would hang replication for as
//! long as the kernel cares to wait (hours), so the session ends with a transient error and a
//! new connection is made. Halfway there, a status update asks the server for a reply
//! (`reply_requested`), so a live but quiet server always answers in time, whatever its own
//! `wal_sender_timeout`.
//! <https://www.postgresql.org/docs/current/protocol-replication.html#PROTOCOL-REPLICATION-STANDBY-STATUS-UPDATE>

use std::time::{Duration, Instant};

/// What to do about the source's silence now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Fine,
    /// Quiet for half the timeout: send a status update that asks for a reply.
    AskForReply(Duration),
    /// Silent for the whole timeout: the connection is dead.
    Dead(Duration),
}

#[derive(Debug)]
pub(super) struct SilenceWatch {
    timeout: Duration,
    /// When the source last sent anything (data or keepalive).
    last_message: Instant,
    /// A reply was requested since `last_message`, because the source had been quiet.
    reply_requested: bool,
}

impl SilenceWatch {
    pub fn new(timeout: Duration) -> Self {
        SilenceWatch {
            timeout,
            last_message: Instant::now(),
            reply_requested: false,
        }
    }

    /// The source has just been heard from, or could not be listened to until now (the
    /// stream was not read while a message was handled, a wait for a route included: a
    /// target slower than the source timeout is not a silent source).
    pub fn heard(&mut self) {
        self.last_message = Instant::now();
        self.reply_requested = false;
    }

    /// When the silence next needs a look: halfway, to ask for a reply, then at the timeout.
    pub fn check_due(&self) -> Instant {
        if self.reply_requested {
            self.last_message + self.timeout
        } else {
            self.last_message + self.timeout / 2
        }
    }

    /// What the silence so far calls for; asking for a reply is called for once per silence.
    pub fn check(&mut self) -> Verdict {
        let silent_for = self.last_message.elapsed();
        if silent_for >= self.timeout {
            Verdict::Dead(silent_for)
        } else if silent_for >= self.timeout / 2 && !self.reply_requested {
            self.reply_requested = true;
            Verdict::AskForReply(silent_for)
        } else {
            Verdict::Fine
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn silent_for(timeout: Duration, silent: Duration) -> SilenceWatch {
        let mut watch = SilenceWatch::new(timeout);
        watch.last_message = Instant::now() - silent;
        watch
    }

    #[test]
    fn a_quiet_source_is_asked_once_then_given_up_on_at_the_timeout() {
        let timeout = Duration::from_secs(60);
        let mut watch = silent_for(timeout, Duration::from_secs(10));
        assert_eq!(watch.check(), Verdict::Fine);
        assert_eq!(watch.check_due(), watch.last_message + timeout / 2);
        let mut watch = silent_for(timeout, Duration::from_secs(31));
        assert!(matches!(watch.check(), Verdict::AskForReply(_)));
        assert_eq!(watch.check(), Verdict::Fine, "asked once");
        assert_eq!(watch.check_due(), watch.last_message + timeout);
        let mut watch = silent_for(timeout, Duration::from_secs(61));
        assert!(matches!(watch.check(), Verdict::Dead(_)));
    }

    #[test]
    fn hearing_from_the_source_clears_the_request() {
        let timeout = Duration::from_secs(60);
        let mut watch = silent_for(timeout, Duration::from_secs(31));
        assert!(matches!(watch.check(), Verdict::AskForReply(_)));
        watch.heard();
        assert_eq!(watch.check(), Verdict::Fine);
        assert_eq!(watch.check_due(), watch.last_message + timeout / 2);
    }
}
