//! Integration tests: one binary, one module per area.

mod cli;
mod eval;
mod distill;
mod label;
mod sql;
mod store;
mod util;
mod verify;
