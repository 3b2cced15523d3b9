//! `canhazgpu notify --off | --on`: mute or unmute your own notifications,
//! fleet-wide; without a flag, says which is in force.

use crate::config::Config;
use crate::error::Result;
use crate::gpu::procinfo;
use crate::output;
use crate::store;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotifyArgs {
    /// `Some(false)`: `--off`; `Some(true)`: `--on`; `None`: show.
    pub on: Option<bool>,
}

pub fn execute(args: &NotifyArgs, config: &Config) -> Result<()> {
    let user = procinfo::current_user()?;
    let mut store = store::open(config)?;
    if let Some(on) = args.on {
        store.set_muted(&user, !on)?;
    }
    let muted = store.muted_users()?.contains(&user);
    output::print(&format!(
        "Notifications are {} for {user}",
        if muted { "off" } else { "on" }
    ))
}
