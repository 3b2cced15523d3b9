//! Invariants of the pool core, over random states and operation sequences.
