//! The flags that override configuration keys, built from the key table
//! (`config::GLOBAL_FLAGS`, `RUN_FLAGS`, `RELAY_FLAGS`): each takes a string
//! that the configuration loading validates, and a problem with its value
//! names the flag.

use crate::config::{Flag, GLOBAL_FLAGS, RELAY_FLAGS, RUN_FLAGS};
use clap::{Arg, ArgMatches, Args, Command, FromArgMatches};
use std::marker::PhantomData;

/// One set of flags of the key table.
pub trait FlagSet {
    const FLAGS: &'static [Flag];
    /// Whether the flags are taken by every subcommand too.
    const GLOBAL: bool = false;
}

/// The flags of every command.
#[derive(Debug, Default)]
pub struct Global;
/// The flags of `run`.
#[derive(Debug, Default)]
pub struct Run;
/// The flags of `relay`.
#[derive(Debug, Default)]
pub struct Relay;

impl FlagSet for Global {
    const FLAGS: &'static [Flag] = GLOBAL_FLAGS;
    const GLOBAL: bool = true;
}
impl FlagSet for Run {
    const FLAGS: &'static [Flag] = RUN_FLAGS;
}
impl FlagSet for Relay {
    const FLAGS: &'static [Flag] = RELAY_FLAGS;
}

/// The values given by the flags of `S`, in table order.
#[derive(Debug)]
pub struct Overrides<S> {
    pub values: Vec<(Flag, String)>,
    set: PhantomData<S>,
}

impl<S> Default for Overrides<S> {
    fn default() -> Self {
        Self {
            values: Vec::new(),
            set: PhantomData,
        }
    }
}

impl<S> Overrides<S> {
    /// The value `--{long}` was given, if any.
    pub fn get(&self, long: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(flag, _)| flag.long == long)
            .map(|(_, value)| value.as_str())
    }
}

impl<S: FlagSet> FromArgMatches for Overrides<S> {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut overrides = Self::default();
        overrides.update_from_arg_matches(matches)?;
        Ok(overrides)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        for flag in S::FLAGS {
            if let Some(value) = matches.get_one::<String>(flag.long) {
                self.values.retain(|(f, _)| f.long != flag.long);
                self.values.push((*flag, value.clone()));
            }
        }
        Ok(())
    }
}

impl<S: FlagSet> Args for Overrides<S> {
    fn augment_args(command: Command) -> Command {
        command.args(S::FLAGS.iter().map(|flag| {
            Arg::new(flag.long)
                .long(flag.long)
                .value_name(flag.value_name)
                .help(flag.help())
                .global(S::GLOBAL)
        }))
    }

    fn augment_args_for_update(command: Command) -> Command {
        Self::augment_args(command)
    }
}
