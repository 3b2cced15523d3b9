//! `canhazgpu release`: end the caller's reservations.

use crate::alloc::validate_selection;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::output;
use crate::session::{Session, now};
use crate::state::Selection;
use crate::store::ReleaseScope;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReleaseArgs {
    pub gpu_ids: Option<Vec<u32>>,
    /// root only: release the given GPUs whoever holds them.
    pub force: bool,
    /// Another host's pool (`--host`).
    pub host: Option<String>,
}

pub fn execute(args: &ReleaseArgs, config: &Config) -> Result<()> {
    let mut session = Session::open_on(config, args.host.as_deref())?;
    if let Some(ids) = &args.gpu_ids {
        // The same checks (range, duplicates) and messages as `reserve --gpu-ids`.
        validate_selection(&Selection::Ids(ids.clone()), session.pool.gpu_count)?;
    }
    let scope = match (&args.gpu_ids, args.force) {
        (None, false) => ReleaseScope::OwnManual {
            actual_user: session.user.clone(),
        },
        (Some(ids), false) => ReleaseScope::OwnIds {
            actual_user: session.user.clone(),
            ids: ids.clone(),
        },
        (None, true) => {
            return Err(Error::Usage("--force needs --gpu-ids".into()));
        }
        (Some(ids), true) => {
            if !nix::unistd::getuid().is_root() {
                return Err(Error::Usage(
                    "--force releases other users' reservations and is for root only".into(),
                ));
            }
            ReleaseScope::AnyIds { ids: ids.clone() }
        }
    };
    let released = session.store.release(&scope, now())?;
    let mut message = match (&args.gpu_ids, released.is_empty()) {
        (None, true) => "No manually reserved GPUs found for current user".to_string(),
        (Some(ids), true) => format!(
            "No reservations found for current user on GPU(s): {}",
            crate::output::id_list(ids)
        ),
        (_, false) => format!(
            "Released {} GPU(s): {}",
            released.len(),
            crate::output::id_list(&released)
        ),
    };
    if let Some(remote) = &session.remote {
        message.push_str(&format!(" on {}", remote.name));
    }
    output::print(&message)
}
