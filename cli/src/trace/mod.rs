//! The trace format of `chatstate replay` (documented in `docs/traces.md`)
//! and its compilation into operations with resolved identifiers.
//!
//! A trace names chats, workers, runners, users and model configurations
//! symbolically ("c1", "w1"). [`Names`] maps every name to a UUID derived
//! from the name alone, so the same trace gives byte-identical notification
//! payloads on every backend. Messages and queued messages are named by
//! position (in the active history, in the queue) or by raw id; positions
//! are resolved by each backend against its own view of the chat, right
//! before the transition runs ([`InputSpec::resolve`]).
//!
//! This is the bottom of the trace layer: [`format`] (the JSON a trace is
//! written in), [`names`] (symbolic names to UUIDs), [`ops`] and
//! [`compile`] (steps compiled into operations), [`record`] (what one step
//! leaves behind, the same on every backend) and [`model`] (the reference
//! run of a compiled trace on the model). Replay (`crate::replay`) and
//! generation (`crate::tracegen`) build on it; nothing here depends on
//! either.

pub(crate) mod compile;
pub(crate) mod format;
pub(crate) mod model;
pub(crate) mod names;
pub(crate) mod ops;
pub(crate) mod record;

pub(crate) use compile::{Compiler, compile};
pub(crate) use format::{
    AdvanceClockStep, ChatStep, Content, CreateStep, GenerateSpec, HeartbeatStep, RawStatusStep,
    Step, Trace, TraceMessage, TraceOptions, TraceToolResult, TraceTransition, UpdateStep, load,
};
pub(crate) use model::{EPOCH, ModelWorld, run_model};
pub(crate) use names::Names;
pub(crate) use ops::{Compiled, Op};
pub(crate) use record::{ErrorView, Finish, Line, Record, Seen, StepResult};
