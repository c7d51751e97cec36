//! The two ways a client hears of a failure: an ErrorResponse after which its session goes on
//! ([`Reported`]), or the end of its connection ([`Fatal`]).

use shardmap::RouteError;

use super::wire::WireError;

/// An error reported to the client as an ErrorResponse (with its SQLSTATE); the session goes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reported {
    pub code: String,
    pub message: String,
}

impl Reported {
    pub fn new(code: &str, message: impl Into<String>) -> Reported {
        Reported { code: code.to_string(), message: message.into() }
    }

    /// 0A000 feature_not_supported: what the router refuses, with what to do instead.
    pub fn unsupported(message: impl Into<String>) -> Reported {
        Reported::new("0A000", message)
    }
}

impl From<RouteError> for Reported {
    fn from(e: RouteError) -> Self {
        Reported { code: e.sqlstate().to_string(), message: e.to_string() }
    }
}

/// Errors that end the client's connection.
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Session pooling: the client's own server connection ended (the server was shut down, or its backend
    /// terminated): its session ends too, as it would on the server.
    #[error("{}", .0.message)]
    ServerGone(Reported),
    /// A limit of the router's (a config key the message names) ended the connection, with PostgreSQL's
    /// SQLSTATE for it.
    #[error("{}", .0.message)]
    Limit(Reported),
}

impl From<std::io::Error> for Fatal {
    fn from(e: std::io::Error) -> Self {
        Fatal::Wire(e.into())
    }
}
