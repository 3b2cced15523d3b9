pub mod fake_smi;
