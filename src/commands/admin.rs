//! `canhazgpu admin`: initialise or resize this host's GPU pool, or take a
//! decommissioned host out of the fleet.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::gpu;
use crate::output;
use crate::session::now;
use crate::state::ProviderKind;
use crate::store;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminArgs {
    Init {
        gpus: u32,
        force: bool,
        provider: Option<ProviderKind>,
    },
    RemoveHost {
        name: String,
        force: bool,
    },
    /// `--check`: the trust mode and whether the store matches it.
    Check,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct InitArgs {
    gpus: u32,
    force: bool,
    provider: Option<ProviderKind>,
}

/// Far above any single machine; keeps a typo from creating a huge (fake) pool.
const MAX_POOL_SIZE: u32 = 1024;

pub fn execute(args: &AdminArgs, config: &Config) -> Result<()> {
    if *args == AdminArgs::Check {
        return super::admin_check::execute(config);
    }
    if !nix::unistd::getuid().is_root() {
        // --force ends every user's reservations: only root may change the pool.
        return Err(Error::Usage(
            "admin changes the GPU pool of every user and is for root only (run it with sudo)"
                .into(),
        ));
    }
    match args {
        AdminArgs::Init {
            gpus,
            force,
            provider,
        } => init(
            &InitArgs {
                gpus: *gpus,
                force: *force,
                provider: *provider,
            },
            config,
        ),
        AdminArgs::RemoveHost { name, force } => remove_host(name, *force, config),
        AdminArgs::Check => super::admin_check::execute(config),
    }
}

/// Ends the host's reservations (with `force`) and removes its pool and registry
/// entry; its history stays for `report`.
fn remove_host(name: &str, force: bool, config: &Config) -> Result<()> {
    if !matches!(
        &config.store,
        crate::store::StoreConfig::Redis(redis) if redis.layout == crate::store::RedisLayout::Fleet
    ) {
        return Err(Error::Usage(
            "--remove-host needs a fleet in a shared Redis (backend: redis, redis.layout: fleet)"
                .into(),
        ));
    }
    let mut store = store::open(config)?;
    store.select_host(name)?;
    if store.pool()?.is_none() {
        return Err(store.missing_pool());
    }
    let ended = store.retire(force, now())?;
    if ended > 0 {
        eprintln!("Ended {ended} reservation(s) on {name} (recorded in the history)");
    }
    output::print(&format!("Removed host {name} from the fleet"))
}

fn init(args: &InitArgs, config: &Config) -> Result<()> {
    if args.gpus == 0 {
        return Err(Error::Usage("--gpus must be at least 1".into()));
    }
    if args.gpus > MAX_POOL_SIZE {
        return Err(Error::Usage(format!(
            "--gpus must be at most {MAX_POOL_SIZE}"
        )));
    }
    // Re-initialising keeps the provider the pool was made with unless told otherwise.
    let stored = match (args.force, args.provider) {
        (true, None) => match store::open(config) {
            Ok(mut store) => store.pool()?.map(|pool| pool.provider),
            Err(Error::NotInitialized) => None,
            Err(err) => return Err(err),
        },
        _ => None,
    };
    let provider = match (args.provider, stored) {
        (Some(kind), _) => {
            eprintln!("Using explicitly specified GPU provider: {}", kind.as_str());
            kind
        }
        (None, Some(kind)) => {
            eprintln!("Keeping the pool's GPU provider: {}", kind.as_str());
            kind
        }
        (None, None) => {
            eprint!("Detecting available GPU provider... ");
            let kind = gpu::detect(&config.gpu)?;
            eprintln!("found {}", kind.as_str());
            kind
        }
    };
    if provider != ProviderKind::Fake {
        let seen = gpu::provider_for(provider, args.gpus, &config.gpu).device_count()?;
        if args.gpus > seen {
            return Err(Error::Usage(format!(
                "cannot initialize {} GPUs: the {} provider sees only {seen}",
                args.gpus,
                provider.as_str()
            )));
        }
    }
    let (mut store, repaired) = store::create(config)?;
    if let Some(relaid) = &repaired {
        let shown = relaid.path.display();
        match relaid.layout {
            store::sqlite::Layout::Shared => eprintln!(
                "Repaired the permissions of the canhazgpu store at {shown}: every user can use it again"
            ),
            store::sqlite::Layout::Protected => eprintln!(
                "Protected the canhazgpu store at {shown}: only group canhazgpu reaches it, so users change it only through canhazgpu"
            ),
        }
    }
    let outcome = match store.init_pool(args.gpus, provider, args.force, now()) {
        // A repair was all that was asked for: the pool itself stays as it is.
        Err(Error::AlreadyInitialized(count)) if repaired.is_some() && count == args.gpus => {
            return Ok(());
        }
        other => other?,
    };
    let last = args.gpus - 1;
    match outcome.previous_count {
        Some(previous) => {
            if outcome.cleared > 0 {
                eprintln!(
                    "Released {} active reservation(s) (was {previous} GPUs)",
                    outcome.cleared
                );
            }
            output::print(&format!(
                "Reinitialized {} GPUs (IDs 0 to {last})",
                args.gpus
            ))
        }
        None => output::print(&format!("Initialized {} GPUs (IDs 0 to {last})", args.gpus)),
    }
}
