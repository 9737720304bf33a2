//! Deterministic trace generation: many chats, each walked through
//! plausible turns (and some deliberate mistakes), interleaved at random.
//!
//! The generator runs every step it emits through the model
//! ([`ModelWorld`]), so it can choose the next step from the chat's real
//! state: mostly transitions the matrix allows with valid inputs, sometimes
//! a wrong one (about one step in sixteen) so that traces exercise
//! rejections too. The same seed always gives the same trace.
//!
//! `chatstate trace-gen` prints a generated trace; a trace file may instead
//! carry a `"generate"` object, expanded when the trace is loaded (that is
//! how `docs/traces/many-chats.json` stays small).

mod chat;

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context as _;
use chatstate_model::Options;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::trace::{
    AdvanceClockStep, Compiler, GenerateSpec, ModelWorld, Names, Step, Trace, TraceOptions,
};
use chat::ChatGen;

/// Arguments of `chatstate trace-gen`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// How many chats.
    #[arg(long, default_value_t = 300)]
    chats: usize,
    /// Steps per chat.
    #[arg(long, default_value_t = 15)]
    steps_per_chat: usize,
    /// The seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let options = TraceOptions::default();
    let spec = GenerateSpec {
        chats: args.chats,
        steps_per_chat: args.steps_per_chat,
        seed: args.seed,
    };
    let trace = Trace {
        options,
        steps: generate(&spec, &options.options()?)?,
        generate: None,
    };
    // One step per line: diffable and still valid JSON.
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{{\"options\": {},",
        serde_json::to_string(&trace.options)?
    )?;
    writeln!(out, " \"steps\": [")?;
    for (i, step) in trace.steps.iter().enumerate() {
        let comma = if i + 1 == trace.steps.len() { "" } else { "," };
        writeln!(out, "  {}{comma}", serde_json::to_string(step)?)?;
    }
    writeln!(out, " ]}}")?;
    out.flush().context("writing the trace")?;
    Ok(ExitCode::SUCCESS)
}

/// The most chats one `generate` block (or `trace-gen`) may ask for.
pub(crate) const MAX_CHATS: usize = 10_000;
/// The most steps per chat.
pub(crate) const MAX_STEPS_PER_CHAT: usize = 10_000;
/// The most generated steps in all (`chats * steps_per_chat`): a trace is
/// generated in memory, with the model's copy of every chat beside it.
pub(crate) const MAX_STEPS: usize = 100_000;

impl GenerateSpec {
    /// Refuses counts past the documented limits before anything is
    /// allocated.
    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.chats <= MAX_CHATS,
            "generate: chats must be at most {MAX_CHATS}, not {}",
            self.chats
        );
        anyhow::ensure!(
            self.steps_per_chat <= MAX_STEPS_PER_CHAT,
            "generate: steps_per_chat must be at most {MAX_STEPS_PER_CHAT}, not {}",
            self.steps_per_chat
        );
        let total = self.chats * self.steps_per_chat;
        anyhow::ensure!(
            total <= MAX_STEPS,
            "generate: chats * steps_per_chat must be at most {MAX_STEPS}, not {total}"
        );
        Ok(())
    }
}

/// The trace with its `generate` block (if any) expanded: the generated
/// steps appended after the explicit ones.
pub(crate) fn expand(mut trace: Trace) -> anyhow::Result<Trace> {
    if let Some(spec) = trace.generate.take() {
        let options = trace.options.options()?;
        trace.steps.extend(generate(&spec, &options)?);
    }
    Ok(trace)
}

/// The steps of a generated trace.
pub(crate) fn generate(spec: &GenerateSpec, options: &Options) -> anyhow::Result<Vec<Step>> {
    spec.check()?;
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut compiler = Compiler::new(Names::default());
    let mut world = ModelWorld::new(*options);
    let mut chats: Vec<ChatGen> = (0..spec.chats)
        .map(|i| ChatGen::new(i, spec.steps_per_chat))
        .collect();
    let total = spec.chats * spec.steps_per_chat;
    let mut live: Vec<usize> = if spec.steps_per_chat > 0 {
        (0..spec.chats).collect()
    } else {
        Vec::new()
    };
    // About sixteen clock moves per trace, some past the heartbeat
    // staleness so that leases lapse and workers take chats over.
    let advance_every = (total / 16).max(8);
    let mut out: Vec<Step> = Vec::with_capacity(total + total / advance_every + 1);
    let mut emitted = 0;
    while !live.is_empty() {
        if emitted > 0 && emitted % advance_every == 0 {
            let seconds = [1.0, 5.0, 31.0][rng.random_range(0..3)];
            push(
                &mut out,
                Step::AdvanceClock(AdvanceClockStep { seconds }),
                &mut compiler,
                &mut world,
            )?;
        }
        let k = rng.random_range(0..live.len());
        let g = &mut chats[live[k]];
        let chat = g.slot.and_then(|slot| world.chats.get(&slot));
        let step = g.next(&mut rng, chat, &compiler.names, &world);
        let slot = push(&mut out, step, &mut compiler, &mut world)?;
        g.slot = g.slot.or(slot);
        g.left = g.left.saturating_sub(1);
        if g.left == 0 {
            live.swap_remove(k);
        }
        emitted += 1;
    }
    Ok(out)
}

/// Emits a step and runs it through the model; returns its chat's index.
fn push(
    out: &mut Vec<Step>,
    step: Step,
    compiler: &mut Compiler,
    world: &mut ModelWorld,
) -> anyhow::Result<Option<usize>> {
    let op = compiler
        .op(&step)
        .with_context(|| format!("generated step {} does not compile", out.len()))?;
    let slot = op.chat();
    let name = slot.map_or(String::new(), |s| compiler.chats[s].1.clone());
    world.apply(out.len(), &op, &name, &compiler.names);
    out.push(step);
    Ok(slot)
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_sized() {
        let spec = GenerateSpec {
            chats: 20,
            steps_per_chat: 10,
            seed: 7,
        };
        let a = generate(&spec, &Options::default()).unwrap();
        let b = generate(&spec, &Options::default()).unwrap();
        let text = |s: &[Step]| serde_json::to_string(s).unwrap();
        assert_eq!(text(&a), text(&b));
        let chat_steps = a.iter().filter(|s| s.chat().is_some()).count();
        assert_eq!(chat_steps, 200);
        let other = generate(&GenerateSpec { seed: 8, ..spec }, &Options::default()).unwrap();
        assert_ne!(text(&a), text(&other));
    }
}
