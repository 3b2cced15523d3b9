pub mod cli;
pub mod fake_smi;
