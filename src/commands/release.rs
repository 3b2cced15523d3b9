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

/// Answers the exit code: `exit::NOT_YOURS` when a named GPU was not the caller's.
pub fn execute(args: &ReleaseArgs, config: &Config) -> Result<u8> {
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
    let on_host = session.on_host();
    if !released.freed.is_empty() {
        output::print(&format!(
            "Released {} GPU(s): {}{on_host}",
            released.freed.len(),
            crate::output::id_list(&released.freed)
        ))?;
    } else if args.gpu_ids.is_none() {
        output::print(&format!(
            "No manually reserved GPUs found for current user{on_host}"
        ))?;
    }
    crate::gpu_status::print_receipts(&released, now());
    if args.force {
        tell_holders(&mut session, &released);
    }
    // The GPUs that were the caller's are released; each other one named is an error.
    for refused in &released.refused {
        match &session.remote {
            Some(remote) => eprintln!("Error: {refused} (on {})", remote.name),
            None => eprintln!("Error: {refused}"),
        }
    }
    Ok(match released.refused.is_empty() {
        true => 0,
        false => crate::error::exit::NOT_YOURS,
    })
}

/// Tells each holder whose reservation root ended.
fn tell_holders(session: &mut Session, released: &crate::store::Released) {
    let mut by_user: std::collections::BTreeMap<String, Vec<u32>> = Default::default();
    for (gpu, reservation) in &released.ended {
        let user = crate::pool::account(&reservation.user, &reservation.actual_user);
        if user != session.user {
            by_user.entry(user).or_default().push(*gpu);
        }
    }
    let host = session.pool_host().to_string();
    let events = by_user
        .into_iter()
        .map(|(user, gpus)| crate::notify::Event {
            event: "ended_by_root",
            text: format!(
                "root ended your reservation of GPU(s) {} on {host}",
                output::id_list(&gpus)
            ),
            host: host.clone(),
            user,
            gpus,
        })
        .collect();
    session.notify(events);
}
