//! The model-based tests: conformance with the model (proptest-state-machine),
//! matrix paths found in the model, concurrency fuzzing with a replay
//! oracle, hostile inputs, frozen regressions, and faults (every store call
//! of a scenario failed once on the in-memory store; connections killed
//! mid-transaction on Postgres). One module per backend.

mod mem {
    // The in-memory store is cheap: twice the default cases and more
    // fuzzing rounds.
    chatstate_tests::model_suite!(chatstate_tests::MemBackend, cases = 512, rounds = 20);
    chatstate_tests::fault_suite!(chatstate_tests::MemBackend);
}

mod pg {
    chatstate_tests::model_suite!(chatstate_tests::PgBackend);
    chatstate_tests::kill_suite!(chatstate_tests::PgBackend);
}
