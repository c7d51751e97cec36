//! The wire: framing on the hot path ([`wire`]), the few protocol messages the router builds or reads
//! ([`proto`]), and the errors a client hears of ([`error`]).

pub mod error;
pub mod proto;
pub mod wire;

pub use error::{Fatal, Reported};
