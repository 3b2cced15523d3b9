//! `canhazgpu admin`: initialise or resize the GPU pool.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::gpu;
use crate::output;
use crate::session::now;
use crate::state::ProviderKind;
use crate::store;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminArgs {
    pub gpus: u32,
    pub force: bool,
    pub provider: Option<ProviderKind>,
}

/// Far above any single machine; keeps a typo from creating a huge (fake) pool.
const MAX_POOL_SIZE: u32 = 1024;

pub fn execute(args: &AdminArgs, config: &Config) -> Result<()> {
    if args.gpus == 0 {
        return Err(Error::Usage("--gpus must be at least 1".into()));
    }
    if args.gpus > MAX_POOL_SIZE {
        return Err(Error::Usage(format!(
            "--gpus must be at most {MAX_POOL_SIZE}"
        )));
    }
    let provider = match args.provider {
        Some(kind) => {
            eprintln!("Using explicitly specified GPU provider: {}", kind.as_str());
            kind
        }
        None => {
            eprint!("Detecting available GPU provider... ");
            let kind = gpu::detect()?;
            eprintln!("found {}", kind.as_str());
            kind
        }
    };
    if provider != ProviderKind::Fake {
        let seen = gpu::provider_for(provider, args.gpus).device_count()?;
        if args.gpus > seen {
            return Err(Error::Usage(format!(
                "cannot initialize {} GPUs: the {} provider sees only {seen}",
                args.gpus,
                provider.as_str()
            )));
        }
    }
    let mut store = store::create(config)?;
    let outcome = store.init_pool(args.gpus, provider, args.force, now())?;
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
