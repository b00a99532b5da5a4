//! Integration tests: one binary, one module per area.

mod badinput;
mod cli;
mod crash;
mod crash_train;
mod diskfull;
mod distill;
mod eval;
mod fetch;
mod format_v2;
mod fuzz_corpus;
mod label;
mod qwen;
mod rows;
mod scale;
mod share;
mod sql;
mod store;
mod util;
mod verify;
