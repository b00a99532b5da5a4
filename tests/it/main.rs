//! Integration tests: one binary, one module per area.

mod cli;
mod distill;
mod eval;
mod label;
mod sql;
mod store;
mod util;
mod verify;
